"""Method 3: CLIP's 80 ImageNet templates, sampled with replacement, filled with ``w(name)``.

The templates are package data (``raugment/data/clip_imagenet_templates.txt``; see
:mod:`raugment.lib.prompts`), each with one ``{}`` for the class name.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from raugment.lib.prompts import read_lines, w
from raugment.stages.generate.methods import GENERATORS, ClassRecord, PromptMethod, record_name


@cache
def templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet templates, each with one ``{}`` for the class name."""
    return read_lines("clip_imagenet_templates.txt")


@GENERATORS.register("clip_templates")
class ClipTemplates(PromptMethod):
    """③ CLIP's 80 ImageNet templates with w(name), sampled with replacement."""

    name = "clip_templates"

    def prompts(self, record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
        chosen = templates()
        name = w(record_name(record))
        return [chosen[i].format(name) for i in rng.integers(0, len(chosen), size=n)]
