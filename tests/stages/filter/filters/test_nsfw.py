"""The ``nsfw`` filter: the Stable Diffusion safety checker, by default the generation model's."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from raugment.config import from_dict
from raugment.core import schema as S
from raugment.core.imageio import decode_image
from raugment.stages.filter import stage as F
from raugment.stages.filter.filters import FilterContext
from raugment.stages.filter.filters.nsfw import NsfwFilter
from tests.helpers.planted import draw, png, row


def contract_settings(models: dict) -> dict:
    """``filter`` keys the registry contract test builds this filter with."""
    return {"safety_model": str(models["sd"])}


def checkerboard(size: int = 64, cell: int = 8) -> Image.Image:
    yy, xx = np.mgrid[:size, :size]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board, 255 - board, board // 2], axis=2))


def plant_nsfw(sd_dir: Path, flagged: bytes, others: list[bytes]) -> None:
    """Point concept 0 of the tiny checker at ``flagged``; threshold halfway to the closest other."""
    import torch

    from raugment.models.safety import load_safety_checker

    sc = load_safety_checker(str(sd_dir))
    pix = sc.processor(images=[decode_image(b) for b in [flagged, *others]], return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = torch.nn.functional.normalize(sc.checker.visual_projection(sc.checker.vision_model(pix)[1]), dim=-1)
    cos = (emb[1:] @ emb[0]).max().item()
    assert 1 - cos > 0.01, "the tiny checker cannot tell the planted image apart"
    with torch.no_grad():
        sc.checker.concept_embeds[0] = emb[0]
        sc.checker.concept_embeds_weights[0] = (1 + cos) / 2
    sc.checker.save_pretrained(sd_dir / "safety_checker")


def test_flags_exactly_the_planted_image(tmp_path, tiny_models):
    sd = Path(shutil.copytree(tiny_models["sd"], tmp_path / "sd"))
    flagged, others = checkerboard(), [draw(i, 64) for i in range(4)]
    plant_nsfw(sd, png(flagged), [png(im) for im in others])
    section = from_dict({"filter": {"filters": ["nsfw"], "safety_model": str(sd), "device": "cpu"}}).filter
    images = [others[0], flagged, *others[1:]]
    batch = S.to_table([row(f"r{i}", png(im)) for i, im in enumerate(images)])
    out = NsfwFilter(section, FilterContext(section))(images, batch)
    assert out.passed.tolist() == [True, False, True, True, True]
    assert out.scores[1] > 0 and (out.scores[[0, 2, 3, 4]] <= 0).all()
    assert out.column == S.NSFW_SCORE


def test_the_safety_model_defaults_to_the_generation_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")   # online: hub ids are not looked up in the cache
    cfg = from_dict({"filter": {"filters": ["min_size"]}, "generate": {"model": "org/sd"}})
    assert F.resolve_config(cfg).safety_model == "org/sd"     # resolved whether listed or not
    own = from_dict({"filter": {"filters": ["nsfw"], "safety_model": "org/checker"}, "generate": {"model": "org/sd"}})
    assert F.resolve_config(own).safety_model == "org/checker"
    assert cfg.filter.safety_model is None                    # the loaded section is left as it is
