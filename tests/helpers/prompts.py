"""Class records of the prompt methods' tests (rows of a dataset's classes table)."""

from __future__ import annotations

import numpy as np

TIGER_SHARK = {"class_id": "n01491361", "class_name": "tiger shark, Galeocerdo cuvieri",
               "hypernym": "requiem shark", "definition": "large dangerous warm-water shark"}
DESKTOP = {"class_id": "n03180011", "class_name": "desktop computer", "hypernym": "personal computer",
           "definition": "a personal computer small enough to fit conveniently in an individual workspace"}
CALTECH = {"class_id": "001.ak47", "class_name": "ak47", "hypernym": None, "definition": None}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
