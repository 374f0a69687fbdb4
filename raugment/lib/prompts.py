"""Prompt builders for prompt-conditioned generation (paper section 3.1, methods 1-4).

A builder takes a class record (a row of the dataset's classes table: ``class_id``,
``class_name``, ``hypernym``, ``definition``), a number of prompts ``n`` and a NumPy
``Generator``, and returns ``n`` prompts. Builders are pure: the same record, ``n`` and generator
state give the same prompts. They are registered by name in ``registry.PROMPT_BUILDERS``.

Class names are the dataset's: for ImageNet all WordNet lemmas of the synset joined by ", "
("tiger shark, Galeocerdo cuvieri"), for folder datasets (Caltech256) the folder names.

Package data: ``data/clip_imagenet_templates.txt`` holds CLIP's 80 ImageNet prompt templates
(Radford et al. 2021, as listed in open_clip's ``zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``),
``data/places365.txt`` the 365 Places365 scene categories in their official order (Zhou et al.
2017; copied from tensorflow-datasets 4.9.10, ``image_classification/categories_places365.txt``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from raugment.core import schema
from raugment.core.registry import Registry

PROMPT_BUILDERS: Registry = Registry("prompt builder")

ClassRecord = Mapping[str, object]
PromptBuilder = Callable[[ClassRecord, int, np.random.Generator], list[str]]

_WS = re.compile(r"\s+")


def w(name: str) -> str:
    """The paper's ``w(n)``: the class name with all whitespace removed ("desktopcomputer")."""
    return _WS.sub("", name)


def simple_prompt(name: str) -> str:
    """Method 1: ``"A photo of {name}."`` with the full class name."""
    return f"A photo of {name}."


def simple_nows_prompt(name: str) -> str:
    """Method 2 (also the retrieval query, method 10): ``"A photo of {w(name)}."``."""
    return f"A photo of {w(name)}."


def _read_lines(filename: str) -> tuple[str, ...]:
    text = resources.files("raugment").joinpath("data", filename).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@lru_cache(maxsize=None)
def clip_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet templates, each with one ``{}`` for the class name."""
    return _read_lines("clip_imagenet_templates.txt")


def place_phrase(category: str) -> str:
    """A Places365 category as words: ``"apartment_building/outdoor"`` -> ``"outdoor apartment building"``."""
    base, _, qualifier = category.partition("/")
    words = f"{qualifier} {base}" if qualifier else base
    return words.replace("_", " ").strip()


@lru_cache(maxsize=None)
def places365() -> tuple[str, ...]:
    """The 365 Places365 scene categories as phrases (official order)."""
    return tuple(place_phrase(c) for c in _read_lines("places365.txt"))


def _field(record: ClassRecord, key: str) -> Optional[str]:
    value = record.get(key)
    if value is None:
        return None
    text = str(value).replace("_", " ").strip()
    return text or None


def _name(record: ClassRecord) -> str:
    name = _field(record, schema.CLASS_NAME)
    if not name:
        raise ValueError(f"class record {dict(record)!r} has no {schema.CLASS_NAME!r}")
    return name


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"number of prompts must be >= 0, got {n}")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


@PROMPT_BUILDERS.register("simple")
def build_simple(record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
    """Method 1: the same prompt ``"A photo of {name}."`` for every image."""
    _check_n(n)
    return [simple_prompt(_name(record))] * n


@PROMPT_BUILDERS.register("simple_nows")
def build_simple_nows(record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
    """Method 2: ``"A photo of {w(name)}."`` for every image."""
    _check_n(n)
    return [simple_nows_prompt(_name(record))] * n


@PROMPT_BUILDERS.register("clip_templates")
def build_clip_templates(record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
    """Method 3: CLIP's 80 templates sampled with replacement, filled with ``w(name)``."""
    _check_n(n)
    templates = clip_templates()
    name = w(_name(record))
    return [templates[i].format(name) for i in rng.integers(0, len(templates), size=n)]


def _with(*parts: Optional[str]) -> str:
    """Join the parts that exist with ", " (classes without WordNet data drop them)."""
    return ", ".join(p for p in parts if p)


# The prompt families of Sariyildiz et al. 2022, "Fake it till you make it: Learning transferable
# representations from synthetic ImageNet clones" (arXiv 2212.08420), as Burg et al. 2023 (section
# 3.1) list them: class name only; class name with its WordNet hypernym; that combined with
# "multiple" and "multiple different"; class name with its WordNet definition; class name with
# hypernym and a Places365 background. Sariyildiz et al. write the background prompt as
# "c, h inside b" (c: class name, h: hypernym, b: Places365 category); the others are written
# here as "c", "c, h", "c, d". Their exact "multiple" / "multiple different" wording could not be
# checked against the paper's text offline, so "multiple c, h" / "multiple different c, h" is our
# reading. Classes without a hypernym/definition (folder datasets) keep the rest of the prompt.
SariyildizFamily = Callable[[str, Optional[str], Optional[str], np.random.Generator], str]


def _family_name(c: str, h: Optional[str], d: Optional[str], rng: np.random.Generator) -> str:
    return c


def _family_hypernym(c: str, h: Optional[str], d: Optional[str], rng: np.random.Generator) -> str:
    return _with(c, h)


def _family_multiple(c: str, h: Optional[str], d: Optional[str], rng: np.random.Generator) -> str:
    prefix = ("multiple", "multiple different")[int(rng.integers(0, 2))]
    return f"{prefix} {_with(c, h)}"


def _family_definition(c: str, h: Optional[str], d: Optional[str], rng: np.random.Generator) -> str:
    return _with(c, d)


def _family_background(c: str, h: Optional[str], d: Optional[str], rng: np.random.Generator) -> str:
    scenes = places365()
    return f"{_with(c, h)} inside {scenes[int(rng.integers(0, len(scenes)))]}"


SARIYILDIZ_FAMILIES: dict[str, SariyildizFamily] = {
    "name": _family_name,
    "hypernym": _family_hypernym,
    "multiple": _family_multiple,
    "definition": _family_definition,
    "background": _family_background,
}


def balanced_families(n: int, families: Sequence[str], rng: np.random.Generator) -> list[str]:
    """``n`` family names with equal shares (counts differ by at most one), in random order."""
    _check_n(n)
    out = [families[i % len(families)] for i in range(n)]
    order = rng.permutation(n)
    return [out[i] for i in order]


@PROMPT_BUILDERS.register("sariyildiz")
def build_sariyildiz(record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
    """Method 4: Sariyildiz et al. families with equal shares, backgrounds sampled uniformly."""
    c = _name(record)
    h, d = _field(record, schema.HYPERNYM), _field(record, schema.DEFINITION)
    return [SARIYILDIZ_FAMILIES[f](c, h, d, rng)
            for f in balanced_families(n, list(SARIYILDIZ_FAMILIES), rng)]


def build_prompts(builder: str, record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
    """Prompts from the builder registered as ``builder`` (ValueError listing known names)."""
    prompts = PROMPT_BUILDERS.get(builder)(record, n, rng)
    if len(prompts) != n:
        raise RuntimeError(f"prompt builder {builder!r} returned {len(prompts)} prompts, expected {n}")
    return prompts
