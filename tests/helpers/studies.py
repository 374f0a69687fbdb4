"""A small valid study on disk (a tiny ImageFolder and a stand-in diffusers directory) and the Ray
tripwire's exception: what the bad-input sweep and the preflight tests break one key at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

COLOURS = {"000.red_circle": (220, 40, 40), "001.blue_square": (40, 80, 225)}


class RayStarted(BaseException):
    """The tripwire: raised where a stage would start Ray (not an Exception, so that a study with
    ``keep_going`` cannot record it as one failed stage and go on)."""


def _png(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 8, (16, 16, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, classes: dict[str, tuple[int, int, int]] = COLOURS, train: int = 4,
                test: int = 2) -> Path:
    for i, (name, colour) in enumerate(classes.items()):
        for j in range(train):
            _png(root / "train" / name / f"{j}.png", colour, 100 * i + j)
        for j in range(test):
            _png(root / "test" / name / f"{j}.png", colour, 1000 + 100 * i + j)
    return root


def valid_study(base: Path, methods: list[str], **study: Any) -> dict[str, Path]:
    """Write ``base/study.yaml``, a study of ``methods`` that passes every check on this machine
    (``study``: more keys of its section). Returns base, folder, sd and study (the YAML's path)."""
    folder = make_folder(base / "data")
    sd = base / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text("{}")
    cfg = {
        "run": {"root": str(base / "runs"), "progress": False},
        "cluster": {"num_cpus": 2, "num_gpus": 0},
        "dataset": {"source": "imagefolder", "path": str(folder), "protocol": "subsample", "fraction": 0.5},
        "generate": {"model": str(sd), "pool": {"num_gpus": 0}},
        "finetune": {"model": str(sd)},
        "index": {"source": "images", "path": str(folder / "train")},
        "retrieve": {"backend": "local", "aesthetic_model": "random"},
        "filter": {"filters": ["min_size"]},
        "train": {"model": "tiny_cnn", "batch_size": 8, "workers": {"num_workers": 1}},
        "study": {"methods": methods, "ratios": [100], "sets": 1, **study},
    }
    path = base / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"base": base, "folder": folder, "sd": sd, "study": path}
