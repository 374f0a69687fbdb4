"""The prompt pieces several packages share: ``w``, the simple prompts, the package's text data.

The prompt methods' own tests are in ``tests/stages/generate/methods/``.
"""

from __future__ import annotations

from raugment.lib import prompts


def test_simple_prompts_match_the_paper():
    assert prompts.simple_prompt("tiger shark, Galeocerdo cuvieri") == "A photo of tiger shark, Galeocerdo cuvieri."
    assert prompts.simple_nows_prompt(" tiger\tshark ") == "A photo of tigershark."
    assert prompts.w("tiger shark, Galeocerdo cuvieri") == "tigershark,Galeocerdocuvieri"


def test_package_data_lines_are_stripped_and_non_empty():
    places = prompts.read_lines("places365.txt")
    assert len(places) == 365 and places[0] == "airfield" and "apartment_building/outdoor" in places
    assert all(line and line == line.strip() for line in prompts.read_lines("clip_imagenet_templates.txt"))
