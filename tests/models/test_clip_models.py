"""CLIP and aesthetic bundles: written in the real formats, loaded through the real loading path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raugment.demo.tiny import write_tiny_bundles
from raugment.models.aesthetic import load_aesthetic, write_tiny_aesthetic
from raugment.models.clip import TINY_EMBED_DIM, load_clip, write_tiny_clip


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return write_tiny_bundles(tmp_path_factory.mktemp("tiny"), parts=["clip", "aesthetic"])


def test_tiny_clip_loads_through_open_clip_local_dir(bundles):
    enc = load_clip(str(bundles["clip"]))
    assert (bundles["clip"] / "open_clip_config.json").is_file()
    assert (bundles["clip"] / "open_clip_model.safetensors").is_file()
    assert enc.dim == TINY_EMBED_DIM
    imgs = enc.embed_images([Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (64, 64), (0, 0, 255))])
    txt = enc.embed_texts(["A photo of redcircle.", "a photo of a blue square", "A photo of redcircle."])
    assert imgs.shape == (2, TINY_EMBED_DIM) and imgs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(txt[0], txt[2], atol=1e-6)
    assert not np.allclose(txt[0], txt[1])
    # The explicit open_clip reference gives the same weights.
    again = load_clip("local-dir:" + str(bundles["clip"]))
    np.testing.assert_allclose(again.embed_texts(["A photo of redcircle."])[0], txt[0], atol=1e-6)
    assert enc.embed_images([]).shape == (0, TINY_EMBED_DIM)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = load_clip(str(write_tiny_clip(tmp_path / "a", seed=3))).embed_texts(["x"])
    b = load_clip(str(write_tiny_clip(tmp_path / "b", seed=3))).embed_texts(["x"])
    c = load_clip(str(write_tiny_clip(tmp_path / "c", seed=4))).embed_texts(["x"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, c)


def test_load_clip_refuses_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(str(tmp_path))


def test_aesthetic_predictor_formats_and_scale(bundles, tmp_path):
    import torch
    from safetensors.torch import load_file

    pred = load_aesthetic(str(bundles["aesthetic"]), TINY_EMBED_DIM)
    x = np.random.default_rng(0).normal(size=(400, TINY_EMBED_DIM))
    s = pred.score(x)
    assert s.shape == (400,) and s.dtype == np.float32
    # Calibrated around the paper's threshold, so a threshold test drops some and keeps some.
    assert 0.2 < (s >= 5).mean() < 0.8
    # Scores depend on direction only (embeddings are L2-normalised first).
    np.testing.assert_allclose(pred.score(3 * x[:5]), s[:5], rtol=1e-5)
    # LAION publishes a .pth state dict with layers.0 ... layers.7: it loads with weights_only.
    state = load_file(str(bundles["aesthetic"] / "aesthetic.safetensors"))
    assert {"layers.0.weight", "layers.7.bias"} <= set(state)
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    np.testing.assert_allclose(load_aesthetic(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
                                              TINY_EMBED_DIM).score(x[:5]), s[:5], rtol=1e-5)


def test_aesthetic_errors_name_the_problem(bundles, tmp_path):
    with pytest.raises(ValueError, match="expects 32-d"):
        load_aesthetic(str(bundles["aesthetic"]), 768)
    with pytest.raises(ValueError, match="not found"):
        load_aesthetic(str(tmp_path / "missing.safetensors"), 32)
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        load_aesthetic(str(bundles["aesthetic"]), 32).score(np.zeros((2, 8)))
    # No weights: a deterministic random predictor (demo/tests), not an error.
    a = load_aesthetic("random", 16).score(np.eye(16))
    np.testing.assert_allclose(a, load_aesthetic("random", 16).score(np.eye(16)))


def test_write_tiny_aesthetic_dim(tmp_path):
    path = write_tiny_aesthetic(tmp_path / "a768", dim=768)
    assert load_aesthetic(str(path), 768).score(np.ones((1, 768))).shape == (1,)
