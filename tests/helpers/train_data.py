"""Tiny stage artifacts for the training tests: a dataset and added-image pools, built in-process.

They follow the agreed artifact layout (dataset: table ``images`` with split train/val/test +
``classes.parquet``; added: table ``images`` with source generated/retrieved and ``rank``), drawn
with :func:`raugment.stages.dataset.sources.synthetic.draw` so a small CNN can learn them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raugment.core import schema as S
from raugment.core.imageio import encode_image, item_id
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES, draw


def _image_row(label: int, rng: np.random.Generator, size: int, **fields) -> dict:
    img = draw(label, rng, size)
    return {S.LABEL: label, S.CLASS_NAME: SYNTHETIC_CLASSES[label], S.CLASS_ID: str(label),
            S.IMAGE: encode_image(img, "PNG"), S.WIDTH: size, S.HEIGHT: size, **fields}


def make_dataset(root: Path, train_counts: list[int], val: int = 4, test: int = 4, size: int = 32,
                 seed: int = 0, shard_rows: int = 16) -> Artifact:
    """A dataset artifact: per class ``train_counts[c]`` train images and ``val``/``test`` each."""
    rng = np.random.default_rng(seed)

    def body(run: StageRun) -> None:
        rows = []
        for label, n_train in enumerate(train_counts):
            for split, n in (("train", n_train), ("val", val), ("test", test)):
                for i in range(n):
                    rows.append(_image_row(label, rng, size, **{
                        S.ID: item_id("orig", label, split, i), S.SPLIT: split,
                        S.SOURCE: "original", S.METHOD: "original"}))
        order = rng.permutation(len(rows))  # shards mix classes and splits, as real ones do
        rows = [rows[i] for i in order]
        for k in range(0, len(rows), shard_rows):
            run.write(S.to_table(rows[k:k + shard_rows]), "images", shard=f"{k // shard_rows:05d}")
        run.write_single(S.to_table([{S.LABEL: c, S.CLASS_ID: str(c), S.CLASS_NAME: SYNTHETIC_CLASSES[c],
                                      S.COUNT_TRAIN: n} for c, n in enumerate(train_counts)], S.CLASSES),
                         "classes")

    return run_stage(root, "dataset", {"counts": train_counts, "seed": seed, "size": size}, {}, body)


def make_added(root: Path, method: str, per_class: list[int], source: str = "generated",
               size: int = 32, seed: int = 1, with_images: bool = True) -> Artifact:
    """An added-image artifact with ``per_class[c]`` images of class c, ranked 0..n-1 per class."""
    rng = np.random.default_rng(seed)

    def body(run: StageRun) -> None:
        rows = []
        for label, n in enumerate(per_class):
            for i in range(n):
                fields = {S.ID: item_id(f"{source}-{method}", label, i), S.SPLIT: "added",
                          S.SOURCE: source, S.METHOD: method, S.RANK: i}
                rows.append(_image_row(label, rng, size, **fields) if with_images
                            else {S.LABEL: label, **fields})
        run.write(S.to_table(rows), "images", shard="0")

    return run_stage(root, f"added-{method}", {"n": per_class, "source": source, "seed": seed}, {}, body)
