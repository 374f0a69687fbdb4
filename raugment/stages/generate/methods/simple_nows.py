"""Method 2: ``"A photo of {w(name)}."`` (the class name without whitespace) for every image."""

from __future__ import annotations

import numpy as np

from raugment.lib.prompts import simple_nows_prompt
from raugment.stages.generate.methods import GENERATORS, ClassRecord, PromptMethod, record_name


@GENERATORS.register("simple_nows")
class SimpleNoWhitespace(PromptMethod):
    """② "A photo of {w(name)}."."""

    name = "simple_nows"

    def prompts(self, record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
        return [simple_nows_prompt(record_name(record))] * n
