"""Method 1 (``simple``): the paper's exact prompt, the same for every image of a class."""

from __future__ import annotations

from raugment.stages.generate.methods.simple import Simple
from tests.helpers.prompts import CALTECH, TIGER_SHARK, rng

SIMPLE = Simple()


def test_simple_prompts_match_the_paper():
    assert SIMPLE.make_prompts(TIGER_SHARK, 2, rng()) == ["A photo of tiger shark, Galeocerdo cuvieri."] * 2
    assert SIMPLE.make_prompts(CALTECH, 0, rng()) == []
    assert SIMPLE.make_prompts(CALTECH, 1, rng()) == ["A photo of ak47."]


def test_simple_draws_nothing_from_the_class_stream():
    r = rng(5)
    SIMPLE.make_prompts(TIGER_SHARK, 7, r)
    assert r.integers(0, 2**31) == rng(5).integers(0, 2**31)
