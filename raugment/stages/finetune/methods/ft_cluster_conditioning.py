"""Method 6: FT cluster conditioning, one learned conditioning per k-means cluster of each class.

The images of each class are clustered (k = ``finetune.clusters``) on Inception-v3 pool features
(``feature_weights``: a torchvision weights name, a ``.safetensors`` file, or null = random;
images resized to ``feature_size``; computed on the ``feature_pool`` actors); the generator draws
a class's clusters in proportion to their size. With ``clusters: 1`` it is FT conditioning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raugment.core.config import ActorPoolConfig, ConfigError, PluginSettings, positive
from raugment.lib.finetuned.families import ConditioningFamily
from raugment.stages.finetune.methods import FINETUNERS, FinetuneMethod, paper_gpu_s_per_image

if TYPE_CHECKING:  # pragma: no cover
    from raugment.core.storage import Artifact

log = logging.getLogger(__name__)


@dataclass
class Settings(PluginSettings):
    """k of the k-means clustering and the Inception-v3 features it runs on."""

    clusters: int = 1
    feature_weights: str | None = "IMAGENET1K_V1"
    feature_size: int = 299
    feature_pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=32))

    def validate(self, key: str) -> None:
        positive(self.clusters, f"{key}.clusters")
        if self.feature_size < 75:
            raise ConfigError(f"{key}.feature_size must be >= 75 (Inception-v3's minimum input)")


@FINETUNERS.register("ft_cluster_conditioning")
class FtClusterConditioning(FinetuneMethod, ConditioningFamily):
    """⑥ One conditioning per k-means cluster (Inception-v3 features) of each class."""

    name = "ft_cluster_conditioning"
    settings = Settings
    gpu_s_per_image = paper_gpu_s_per_image(244)

    def cluster_images(self, cfg: Any, dataset: Artifact, ids: list[str], labels: list[int]) -> np.ndarray:
        s = Settings.of(cfg.finetune)
        if s.clusters == 1:
            return super().cluster_images(cfg, dataset, ids, labels)
        from raugment.runtime.cluster import init_ray
        from raugment.stages.finetune.kmeans import cluster_within_classes, features_dataset

        if s.feature_weights is None:
            log.warning("finetune.feature_weights is null: clustering on random Inception-v3 features")
        init_ray(cfg.cluster, progress=cfg.run.progress)
        got, feats = features_dataset([str(f) for f in dataset.files("images")], "train", s.feature_weights,
                                      s.feature_size, s.feature_pool)
        position = {i: n for n, i in enumerate(got)}
        missing = [i for i in ids if i not in position]
        if missing:
            raise RuntimeError(f"no Inception features for {len(missing)} training images, e.g. {missing[0]}")
        feats = feats[[position[i] for i in ids]]
        return cluster_within_classes(np.asarray(labels), feats, s.clusters, seed=cfg.finetune.seed)
