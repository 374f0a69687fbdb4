"""Method 4: the prompt families of Sariyildiz et al. 2022, with equal shares.

"Fake it till you make it: Learning transferable representations from synthetic ImageNet clones"
(arXiv 2212.08420), as Burg et al. 2023 (section 3.1) list them: class name only; class name with
its WordNet hypernym; that combined with "multiple" and "multiple different"; class name with its
WordNet definition; class name with hypernym and a Places365 background. Sariyildiz et al. write
the background prompt as "c, h inside b" (c: class name, h: hypernym, b: Places365 category); the
others are written here as "c", "c, h", "c, d". Their exact "multiple" / "multiple different"
wording could not be checked against the paper's text offline, so "multiple c, h" / "multiple
different c, h" is our reading. Classes without a hypernym/definition (folder datasets) keep the
rest of the prompt.

A class's ``n`` prompts take the families in equal shares (counts differ by at most one) in a
random order; backgrounds are drawn uniformly from the 365 Places365 scene categories (package
data ``raugment/data/places365.txt``, official order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from raugment.core import schema
from raugment.lib.prompts import read_lines
from raugment.stages.generate.methods import GENERATORS, ClassRecord, PromptMethod, record_name, record_text


def place_phrase(category: str) -> str:
    """A Places365 category as words: ``"apartment_building/outdoor"`` -> ``"outdoor apartment building"``."""
    base, _, qualifier = category.partition("/")
    words = f"{qualifier} {base}" if qualifier else base
    return words.replace("_", " ").strip()


@cache
def places365() -> tuple[str, ...]:
    """The 365 Places365 scene categories as phrases (official order)."""
    return tuple(place_phrase(c) for c in read_lines("places365.txt"))


def _with(*parts: str | None) -> str:
    """Join the parts that exist with ", " (classes without WordNet data drop them)."""
    return ", ".join(p for p in parts if p)


# A family writes one prompt from (class name, hypernym, definition, rng).
Family = Callable[[str, str | None, str | None, np.random.Generator], str]


def _family_name(c: str, h: str | None, d: str | None, rng: np.random.Generator) -> str:
    return c


def _family_hypernym(c: str, h: str | None, d: str | None, rng: np.random.Generator) -> str:
    return _with(c, h)


def _family_multiple(c: str, h: str | None, d: str | None, rng: np.random.Generator) -> str:
    prefix = ("multiple", "multiple different")[int(rng.integers(0, 2))]
    return f"{prefix} {_with(c, h)}"


def _family_definition(c: str, h: str | None, d: str | None, rng: np.random.Generator) -> str:
    return _with(c, d)


def _family_background(c: str, h: str | None, d: str | None, rng: np.random.Generator) -> str:
    scenes = places365()
    return f"{_with(c, h)} inside {scenes[int(rng.integers(0, len(scenes)))]}"


FAMILIES: dict[str, Family] = {
    "name": _family_name,
    "hypernym": _family_hypernym,
    "multiple": _family_multiple,
    "definition": _family_definition,
    "background": _family_background,
}


def balanced_families(n: int, families: Sequence[str], rng: np.random.Generator) -> list[str]:
    """``n`` family names with equal shares (counts differ by at most one), in random order."""
    out = [families[i % len(families)] for i in range(n)]
    order = rng.permutation(n)
    return [out[i] for i in order]


@GENERATORS.register("sariyildiz")
class Sariyildiz(PromptMethod):
    """④ Sariyildiz et al. 2022 prompt families, equal shares, backgrounds sampled uniformly."""

    name = "sariyildiz"

    def prompts(self, record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
        c = record_name(record)
        h, d = record_text(record, schema.HYPERNYM), record_text(record, schema.DEFINITION)
        return [FAMILIES[f](c, h, d, rng) for f in balanced_families(n, list(FAMILIES), rng)]
