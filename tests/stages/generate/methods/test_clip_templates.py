"""Method 3 (``clip_templates``): CLIP's 80 ImageNet templates, sampled with replacement, with w(name)."""

from __future__ import annotations

from collections import Counter

import pytest

from raugment.stages.generate.methods import clip_templates
from raugment.stages.generate.methods.clip_templates import ClipTemplates
from tests.helpers.prompts import DESKTOP, rng

CLIP = ClipTemplates()


def test_clip_templates_are_the_80_openai_ones():
    templates = clip_templates.templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert templates[0] == "a bad photo of a {}."
    assert "a photo of many {}." in templates
    assert "a black and white photo of the {}." in templates
    open_clip_meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert list(templates) == [t("{}") for t in open_clip_meta.OPENAI_IMAGENET_TEMPLATES]


def test_clip_template_prompts_sample_with_replacement_and_use_w():
    out = CLIP.make_prompts(DESKTOP, 400, rng(1))
    assert len(out) == 400
    filled = {t.format("desktopcomputer") for t in clip_templates.templates()}
    assert set(out) <= filled
    assert len(set(out)) > 60  # 400 draws reach most of the 80 templates
    assert max(Counter(out).values()) > 1  # with replacement
    assert out == CLIP.make_prompts(DESKTOP, 400, rng(1))
    assert out != CLIP.make_prompts(DESKTOP, 400, rng(2))


def test_the_draws_are_numpy_integers_over_the_templates():
    """Prompts are byte-identical to earlier releases: one ``rng.integers(0, 80, size=n)`` call."""
    expected = [clip_templates.templates()[i].format("desktopcomputer") for i in rng(7).integers(0, 80, size=5)]
    assert CLIP.make_prompts(DESKTOP, 5, rng(7)) == expected
