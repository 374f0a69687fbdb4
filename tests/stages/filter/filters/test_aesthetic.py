"""The ``aesthetic`` filter: the LAION aesthetic predictor on CLIP image embeddings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from raugment.config import from_dict
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.core.imageio import decode_image
from raugment.stages.filter import stage as F
from raugment.stages.filter.filters import FilterContext
from raugment.stages.filter.filters.aesthetic import AestheticFilter
from tests.helpers.planted import draw, png, row


def contract_settings(models: dict) -> dict:
    """``filter`` keys the registry contract test builds this filter with."""
    return {"aesthetic_model": str(models["aesthetic"])}


def plant_aesthetic(clip_dir: Path, out_dir: Path, low: bytes, others: list[bytes]) -> None:
    """A LAION-shaped (linear) predictor scoring ``low`` below 5 and every other image above 5."""
    import torch
    from safetensors.torch import save_file

    from raugment.models.aesthetic import CONFIG_FILE, WEIGHTS_FILE, build_mlp
    from raugment.models.clip import load_clip

    enc = load_clip(str(clip_dir))
    emb = enc.embed_images([decode_image(b) for b in [low, *others]])
    v = emb[0] - emb[1:].mean(axis=0)
    v /= np.linalg.norm(v)
    proj = emb @ v
    assert proj[0] > proj[1:].max() + 0.01, "the tiny CLIP cannot tell the planted image apart"
    mid = float(proj[0] + proj[1:].max()) / 2
    mlp = build_mlp(enc.dim)
    with torch.no_grad():
        for layer in mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
                layer.weight[0, 0] = 1.0
        mlp[0].weight[0] = torch.from_numpy(v)
        mlp[7].weight[0, 0] = -10.0  # score = 5 + 10 * (mid - e.v)
        mlp[7].bias[0] = 5.0 + 10.0 * mid
    out_dir.mkdir(parents=True)
    save_file({f"layers.{k}": t.contiguous() for k, t in mlp.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps({"dim": enc.dim}))


def test_drops_exactly_the_planted_low_score(tmp_path, tiny_models):
    low, others = Image.new("RGB", (64, 64)), [draw(i, 64) for i in range(4)]
    plant_aesthetic(tiny_models["clip"], tmp_path / "aesthetic", png(low), [png(im) for im in others])
    section = from_dict({"filter": {"filters": ["aesthetic"], "aesthetic_model": str(tmp_path / "aesthetic"),
                                    "clip_model": str(tiny_models["clip"]), "clip_pretrained": None,
                                    "device": "cpu"}}).filter
    images = [others[0], low, *others[1:]]
    batch = S.to_table([row(f"r{i}", png(im)) for i, im in enumerate(images)])
    ctx = FilterContext(section)
    out = AestheticFilter(section, ctx)(images, batch)
    assert out.passed.tolist() == [True, False, True, True, True]
    assert out.scores[1] < 5 <= out.scores[[0, 2, 3, 4]].min()
    assert out.column == S.AESTHETIC_SCORE
    assert ctx.image_embeddings(images) is ctx.image_embeddings(images)   # embedded once per batch


def test_a_listed_aesthetic_filter_needs_its_model(tmp_path, caplog):
    def resolve(model=None):
        keys = {"filters": ["min_size", "aesthetic"]} | ({"aesthetic_model": model} if model else {})
        return F.resolve_config(from_dict({"filter": keys}))

    # unset: the hint says where the real LAION predictor comes from, and how to ask for a random one
    with pytest.raises(ConfigError, match=r"filter\.aesthetic_model is unset.*improved-aesthetic-predictor"
                                          r".*filter\.aesthetic_model=random"):
        resolve()
    # a path that is not there is refused before any work, not in an actor
    with pytest.raises(ConfigError, match=r"filter\.aesthetic_model: '.*missing\.pth' is neither a weights file"):
        resolve(str(tmp_path / "missing.pth"))
    # a random predictor only by name, and loudly on the driver
    with caplog.at_level(logging.WARNING):
        resolve("random")
    assert any("RANDOM aesthetic predictor" in r.getMessage() for r in caplog.records)
    F.resolve_config(from_dict({"filter": {"filters": ["min_size"]}}))   # not listed: not needed


def test_random_predictor_only_by_name():
    from raugment.models.aesthetic import load_aesthetic

    with pytest.raises(ValueError, match="no aesthetic predictor given"):
        load_aesthetic(None, 8)
    assert load_aesthetic("random", 8).source == "random"


def test_only_on_retrieved_keeps_a_low_scoring_generated_image_and_drops_the_retrieved_one(tmp_path, tiny_models):
    """The paper's aesthetic filter applies to retrieved images only (``filter.only_on``): the same
    low-scoring picture is dropped as a retrieved image and kept, with its score, as a generated one."""
    low, others = Image.new("RGB", (64, 64)), [draw(i, 64) for i in range(3)]
    plant_aesthetic(tiny_models["clip"], tmp_path / "aesthetic", png(low), [png(im) for im in others])
    keys = {"filters": ["aesthetic"], "aesthetic_model": str(tmp_path / "aesthetic"),
            "clip_model": str(tiny_models["clip"]), "clip_pretrained": None, "device": "cpu"}
    rows = [row("ret-low", png(low), source="retrieved"), row("gen-low", png(low), source="generated"),
            *[row(f"gen-{i}", png(im), source="generated") for i, im in enumerate(others)]]
    everywhere = F.filter_batch(S.to_table(rows), F.build_filters(from_dict({"filter": keys}).filter))
    section = from_dict({"filter": {**keys, "only_on": {"aesthetic": ["retrieved"]}}}).filter
    kept, dropped = F.split_batch(F.filter_batch(S.to_table(rows), F.build_filters(section)))
    assert sorted(F.split_batch(everywhere)[1].column(S.ID).to_pylist()) == ["gen-low", "ret-low"]
    assert dropped.column(S.ID).to_pylist() == ["ret-low"]
    assert dropped.column(S.REASON).to_pylist() == ["aesthetic"]
    assert sorted(kept.column(S.ID).to_pylist()) == ["gen-0", "gen-1", "gen-2", "gen-low"]
    low_score = kept.filter(pc.equal(kept.column(S.ID), "gen-low")).column(S.AESTHETIC_SCORE)[0].as_py()
    assert low_score < 5


def test_only_on_names_known_filters_and_sources():
    with pytest.raises(ConfigError, match=r"filter\.only_on\.aesthetc: unknown filter"):
        from_dict({"filter": {"only_on": {"aesthetc": ["retrieved"]}}})
    with pytest.raises(ConfigError, match=r"filter\.only_on\.aesthetic must list image sources"):
        from_dict({"filter": {"only_on": {"aesthetic": ["retreived"]}}})
