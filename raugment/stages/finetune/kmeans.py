"""Inception-v3 pooled features and k-means within each class (paper 3.1, method 6).

``FT cluster conditioning`` learns one conditioning per cluster of a class's training images; the
clusters come from k-means on Inception-v3 pool features (2048-d, before the classifier head).

The pure parts (:func:`cluster_within_classes`) take arrays; :class:`InceptionFeatures` is a
callable class for ``ray.data.Dataset.map_batches`` on an actor pool, and
:func:`features_dataset` is the thin Ray wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from raugment.core import schema
from raugment.core.extras import require
from raugment.core.imageio import decode_image

log = logging.getLogger(__name__)

FEATURES = "features"


def build_inception(weights: str | None = None):
    """Inception-v3 with its classifier replaced by the identity (outputs 2048-d pool features).

    Args:
        weights: ``None`` for random weights (tests, offline), a torchvision weights name such as
            ``"IMAGENET1K_V1"`` (downloaded into the torch hub cache), or a path to a
            ``.safetensors`` state dict of ``torchvision.models.inception_v3``.
    """
    import torch
    from torchvision.models import inception_v3

    if weights is None or Path(weights).suffix == ".safetensors":
        # init_weights=False skips the slow truncated-normal init; weights come from the file or
        # stay at PyTorch's default init (random features are enough to test the clustering).
        model = inception_v3(weights=None, aux_logits=False, init_weights=False)
        if weights is not None:
            from safetensors.torch import load_file

            state = {k: v for k, v in load_file(weights).items() if not k.startswith("AuxLogits.")}
            missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.startswith("fc.")]
            if missing:
                raise ValueError(f"{weights} is not an Inception-v3 state dict (missing {missing[:3]}); "
                                 "fix finetune.feature_weights")
    else:
        model = inception_v3(weights=weights)
        model.AuxLogits = None
        model.aux_logits = False
    model.fc = torch.nn.Identity()
    return model.eval()


TASK_CPU, TASK_GPU = "_task_cpu_s", "_task_gpu_s"  # a batch's own seconds, on its first row


class InceptionFeatures:
    """``map_batches`` callable: image bytes -> Inception-v3 pool features.

    Args:
        weights: see :func:`build_inception`.
        size: input side; 299 is Inception's native size, 75 its minimum.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, weights: str | None = None, size: int = 299, device: str = "auto", gpus: float = 0.0):
        import time

        import torch

        from raugment.runtime.cluster import match_torch_threads, pick_device

        cpu0, t0 = time.process_time(), time.perf_counter()
        match_torch_threads()
        self.device = torch.device(pick_device(device))
        self.model = build_inception(weights).to(self.device)
        self.size = size
        self.gpus = gpus if self.device.type == "cuda" else 0.0
        # the model build's CPU/GPU seconds, billed with the first batch
        self._unbilled = (time.process_time() - cpu0, (time.perf_counter() - t0) * self.gpus)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import time

        cpu0, t0 = time.process_time(), time.perf_counter()
        out = self._features(batch)
        cpu, gpu = self._unbilled
        self._unbilled = (0.0, 0.0)
        n = len(out[FEATURES])
        # this actor's own CPU seconds (and GPU wall x GPUs held) for the batch, on its first row
        for name, value in ((TASK_CPU, cpu + time.process_time() - cpu0),
                            (TASK_GPU, gpu + (time.perf_counter() - t0) * self.gpus)):
            out[name] = np.array([value] + [0.0] * (n - 1) if n else [], dtype=np.float64)
        return out

    def _features(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch
        from torchvision.transforms.functional import normalize, pil_to_tensor, resize

        tensors = []
        for data in batch[schema.IMAGE]:
            img = resize(decode_image(bytes(data)), [self.size, self.size], antialias=True)
            tensors.append(pil_to_tensor(img))
        x = torch.stack(tensors).float().div(255.0)
        x = normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # ImageNet statistics
        with torch.inference_mode():
            feats = self.model(x.to(self.device)).float().cpu().numpy()
        return {schema.ID: batch[schema.ID], schema.LABEL: batch[schema.LABEL], FEATURES: list(feats)}


def features_dataset(files: list[str], split: str, weights: str | None, size: int,
                     pool) -> tuple[list[str], np.ndarray]:
    """Ray wrapper: Inception features of one split of a dataset artifact, on an actor pool.

    The images are read by Ray Data from the artifact's Parquet shards, so no image bytes pass
    through the driver.

    Args:
        files: the dataset artifact's ``images`` shard files.
        split: which split to embed (``"train"``).
        weights: see :func:`build_inception`.
        size: input side.
        pool: an :class:`~raugment.core.config.ActorPoolConfig`.

    Returns:
        (ids, features ``[n, 2048]``), in no particular order.
    """
    import ray.data
    from ray.data.expressions import col

    from raugment.core.storage import charge
    from raugment.runtime.cluster import actor_pool_args

    ds = ray.data.read_parquet(files, columns=[schema.ID, schema.LABEL, schema.SPLIT, schema.IMAGE])
    ds = ds.filter(expr=col(schema.SPLIT) == split)
    args = actor_pool_args(pool)
    out = ds.map_batches(InceptionFeatures, batch_format="numpy", **args,
                         fn_constructor_kwargs={"weights": weights, "size": size,
                                                "gpus": float(args.get("num_gpus") or 0.0)}).to_pandas()
    if not out.empty:  # the actors' own seconds, to the stage run this serves (stats.json usage.tasks)
        charge("tasks", float(out[TASK_CPU].sum()), float(out[TASK_GPU].sum()),
               calls=int((out[TASK_CPU] > 0).sum()))
    if out.empty:
        return [], np.zeros((0, 2048), dtype=np.float32)
    return out[schema.ID].tolist(), np.stack(out[FEATURES].to_list()).astype(np.float32)


def cluster_within_classes(labels: np.ndarray, features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means inside each class; every item gets a cluster index in ``[0, k_c)``.

    ``k_c = min(k, items of the class)``; clusters are renumbered so that none is empty (k-means can
    merge identical points) and ordered by size, largest first, for a readable table.

    Args:
        labels: ``[n]`` class of each item.
        features: ``[n, d]`` feature of each item.
        k: clusters per class (the paper sweeps 1, 5, 10, 15).
        seed: k-means seed.

    Returns:
        ``[n]`` cluster index of each item within its class.
    """
    if k < 1:
        raise ValueError(f"finetune.clusters must be >= 1, got {k}")
    labels = np.asarray(labels)
    if len(labels) != len(features):
        raise ValueError(f"{len(labels)} labels but {len(features)} feature rows")
    clusters = np.zeros(len(labels), dtype=np.int64)
    if k == 1:
        return clusters
    KMeans = require("sklearn.cluster").KMeans
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        k_c = min(k, len(idx))
        if k_c < k:
            log.warning("class %s has %d images: %d clusters instead of %d", label, len(idx), k_c, k)
        if k_c == 1:
            continue
        assign = KMeans(n_clusters=k_c, n_init=4, random_state=seed).fit_predict(features[idx])
        # renumber by size (largest first) so that no cluster index is empty
        ids, counts = np.unique(assign, return_counts=True)
        rank = {c: r for r, c in enumerate(ids[np.argsort(-counts, kind="stable")])}
        clusters[idx] = [rank[c] for c in assign]
    return clusters
