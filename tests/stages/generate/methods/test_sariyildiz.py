"""Method 4 (``sariyildiz``): Sariyildiz et al. families with equal shares, Places365 backgrounds."""

from __future__ import annotations

from collections import Counter

from raugment.stages.generate.methods import sariyildiz
from raugment.stages.generate.methods.sariyildiz import Sariyildiz
from tests.helpers.prompts import CALTECH, rng

SARIYILDIZ = Sariyildiz()


def _family(prompt: str) -> str:
    if " inside " in prompt:
        return "background"
    if prompt.startswith("multiple "):
        return "multiple"
    if "DEF" in prompt:
        return "definition"
    if "HYP" in prompt:
        return "hypernym"
    return "name"


def test_sariyildiz_families_equal_shares_and_wording():
    record = {"class_name": "NAME", "hypernym": "HYP", "definition": "DEF"}
    out = SARIYILDIZ.make_prompts(record, 103, rng(3))
    shares = Counter(_family(p) for p in out)
    assert set(shares) == set(sariyildiz.FAMILIES)
    assert max(shares.values()) - min(shares.values()) <= 1
    assert sum(shares.values()) == 103
    for p in out:
        assert p in {"NAME", "NAME, HYP", "NAME, DEF", "multiple NAME, HYP", "multiple different NAME, HYP"} \
            or (p.startswith("NAME, HYP inside ") and p[len("NAME, HYP inside "):] in sariyildiz.places365())
    assert {"multiple NAME, HYP", "multiple different NAME, HYP"} <= set(out)


def test_sariyildiz_backgrounds_are_uniform_over_places365():
    record = {"class_name": "NAME", "hypernym": "HYP", "definition": "DEF"}
    out = SARIYILDIZ.make_prompts(record, 5 * 3650, rng(4))
    scenes = Counter(p.split(" inside ", 1)[1] for p in out if " inside " in p)
    assert sum(scenes.values()) == 3650
    assert len(scenes) > 300  # ~10 draws each; a fixed or narrow choice would fail
    assert max(scenes.values()) < 30


def test_sariyildiz_without_wordnet_uses_the_folder_name():
    out = set(SARIYILDIZ.make_prompts(CALTECH, 50, rng()))
    assert {"ak47", "multiple ak47", "multiple different ak47"} <= out
    assert any(p.startswith("ak47 inside ") for p in out)
    assert all("None" not in p and ", ," not in p for p in out)


def test_places365_package_data():
    places = sariyildiz.places365()
    assert len(places) == 365 and len(set(places)) == 365
    assert places[0] == "airfield"
    assert "outdoor apartment building" in places
    assert sariyildiz.place_phrase("arena/hockey") == "hockey arena"


def test_family_order_is_a_permutation_drawn_first():
    """Prompts are byte-identical to earlier releases: the families' order is one
    ``rng.permutation(n)``, then each family draws what it needs, in slot order."""
    record = {"class_name": "NAME", "hypernym": "HYP", "definition": "DEF"}
    r = rng(11)
    order = r.permutation(10)
    names = list(sariyildiz.FAMILIES)
    families = [names[i % len(names)] for i in range(10)]
    expected = [sariyildiz.FAMILIES[families[i]]("NAME", "HYP", "DEF", r) for i in order]
    assert SARIYILDIZ.make_prompts(record, 10, rng(11)) == expected
