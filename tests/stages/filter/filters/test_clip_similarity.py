"""The ``clip_similarity`` filter: CLIP cosine of an image and its class prompt."""

from __future__ import annotations

import numpy as np
import pytest

from raugment.config import from_dict
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.stages.filter import stage as F
from raugment.stages.filter.filters import FILTERS, FilterContext
from raugment.stages.filter.filters.clip_similarity import class_prompts, clip_similarity_scores
from tests.helpers.planted import draw, png, row


def contract_settings(models: dict) -> dict:
    """``filter`` keys the registry contract test builds this filter with."""
    return {"clip_threshold": 0.0}


def test_pure_scores_and_prompts():
    emb = np.eye(3, dtype=np.float32)
    assert clip_similarity_scores(emb, emb[[0, 2, 2]]).tolist() == [1.0, 0.0, 1.0]
    assert class_prompts("a photo of {name}.", ["tench, Tinca tinca", None]) == [
        "a photo of tench.", "a photo of ."]


class _StubClip:
    """Stands in for CLIP: image i embeds to axis (i % 2); prompt of class k embeds to axis k."""

    dim = 2

    def __init__(self):
        self.texts: list[str] = []

    def embed_images(self, images):
        return np.eye(2, dtype=np.float32)[[im.width % 2 for im in images]]

    def embed_texts(self, texts):
        self.texts.extend(texts)
        return np.eye(2, dtype=np.float32)[[int(t.split("class")[1][0]) for t in texts]]


def test_clip_similarity_filter_drops_exactly_the_mismatched_rows():
    cfg = from_dict({"filter": {"filters": ["clip_similarity"], "clip_threshold": 0.5}}).filter
    ctx = FilterContext(cfg)
    ctx._clip = _StubClip()
    fn = FILTERS.get("clip_similarity")(cfg, ctx)
    # widths 40 (even -> axis 0) and 41 (odd -> axis 1); planted mismatches: rows 1 and 2
    rows = [row("ok0", png(draw(0, 40)), label=0), row("bad1", png(draw(1, 41)), label=0),
            row("bad2", png(draw(2, 40)), label=1), row("ok3", png(draw(3, 41)), label=1)]
    out = F.filter_batch(S.to_table(rows), [("clip_similarity", fn)])
    kept, dropped = F.split_batch(out)
    assert kept.column(S.ID).to_pylist() == ["ok0", "ok3"]
    assert dropped.column(S.ID).to_pylist() == ["bad1", "bad2"]
    assert dropped.column(S.REASON).to_pylist() == ["clip_similarity"] * 2
    assert kept.column(S.CLIP_SIMILARITY).to_pylist() == [1.0, 1.0]
    assert dropped.column(S.SCORE).to_pylist() == [0.0, 0.0]
    F.filter_batch(S.to_table(rows), [("clip_similarity", fn)])
    assert sorted(ctx._clip.texts) == ["a photo of class0.", "a photo of class1."]   # each prompt once


def test_without_a_threshold_it_only_scores():
    cfg = from_dict({"filter": {"filters": ["clip_similarity"]}}).filter
    ctx = FilterContext(cfg)
    ctx._clip = _StubClip()
    images = [draw(0, 40), draw(1, 41)]
    batch = S.to_table([row(f"r{i}", png(im)) for i, im in enumerate(images)])
    out = FILTERS.get("clip_similarity")(cfg, ctx)(images, batch)
    assert out.passed.tolist() == [True, True] and out.scores.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("keys, match", [
    ({"clip_threshold": 1.5}, r"filter\.clip_threshold is a cosine in \[-1, 1\]"),
    ({"clip_prompt": "a photo"}, r"filter\.clip_prompt must contain \{name\}"),
])
def test_settings_are_checked_when_the_config_loads(keys, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"filter": keys})
