"""Prompt builders: the paper's exact formats, CLIP's 80 templates, Sariyildiz family shares."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from raugment.lib import prompts
from raugment.lib.prompts import PROMPT_BUILDERS

TIGER_SHARK = {"class_id": "n01491361", "class_name": "tiger shark, Galeocerdo cuvieri",
               "hypernym": "requiem shark", "definition": "large dangerous warm-water shark"}
DESKTOP = {"class_id": "n03180011", "class_name": "desktop computer", "hypernym": "personal computer",
           "definition": "a personal computer small enough to fit conveniently in an individual workspace"}
CALTECH = {"class_id": "001.ak47", "class_name": "ak47", "hypernym": None, "definition": None}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_registered_names():
    assert {"simple", "simple_nows", "clip_templates", "sariyildiz"} <= set(PROMPT_BUILDERS.names())


def test_simple_prompts_match_the_paper():
    assert prompts.build_simple(TIGER_SHARK, 2, rng()) == ["A photo of tiger shark, Galeocerdo cuvieri."] * 2
    assert prompts.build_simple_nows(DESKTOP, 1, rng()) == ["A photo of desktopcomputer."]
    assert prompts.simple_nows_prompt(" tiger\tshark ") == "A photo of tigershark."
    assert prompts.w("tiger shark, Galeocerdo cuvieri") == "tigershark,Galeocerdocuvieri"
    assert prompts.build_simple(CALTECH, 0, rng()) == []


def test_clip_templates_are_the_80_openai_ones():
    templates = prompts.clip_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert templates[0] == "a bad photo of a {}."
    assert "a photo of many {}." in templates
    assert "a black and white photo of the {}." in templates
    open_clip_meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert list(templates) == [t("{}") for t in open_clip_meta.OPENAI_IMAGENET_TEMPLATES]


def test_clip_template_prompts_sample_with_replacement_and_use_w():
    out = prompts.build_clip_templates(DESKTOP, 400, rng(1))
    assert len(out) == 400
    filled = {t.format("desktopcomputer") for t in prompts.clip_templates()}
    assert set(out) <= filled
    assert len(set(out)) > 60  # 400 draws reach most of the 80 templates
    assert max(Counter(out).values()) > 1  # with replacement
    assert out == prompts.build_clip_templates(DESKTOP, 400, rng(1))
    assert out != prompts.build_clip_templates(DESKTOP, 400, rng(2))


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
    out = prompts.build_sariyildiz(record, 103, rng(3))
    shares = Counter(_family(p) for p in out)
    assert set(shares) == set(prompts.SARIYILDIZ_FAMILIES)
    assert max(shares.values()) - min(shares.values()) <= 1
    assert sum(shares.values()) == 103
    for p in out:
        assert p in {"NAME", "NAME, HYP", "NAME, DEF", "multiple NAME, HYP", "multiple different NAME, HYP"} \
            or (p.startswith("NAME, HYP inside ") and p[len("NAME, HYP inside "):] in prompts.places365())
    assert {"multiple NAME, HYP", "multiple different NAME, HYP"} <= set(out)


def test_sariyildiz_backgrounds_are_uniform_over_places365():
    record = {"class_name": "NAME", "hypernym": "HYP", "definition": "DEF"}
    out = prompts.build_sariyildiz(record, 5 * 3650, rng(4))
    scenes = Counter(p.split(" inside ", 1)[1] for p in out if " inside " in p)
    assert sum(scenes.values()) == 3650
    assert len(scenes) > 300  # ~10 draws each; a fixed or narrow choice would fail
    assert max(scenes.values()) < 30


def test_sariyildiz_without_wordnet_uses_the_folder_name():
    out = set(prompts.build_sariyildiz(CALTECH, 50, rng()))
    assert {"ak47", "multiple ak47", "multiple different ak47"} <= out
    assert any(p.startswith("ak47 inside ") for p in out)
    assert all("None" not in p and ", ," not in p for p in out)


def test_places365_package_data():
    places = prompts.places365()
    assert len(places) == 365 and len(set(places)) == 365
    assert places[0] == "airfield"
    assert "outdoor apartment building" in places
    assert prompts.place_phrase("arena/hockey") == "hockey arena"


def test_build_prompts_by_name_and_errors():
    assert prompts.build_prompts("simple", TIGER_SHARK, 3, rng()) == prompts.build_simple(TIGER_SHARK, 3, rng())
    with pytest.raises(ValueError, match="known: .*clip_templates"):
        prompts.build_prompts("nope", TIGER_SHARK, 1, rng())
    with pytest.raises(ValueError, match="class_name"):
        prompts.build_simple({"class_id": "x"}, 1, rng())
    with pytest.raises(ValueError, match=">= 0"):
        prompts.build_simple(TIGER_SHARK, -1, rng())
