"""What the generation tests share: a small dataset artifact with WordNet fields and odd-sized
training images (so img2img methods must restore the size), and tiny-SD generate overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from raugment.core import schema
from raugment.core.imageio import encode_image
from raugment.core.storage import Artifact, run_stage

CLASSES = [("n01491361", "tiger shark, Galeocerdo cuvieri", "requiem shark", "large dangerous shark"),
           ("n03180011", "desktop computer", "personal computer", "a computer for a desk")]
ORIGINAL_SIZE = (48, 40)  # w, h: not the generation size, so Boomerang must restore it


def generate_overrides(root: Path, model: Path, **extra) -> list[str]:
    """``--set`` overrides for fast generation on the tiny bundle ``model`` (CPU, 64 px, 2 steps)."""
    base = {"run.root": str(root), "generate.model": str(model), "generate.height": 64, "generate.width": 64,
            "generate.steps": 2, "generate.images_per_class": 4, "generate.pool.num_gpus": 0,
            "generate.pool.num_cpus": 0.5, "generate.pool.batch_size": 3, "run.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_generate_dataset(root: Path) -> Artifact:
    """A dataset artifact as the dataset stage writes it: the classes table of :data:`CLASSES` and
    two train images + one test image per class, ids ``orig-<label>-<j>``."""

    def body(run):
        run.write_single(schema.to_table(
            [{"label": i, "class_id": cid, "class_name": name, "hypernym": hyp, "definition": d, "n_train": 2}
             for i, (cid, name, hyp, d) in enumerate(CLASSES)], schema.CLASSES), "classes")
        rng = np.random.default_rng(0)
        rows = [{"id": f"orig-{i}-{j}", "label": i, "split": split, "source": "original",
                 "image": encode_image(Image.fromarray(
                     rng.integers(0, 255, (ORIGINAL_SIZE[1], ORIGINAL_SIZE[0], 3), dtype=np.uint8)), "PNG")}
                for i in range(len(CLASSES)) for j, split in enumerate(["train", "train", "test"])]
        run.write(schema.to_table(rows, schema.IMAGES), "images")

    return run_stage(root, "dataset", {"test": "generate"}, {}, body)
