"""FT cluster conditioning (``ft_cluster_conditioning``, method 6): its keys, its clusters, its cost."""

from __future__ import annotations

import numpy as np
import pytest

from raugment.config import load_config
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.core.imageio import encode_image
from raugment.stages.finetune.methods import get_method
from raugment.stages.finetune.methods.ft_cluster_conditioning import Settings


def test_inception_features_are_pool_features(tiny_sd):
    from PIL import Image

    from raugment.stages.finetune.kmeans import InceptionFeatures

    imgs = [encode_image(Image.new("RGB", (32, 32), c), "PNG") for c in ("red", "blue", "green")]
    out = InceptionFeatures(weights=None, size=75, device="cpu")(
        {schema.ID: np.array(["a", "b", "c"]), schema.LABEL: np.array([0, 0, 1]), schema.IMAGE: imgs})
    feats = np.stack(out["features"])
    assert feats.shape == (3, 2048)
    assert not np.allclose(feats[0], feats[1])
    # the actor's own CPU seconds for the batch (model build included) ride along on its first row
    assert out["_task_cpu_s"][0] > 0 and list(out["_task_cpu_s"][1:]) == [0.0, 0.0]
    assert list(out["_task_gpu_s"]) == [0.0, 0.0, 0.0]


def test_its_keys_are_finetune_keys_with_their_checks():
    s = Settings.of(load_config(None, ["finetune.clusters=4", "finetune.feature_weights=null",
                                       "finetune.feature_size=75", "finetune.feature_pool.batch_size=8"]).finetune)
    assert (s.clusters, s.feature_weights, s.feature_size, s.feature_pool.batch_size) == (4, None, 75, 8)
    defaults = Settings.of(load_config().finetune)
    assert (defaults.clusters, defaults.feature_weights, defaults.feature_size) == (1, "IMAGENET1K_V1", 299)
    with pytest.raises(ConfigError, match=r"finetune\.clusters must be > 0"):
        load_config(None, ["finetune.clusters=0"])
    with pytest.raises(ConfigError, match=r"finetune\.feature_size must be >= 75"):
        load_config(None, ["finetune.feature_size=64"])
    with pytest.raises(ConfigError, match=r"finetune\.feature_pool"):
        load_config(None, ["finetune.feature_pool.batch_size=0"])


def test_one_cluster_needs_no_features():
    """k = 1 is FT conditioning: every image in cluster 0, without Ray or Inception."""
    cfg = load_config(None, ["finetune.method=ft_cluster_conditioning"])
    out = get_method("ft_cluster_conditioning").cluster_images(cfg, None, ["a", "b", "c"], [0, 0, 1])
    assert out.tolist() == [0, 0, 0] and out.dtype == np.int64


def test_cost_is_the_papers_244_v100_hours_on_10_percent_imagenet():
    assert get_method("ft_cluster_conditioning").gpu_s_per_image == pytest.approx(244 * 3600 / 126_861)
