"""The local kNN index format: written by the ``index`` stage, searched by retrieval's ``local`` backend.

A directory holds::

    index.faiss        faiss index over L2-normalised embeddings, inner product = cosine
    embeddings.npy     the embeddings themselves (float16), row i = faiss id i
    metadata.parquet   schema.INDEX_METADATA, row i = faiss id i
    index_info.json    CLIP model that made the embeddings, dim, size, index type
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raugment.core import schema
from raugment.core.config import InputError
from raugment.core.extras import require
from raugment.core.storage import read_parquet, read_parquet_schema

INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
METADATA = "metadata"
INFO_FILE = "index_info.json"


@dataclass
class LocalIndex:
    """An opened index: faiss search + metadata and embedding lookup by faiss id."""

    index: Any
    metadata: pa.Table
    embeddings: np.ndarray
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, dim) queries -> (scores, ids), each (q, min(k, ntotal)), most similar first."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has {self.dim} "
                             f"(built with {self.info.get('clip_model')})")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores, ids = self.index.search(q, max(1, min(int(k), self.ntotal)))
        return scores, ids

    def rows(self, ids: np.ndarray | list[int]) -> list[dict[str, Any] | None]:
        """Metadata rows (dicts of ``schema.INDEX_METADATA``) of faiss ids (-1 gives None)."""
        ids = [int(i) for i in ids]
        valid = [i for i in ids if i >= 0]
        taken = iter(self.metadata.take(pa.array(valid, pa.int64())).to_pylist())
        return [next(taken) if i >= 0 else None for i in ids]

    def vectors(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Stored embeddings of faiss ids (float32)."""
        return np.asarray(self.embeddings[np.asarray(ids, dtype=np.int64)], dtype=np.float32)


REBUILD = "rebuild it with `raugment index build`"


def _read_faiss(path: Path, flags: int = 0) -> Any:
    faiss = require("faiss")
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a readable faiss index ({first}); {REBUILD}") from None


def check_index_dir(path: str | Path, key: str) -> None:
    """Cheap checks of an index directory before any work: files present and readable, columns.

    The faiss file is opened memory-mapped, so a large index is not read twice.

    Raises:
        InputError: naming ``key``, the file and the fix.
    """
    faiss = require("faiss")
    p = Path(path)
    missing = [n for n in (INDEX_FILE, f"{METADATA}.parquet", EMBEDDINGS_FILE, INFO_FILE) if not (p / n).is_file()]
    if missing:
        raise InputError(f"{key}: {str(p)!r} is not a raugment index (missing {', '.join(missing)}); {REBUILD}")
    try:
        json.loads((p / INFO_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{key}: {p / INFO_FILE} is not valid JSON ({exc}); {REBUILD}") from None
    names = set(read_parquet_schema(p / f"{METADATA}.parquet", fix=REBUILD).names)
    lacking = [c for c in (schema.URL, schema.CAPTION) if c not in names]
    if lacking:
        raise InputError(f"{key}: {p / METADATA}.parquet lacks column(s) {lacking}; {REBUILD}")
    _read_faiss(p / INDEX_FILE, getattr(faiss, "IO_FLAG_MMAP", 0))


def open_index(path: str | Path, device: str = "cpu") -> LocalIndex:
    """Open an index directory (a stage output or ``raugment index build --out``).

    ``device="cuda"`` moves the index to all GPUs when faiss-gpu is installed (same calls).
    """
    faiss = require("faiss")
    p = Path(path)
    if not (p / INDEX_FILE).is_file():
        raise ValueError(f"{p} is not a raugment index (no {INDEX_FILE}); build one with `raugment index build`")
    index = _read_faiss(p / INDEX_FILE)
    if device.startswith("cuda") and hasattr(faiss, "index_cpu_to_all_gpus"):
        index = faiss.index_cpu_to_all_gpus(index)
    return LocalIndex(index=index, metadata=read_parquet(p / f"{METADATA}.parquet", fix=REBUILD),
                      embeddings=np.load(p / EMBEDDINGS_FILE, mmap_mode="r"),
                      info=json.loads((p / INFO_FILE).read_text()))
