"""Boomerang (``boomerang``): img2img from the class's training images, sizes restored, its strength key."""

from __future__ import annotations

import numpy as np
import pytest

from raugment.config import load_config
from raugment.core.config import ConfigError
from raugment.core.imageio import decode_image
from raugment.models.diffusion import load_pipeline
from raugment.stages.generate import stage as generate
from raugment.stages.generate.methods import INIT_IMAGE
from raugment.stages.generate.methods.boomerang import Boomerang, Settings
from tests.helpers.generation import ORIGINAL_SIZE
from tests.helpers.generation import generate_overrides as _overrides


def test_boomerang_needs_training_images(tmp_path, tiny_sd, dataset):
    cfg = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.method": "boomerang"}))
    classes = [*generate.read_classes(dataset), {"label": 9, "class_id": "empty", "class_name": "x"}]
    with pytest.raises(ValueError, match=r"boomerang needs training images.*empty"):
        generate.check_config(cfg).plan(classes, cfg.generate, dataset=dataset, finetune=None)


def test_boomerang_keeps_size_and_changes_the_image(dataset, tmp_path, tiny_sd):
    cfg = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.method": "boomerang",
                                                             "generate.images_per_class": 2,
                                                             "generate.boomerang_strength": 0.5,
                                                             "generate.steps": 4}))
    method = generate.check_config(cfg)
    assert method.kind == "img2img"
    rows = method.plan(generate.read_classes(dataset), cfg.generate, dataset=dataset, finetune=None)
    assert {r["params"]["source_id"] for r in rows if r["label"] == 0} == {"orig-0-0", "orig-0-1"}
    pipe = load_pipeline(str(tiny_sd), kind="img2img")
    (images, failures), = list(generate.generate_class(pipe, method, rows[:2], cfg.generate))
    assert not failures and len(images) == 2
    for img, row in zip(images, rows[:2], strict=True):
        assert (img["width"], img["height"]) == ORIGINAL_SIZE
        out = np.asarray(decode_image(img["image"]), dtype=int)
        src = np.asarray(decode_image(row[INIT_IMAGE]), dtype=int)
        assert out.shape == src.shape and np.abs(out - src).mean() > 5
        assert img["prompt"] == "" and img["params"]["strength"] == 0.5


def test_slots_use_the_originals_evenly_and_the_strength_reaches_the_pipeline(dataset):
    cfg = load_config(None, ["generate.method=boomerang", "generate.images_per_class=5",
                             "generate.boomerang_strength=0.3"]).generate
    rows = Boomerang().plan(generate.read_classes(dataset), cfg, dataset=dataset, finetune=None)
    assert [r["params"]["source_id"] for r in rows if r["label"] == 1] == \
        ["orig-1-0", "orig-1-1", "orig-1-0", "orig-1-1", "orig-1-0"]
    kwargs = Boomerang().call_kwargs(rows[:2], cfg)
    assert kwargs["strength"] == 0.3 and kwargs["guidance_scale"] == 1.0 and kwargs["prompt"] == ["", ""]
    assert [im.size for im in kwargs["image"]] == [(cfg.width, cfg.height)] * 2


@pytest.mark.parametrize("strength", [0, -0.1, 1.5])
def test_strength_outside_zero_one_is_a_config_error(strength):
    with pytest.raises(ConfigError, match=r"generate\.boomerang_strength must be in \(0, 1\]"):
        load_config(None, [f"generate.boomerang_strength={strength}"])


def test_strength_is_the_plug_ins_key_with_the_papers_default():
    cfg = load_config(None, ["generate.boomerang_strength=1"])
    assert Settings.of(cfg.generate).boomerang_strength == 1.0
    assert Settings.of(load_config().generate).boomerang_strength == 0.2
    assert Boomerang.settings is Settings and Boomerang.cost_fraction == 0.2
