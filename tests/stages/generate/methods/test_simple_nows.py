"""Method 2 (``simple_nows``): the simple prompt with the class name's whitespace removed."""

from __future__ import annotations

from raugment.stages.generate.methods.simple_nows import SimpleNoWhitespace
from tests.helpers.prompts import DESKTOP, TIGER_SHARK, rng

SIMPLE_NOWS = SimpleNoWhitespace()


def test_simple_nows_prompts_match_the_paper():
    assert SIMPLE_NOWS.make_prompts(DESKTOP, 1, rng()) == ["A photo of desktopcomputer."]
    assert SIMPLE_NOWS.make_prompts(TIGER_SHARK, 3, rng()) == ["A photo of tigershark,Galeocerdocuvieri."] * 3


def test_underscores_of_folder_names_are_words():
    assert SIMPLE_NOWS.make_prompts({"class_name": "Granny_Smith"}, 1, rng()) == ["A photo of GrannySmith."]
