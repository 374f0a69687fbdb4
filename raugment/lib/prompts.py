"""Prompt pieces that several packages share: the paper's simple prompts and the package's text data.

The prompt-conditioned generation methods themselves (paper section 3.1, methods 1-4) are plug-ins
of the generation stage (``raugment/stages/generate/methods/``); retrieval queries with
:func:`simple_nows_prompt` (method 10), fine-tuning initialises its conditionings from it, and the
demo's captions use :func:`w`.

Class names are the dataset's: for ImageNet all WordNet lemmas of the synset joined by ", "
("tiger shark, Galeocerdo cuvieri"), for folder datasets (Caltech256) the folder names.

Package data (``raugment/data/``, read with :func:`read_lines`): ``clip_imagenet_templates.txt``
holds CLIP's 80 ImageNet prompt templates (Radford et al. 2021, as listed in open_clip's
``zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``), ``places365.txt`` the 365 Places365 scene
categories in their official order (Zhou et al. 2017; copied from tensorflow-datasets 4.9.10,
``image_classification/categories_places365.txt``).
"""

from __future__ import annotations

import re
from importlib import resources

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


def read_lines(filename: str) -> tuple[str, ...]:
    """The non-empty lines of the package data file ``raugment/data/<filename>``, stripped."""
    text = resources.files("raugment").joinpath("data", filename).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
