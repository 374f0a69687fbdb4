"""Readers of stage artifacts that several stages (and the study and report) use.

A stage's artifact layout is its own; what another package may read of it is named here, so stages
meet through these files and never import each other:

* ``dataset``: the ``classes`` table and the ``images`` shards by split;
* ``audit``: ``pairs`` (leakage candidates), ``summary.json``, the gallery;
* ``train``: ``results.json`` and the classifier bundle in ``model/``;
* the demo's ``mini_models`` artifact: its ``mini_models.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from raugment.core import schema as S
from raugment.core.storage import Artifact, read_parquet

# ---- dataset ---------------------------------------------------------------------------------

SPLIT_ORDER = ("train", "val", "test", "unused")


def read_classes(artifact: Artifact) -> pa.Table:
    """The ``classes`` table (label, class_id, class_name, hypernym, definition, n_train)."""
    return artifact.read("classes")


def read_split(artifact: Artifact, split: str, columns: list[str] | None = None) -> pa.Table:
    """Rows of ``images`` in ``split`` (train/val/test/unused).

    Shards hold one split each, so the Parquet row-group statistics let the filter skip the
    other splits' image bytes without reading them.
    """
    if split not in SPLIT_ORDER:
        raise ValueError(f"split must be one of {SPLIT_ORDER}, got {split!r}")
    files = artifact.files("images")
    if not files:
        return artifact.read("images", columns=columns, schema=S.IMAGES)  # empty, with the schema
    read_cols = None if columns is None else list(dict.fromkeys([*columns, S.SPLIT]))
    tables = [read_parquet(f, read_cols, filters=[(S.SPLIT, "=", split)], fix=artifact.repair_hint)
              for f in files]
    table = pa.concat_tables(tables)
    return table if columns is None or S.SPLIT in columns else table.drop_columns([S.SPLIT])


def class_counts(artifact: Artifact, split: str = "train") -> dict[int, int]:
    """label -> number of images of ``split`` (every class of the table, zeros included)."""
    labels = read_classes(artifact).column(S.LABEL).to_pylist()
    counts = Counter(read_split(artifact, split, columns=[S.LABEL]).column(S.LABEL).to_pylist())
    return {lab: counts.get(lab, 0) for lab in labels}


# ---- audit -----------------------------------------------------------------------------------

PAIRS_TABLE = "pairs"
SUMMARY = "summary.json"
GALLERY = "gallery.html"
GALLERY_DIR = "gallery"


def candidate_ids(artifact: Artifact) -> set[str]:
    """Ids of added images with a leakage candidate (what ``assemble.leakage: remove`` removes)."""
    return set(artifact.read(PAIRS_TABLE, columns=[S.ADDED_ID]).column(S.ADDED_ID).to_pylist())


def read_summary(artifact: Artifact) -> dict[str, Any]:
    """The audit's ``summary.json`` (the report quotes ``leakage_rate``)."""
    return json.loads((artifact.path / SUMMARY).read_text())


# ---- train -----------------------------------------------------------------------------------

RESULTS_FILE = "results.json"
MODEL_DIR = "model"


def read_results(artifact: Artifact) -> dict[str, Any]:
    """``results.json`` of a train artifact."""
    return json.loads((artifact.path / RESULTS_FILE).read_text())


# ---- the demo's mini_models artifact ------------------------------------------------------------

MINI_MODELS_INFO = "mini_models.json"
