"""Method 1: ``"A photo of {name}."`` with the full class name, the same prompt for every image."""

from __future__ import annotations

import numpy as np

from raugment.lib.prompts import simple_prompt
from raugment.stages.generate.methods import GENERATORS, ClassRecord, PromptMethod, record_name


@GENERATORS.register("simple")
class Simple(PromptMethod):
    """① "A photo of {name}."."""

    name = "simple"

    def prompts(self, record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
        return [simple_prompt(record_name(record))] * n
