"""64-bit perceptual hashes (pHash) on reduced images, and Hamming-radius search over them.

Shared by de-duplication (:mod:`raugment.stages.dedup.stage`) and the leakage audit
(:mod:`raugment.stages.audit.stage`), so both compare hashes made the same way.

* Hashing: ``imagehash.phash`` resizes its input to 32x32 with a Lanczos filter; on a 256 px image
  that resize is most of the cost (measured: 2.6k/s at 256 px vs 12.7k/s at 64 px on one core). We first
  reduce the image to a ``side`` x ``side`` grey square with a cheap box filter (same aspect
  handling as pHash: none), then hash that. ``side`` is part of the hash's definition: hashes are
  only comparable when made with the same ``side``.
* Storage: a hash is an unsigned 64-bit integer held in the ``phash`` int64 column (two's
  complement); :func:`to_codes` turns a column into FAISS binary codes (8 bytes per hash).
* Search: FAISS ``IndexBinaryFlat`` + ``range_search`` (SIMD popcount, multi-threaded), never an
  all-pairs Python loop. FAISS's radius is strict (``distance < radius``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raugment.core import schema as S
from raugment.core.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from raugment.core.storage import charge

if TYPE_CHECKING:
    from PIL import Image

    from raugment.core.config import ActorPoolConfig, ClusterConfig
    from raugment.core.storage import Artifact

log = logging.getLogger(__name__)

BITS = 64
_MASK = (1 << BITS) - 1
# Bound on one range_search call's queries, so its result buffers stay small.
QUERY_CHUNK = 65_536


def reduce_for_hash(img: Image.Image, side: int) -> Image.Image:
    """Grey ``side`` x ``side`` version of ``img``: what the pHash is computed on."""
    from PIL import Image

    grey = img.convert("L")
    if grey.size == (side, side):
        return grey
    # BOX averages every source pixel once: an anti-aliased reduction at a fraction of Lanczos' cost.
    return grey.resize((side, side), Image.Resampling.BOX)


def phash_image(img: Image.Image, side: int = 64) -> int:
    """The 64-bit pHash (unsigned int) of ``img`` reduced to ``side`` px."""
    import imagehash

    bits = imagehash.phash(reduce_for_hash(img, side)).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_bytes(data: bytes, side: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS) -> int | None:
    """pHash of encoded image bytes; ``None`` when the bytes are not a usable image."""
    try:
        # JPEGs decode straight at a reduced DCT scale: the pixels pHash never looks at are never made.
        return phash_image(decode_image(data, max_pixels=max_pixels, min_side=side), side)
    except ImageDecodeError:
        return None


def phash_batch(batch: pa.Table, side: int = 64, keep_image: bool = False,
                splits: Sequence[str] | None = None) -> pa.Table:
    """Fill the ``phash`` column of a batch of image rows (int64; null for undecodable bytes).

    Args:
        batch: rows with at least ``id`` and ``image``.
        side: reduction side, see the module docstring.
        keep_image: keep the ``image`` column (default: drop it, so hashes travel light).
        splits: keep only rows whose ``split`` is one of these (``None``: all rows).
    """
    if splits is not None:
        import pyarrow.compute as pc

        batch = batch.filter(pc.is_in(batch.column(S.SPLIT), pa.array(list(splits), pa.string())))
    hashes = [None if data is None else phash_bytes(data, side)
              for data in batch.column(S.IMAGE).to_pylist()]
    column = pa.array([None if h is None else S.phash_to_int64(h) for h in hashes], pa.int64())
    if S.PHASH in batch.column_names:
        batch = batch.set_column(batch.column_names.index(S.PHASH), S.PHASH, column)
    else:
        batch = batch.append_column(S.PHASH, column)
    return batch if keep_image else batch.drop_columns([S.IMAGE])


TASK_CPU = "_task_cpu_s"  # a Ray task's own CPU seconds, on the first row of its output batch


def _phash_batch_timed(batch: pa.Table, side: int = 64, splits: Sequence[str] | None = None) -> pa.Table:
    """:func:`phash_batch` in a Ray Data task, with the task's CPU seconds in column ``TASK_CPU``."""
    import time

    t0 = time.process_time()
    out = phash_batch(batch, side, splits=splits)
    cpu = time.process_time() - t0
    return out.append_column(TASK_CPU, pa.array([cpu] + [0.0] * (out.num_rows - 1) if out.num_rows else [],
                                                pa.float64()))


def image_files(artifact: Artifact, table: str = "images") -> list[Path]:
    """The Parquet files of ``table`` in ``artifact`` (shards, or one ``<table>.parquet``)."""
    files = artifact.files(table)
    single = artifact.path / f"{table}.parquet"
    return files if files else ([single] if single.exists() else [])


def hash_artifacts(artifacts: Iterable[Artifact], side: int, pool: ActorPoolConfig,
                   columns: Sequence[str], splits: Sequence[str] | None = None,
                   local_max_rows: int = 0, cluster: ClusterConfig | None = None) -> pa.Table:
    """Hash every image row of ``artifacts``: as Ray Data tasks, or in this process when few.

    Args:
        artifacts: inputs with an ``images`` table.
        side: reduction side (see the module docstring).
        pool: per-task CPUs and batch size of the Ray path (``concurrency`` is left to Ray Data).
        columns: columns to return besides ``phash`` (never the image bytes).
        splits: keep only rows of these splits (``None``: all rows).
        local_max_rows: inputs of at most this many rows are hashed in this process, where Ray
            Data's start-up would cost more than the hashing.
        cluster: how to reach Ray for the Ray path (``None``: Ray is already initialised).

    Returns:
        ``columns`` + ``phash`` in source order: artifacts as given, then their files, then rows;
        so without ``splits`` row ``i`` of the result is row ``i`` of the inputs read in that order.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = [str(f) for a in artifacts for f in image_files(a)]
    wanted = list(dict.fromkeys([*columns, S.ID, S.IMAGE] + ([S.SPLIT] if splits is not None else [])))
    out_schema = pa.schema([S.IMAGES.field(c) for c in columns] + [S.IMAGES.field(S.PHASH)])
    if not files:
        return out_schema.empty_table()
    if sum(pq.ParquetFile(f).metadata.num_rows for f in files) <= local_max_rows:
        tables = [phash_batch(pq.read_table(f, columns=wanted), side, splits=splits) for f in files]
    else:
        import ray.data

        from raugment.runtime.cluster import init_ray, release_idle_pools

        if cluster is not None:
            init_ray(cluster)
        release_idle_pools()  # Ray Data tasks would wait for ever on CPUs held by idle pools (hang 1)
        ds = ray.data.read_parquet(files, columns=wanted)
        # Row order is the contract (dedup's tie-break is source order), so ask Ray Data to keep it.
        ds.context.execution_options.preserve_order = True
        # Plain tasks, not an actor pool: hashing holds no model, so Ray Data may spread it over
        # every CPU of the cluster; the pool section sets each task's CPUs and batch size.
        ds = ds.map_batches(_phash_batch_timed, fn_kwargs={"side": side, "splits": splits},
                            batch_format="pyarrow", batch_size=pool.batch_size,
                            num_cpus=pool.num_cpus, num_gpus=0)
        tables = ray.get(list(ds.to_arrow_refs()))
        # the tasks' own CPU time, to the stage run this serves (stats.json usage.tasks)
        charge("tasks", sum(float(pc.sum(t.column(TASK_CPU)).as_py() or 0.0) for t in tables if t.num_rows),
               calls=len(tables))
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return out_schema.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    return table.select([*columns, S.PHASH]).cast(out_schema)


# ---- codes and distances ---------------------------------------------------------------------

def to_codes(phashes: np.ndarray | Sequence[int] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 (or unsigned) hashes -> FAISS binary codes, ``uint8`` of shape (n, 8).

    Big-endian bytes, so bit ``k`` of the code is bit ``63-k`` of the integer (the order of
    ``imagehash``'s bit matrix); Hamming distances do not depend on it anyway.
    """
    if isinstance(phashes, (pa.Array, pa.ChunkedArray)):
        if phashes.null_count:
            raise ValueError("to_codes: drop rows with a null phash first")
        phashes = phashes.to_numpy()
    if not isinstance(phashes, np.ndarray):  # Python ints, signed or unsigned (numpy would go float)
        phashes = np.array([S.phash_to_int64(int(h) & _MASK) for h in phashes], dtype=np.int64)
    arr = phashes.view(np.int64) if phashes.dtype == np.uint64 else phashes
    if arr.dtype.kind not in "iu":
        raise ValueError(f"to_codes: hashes must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    return np.ascontiguousarray(arr.astype(">i8").view(np.uint8).reshape(-1, 8))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between code rows ``a[i]`` and ``b[i]`` (both ``uint8`` (n, 8))."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(axis=1).astype(np.int32)


def range_pairs(queries: np.ndarray, references: np.ndarray,
                radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query, reference) pairs with Hamming distance ``< radius`` (strict).

    Args:
        queries: ``uint8`` codes (n, 8).
        references: ``uint8`` codes (m, 8); indexed in a FAISS ``IndexBinaryFlat``.
        radius: strict bound; for "distance <= d" pass ``d + 1``.

    Returns:
        ``(query_index, reference_index, distance)`` arrays (int64, int64, int32), sorted by query.
    """
    from raugment.core.extras import require

    faiss = require("faiss")
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32))
    if len(queries) == 0 or len(references) == 0:
        return empty
    index = faiss.IndexBinaryFlat(BITS)
    index.add(np.ascontiguousarray(references, dtype=np.uint8))
    qs, rs, ds = [], [], []
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = np.ascontiguousarray(queries[start:start + QUERY_CHUNK], dtype=np.uint8)
        lims, dist, idx = index.range_search(chunk, int(radius))
        qs.append(np.repeat(np.arange(start, start + len(chunk), dtype=np.int64),
                            np.diff(lims).astype(np.int64)))
        rs.append(idx.astype(np.int64))
        ds.append(dist.astype(np.int32))
    return np.concatenate(qs), np.concatenate(rs), np.concatenate(ds)


def self_pairs(codes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``i != j`` among ``codes`` with Hamming distance ``<= max_distance`` (both directions)."""
    q, r, d = range_pairs(codes, codes, max_distance + 1)
    other = q != r
    return q[other], r[other], d[other]
