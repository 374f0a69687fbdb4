"""Near-duplicate removal among added images, across classes and methods (stage ``dedup``).

Two images are near-duplicates when their 64-bit pHashes (:mod:`raugment.lib.hashing`) differ in at
most ``dedup.max_distance`` bits and, if ``dedup.clip_cosine`` is set, their CLIP image embeddings
also have cosine >= that value. Pairs come from a FAISS binary range search, never all pairs.

Which copy stays: the **highest-ranked**, meaning the lowest ``rank`` (retrieval: most similar to
the prompt; generation: made first), rows without a rank after all ranked ones, ties broken by
the input's position (inputs in the order given), then by image id — never by the order of rows
or shards inside an input, which follows how a stage happened to write them (worker timing, a
resumed run) and would make the kept set differ between two runs of the same study.

How clusters are resolved: **greedy by rank**, not union-find. Walking images from the highest to
the lowest rank, an image is kept unless it is a near-duplicate of an image already kept; then its
own near-duplicates are dropped in its favour. Union-find would merge chains (A~B, B~C with A and C
far apart) into one cluster and keep only A, dropping C although nothing kept resembles it. Greedy
guarantees both halves of the contract: every dropped image has a kept, higher-ranked copy within
the threshold (``duplicate_of``), and no two kept images are near-duplicates.

Output: ``images`` (kept rows, ``phash`` filled), ``dropped`` (``reason`` = ``duplicate`` with
``duplicate_of`` and ``distance``, or ``undecodable``); stats count duplicates by class and method.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.storage import Artifact, StageRun, run_stage

log = logging.getLogger(__name__)

STAGE = "dedup"
DUPLICATE = "duplicate"
UNDECODABLE = "undecodable"
NO_RANK = np.iinfo(np.int64).max
# Columns carried through hashing (everything dedup decides with; the bytes stay on disk).
LIGHT_COLUMNS = [S.ID, S.LABEL, S.CLASS_NAME, S.SOURCE, S.METHOD, S.RANK]


@dataclass
class DedupPlan:
    """Which rows stay.

    Attributes:
        keep: bool (n,).
        duplicate_of: int64 (n,), index of the kept copy a dropped row lost to (-1: not a duplicate).
        distance: int32 (n,), Hamming distance to that copy (-1: not a duplicate).
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    distance: np.ndarray


def priority_order(ranks: Sequence[int | None], ties: Sequence[Any] | None = None) -> np.ndarray:
    """Row indices from highest- to lowest-ranked: lowest rank first, no rank last, then by ``ties``
    (e.g. (input position, id) pairs; row order when not given)."""
    r = np.array([NO_RANK if x is None else int(x) for x in ranks], dtype=np.int64)
    if ties is None:
        return np.argsort(r, kind="stable")
    return np.array(sorted(range(len(r)), key=lambda i: (r[i], ties[i])), dtype=np.int64)


def greedy_by_rank(n: int, q: np.ndarray, r: np.ndarray, d: np.ndarray, order: np.ndarray) -> DedupPlan:
    """Resolve near-duplicate pairs greedily in ``order`` (see the module docstring).

    Args:
        n: number of rows.
        q, r, d: the near-duplicate pairs (both directions) and their distances.
        order: row indices, highest priority first (:func:`priority_order`).
    """
    by_q = np.argsort(q, kind="stable")
    q, r, d = q[by_q], r[by_q], d[by_q]
    starts = np.searchsorted(q, np.arange(n + 1))
    keep = np.zeros(n, dtype=bool)
    decided = np.zeros(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, -1, dtype=np.int32)
    for i in order:
        if decided[i]:
            continue
        keep[i] = decided[i] = True
        lo, hi = starts[i], starts[i + 1]
        if lo == hi:
            continue
        nb, nd = r[lo:hi], d[lo:hi]
        fresh = ~decided[nb]
        nb, nd = nb[fresh], nd[fresh]
        decided[nb] = True
        duplicate_of[nb] = i
        distance[nb] = nd
    return DedupPlan(keep, duplicate_of, distance)


def confirm_by_cosine(q: np.ndarray, r: np.ndarray, embeddings: np.ndarray, min_cosine: float) -> np.ndarray:
    """The second test: bool mask of pairs whose L2-normalised embeddings have cosine >= ``min_cosine``."""
    return np.einsum("nd,nd->n", embeddings[q], embeddings[r]) >= min_cosine


def plan_dedup(codes: np.ndarray, ranks: Sequence[int | None], max_distance: int,
               embeddings: np.ndarray | None = None, min_cosine: float | None = None,
               ties: Sequence[Any] | None = None) -> DedupPlan:
    """The pure core: pHash codes (+ optional embeddings) and ranks -> which rows stay.

    Args:
        codes: ``uint8`` (n, 8) pHash codes (:func:`raugment.lib.hashing.to_codes`).
        ranks: per-row rank (lower = better; ``None`` = unranked).
        max_distance: near-duplicates differ in at most this many bits.
        embeddings: (n, d) L2-normalised CLIP embeddings for the second test (rows not in any pHash
            pair are never read, so they may be zeros).
        min_cosine: the second test's threshold; ``None`` skips it.
        ties: per-row key that orders rows of equal rank (default: row order).
    """
    from raugment.lib.hashing import self_pairs

    q, r, d = self_pairs(codes, max_distance)
    if min_cosine is not None:
        if embeddings is None:
            raise ValueError("plan_dedup: min_cosine needs embeddings")
        ok = confirm_by_cosine(q, r, embeddings, min_cosine)
        q, r, d = q[ok], r[ok], d[ok]
    return greedy_by_rank(len(codes), q, r, d, priority_order(ranks, ties))


# ---- the stage -------------------------------------------------------------------------------

def _row_counts(files: Sequence[Path]) -> list[int]:
    import pyarrow.parquet as pq

    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def _embed_rows(cfg: Config, files: Sequence[Path], offsets: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """CLIP embeddings of the given global rows (others stay zero): only images in a pHash pair."""
    import pyarrow.parquet as pq

    from raugment.core.imageio import decode_image
    from raugment.models.clip import load_clip

    encoder = load_clip(cfg.dedup.clip_model, cfg.dedup.clip_pretrained, cfg.dedup.device)
    out = np.zeros((n, encoder.dim), dtype=np.float32)
    for k, f in enumerate(files):
        mine = rows[(rows >= offsets[k]) & (rows < offsets[k + 1])]
        if len(mine):
            data = pq.read_table(f, columns=[S.IMAGE]).column(S.IMAGE).take(pa.array(mine - offsets[k]))
            out[mine] = encoder.embed_images([decode_image(b) for b in data.to_pylist()])
    return out


def _no_images(a: Artifact) -> str:
    """Why ``a`` gives dedup nothing: a stage that dropped every image (named with its reasons), or
    not an added-image artifact at all."""
    stats = a.stats if a.complete else {}
    counts, failures = stats.get("counts", {}), stats.get("failures", {})
    if counts.get("input") and not counts.get("kept"):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1]))
        return (f"{a.path}: stage {a.stage!r} kept none of its {counts['input']} images ({reasons}); "
                f"nothing is left to de-duplicate: check the {a.stage} section's filters and thresholds")
    return f"{a.path} has no images table; pass generation/retrieval/filter outputs"


def run(cfg: Config, added: Sequence[Artifact]) -> Artifact:
    """De-duplicate the union of ``added`` artifacts (stage ``dedup``).

    Args:
        cfg: the whole config; reads ``dedup`` (and ``cluster`` to reach Ray).
        added: artifacts with an ``images`` table, in priority order (it breaks rank ties).
    """
    from raugment.lib.hashing import image_files

    added = list(added)
    if not added:
        raise ValueError("dedup.run needs at least one added-image artifact")
    for a in added:
        if not image_files(a):
            raise ValueError(_no_images(a))
    section = cfg.dedup

    def body(run: StageRun) -> None:
        import pyarrow.parquet as pq

        from raugment.lib.hashing import hash_artifacts, to_codes

        per_input = [image_files(a) for a in added]
        files = [f for fs in per_input for f in fs]
        counts = _row_counts(files)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        light = hash_artifacts(added, section.hash_side, section.pool, LIGHT_COLUMNS,
                               local_max_rows=section.local_rows, cluster=cfg.cluster)
        if light.num_rows != offsets[-1]:
            raise RuntimeError(f"hashing returned {light.num_rows} rows for {offsets[-1]} inputs")
        n = light.num_rows
        phash = light.column(S.PHASH)
        valid = np.flatnonzero(phash.is_valid().to_numpy(zero_copy_only=False))
        codes = to_codes(phash.take(pa.array(valid)))
        ranks = light.column(S.RANK).take(pa.array(valid)).to_pylist()
        # equal ranks: the input's position, then the id (never the row order inside an input)
        source = np.repeat([i for i, fs in enumerate(per_input) for _ in fs], counts)
        ids = light.column(S.ID).to_pylist()
        ties = [(int(source[v]), ids[v]) for v in valid]
        embeddings = None
        if section.clip_cosine is not None:
            from raugment.lib.hashing import self_pairs

            q, r, _ = self_pairs(codes, section.max_distance)
            involved = valid[np.unique(np.concatenate([q, r]))]
            embeddings = _embed_rows(cfg, files, offsets, involved, n)[valid]
        plan = plan_dedup(codes, ranks, section.max_distance, embeddings, section.clip_cosine, ties)

        keep = np.zeros(n, dtype=bool)
        keep[valid[plan.keep]] = True
        for k, f in enumerate(files):
            table = pq.read_table(f)
            lo, hi = offsets[k], offsets[k + 1]
            if table.column(S.ID).to_pylist() != light.column(S.ID).slice(lo, hi - lo).to_pylist():
                raise RuntimeError(f"row order of {f} changed during hashing; cannot align hashes")
            mask = pa.array(keep[lo:hi])
            kept = S.conform(table.filter(mask), S.IMAGES)
            kept = kept.set_column(kept.column_names.index(S.PHASH), S.IMAGES.field(S.PHASH),
                                   phash.slice(lo, hi - lo).filter(mask))
            run.write(kept, "images", shard=f"{k:05d}")
        dropped = _dropped_table(light, valid, plan)
        run.write(dropped, "dropped", shard="00000")
        _stats(run, light, dropped, int(keep.sum()))

    inputs = {f"added{i}": a for i, a in enumerate(added)}
    return run_stage(cfg.run.root, STAGE, section, inputs, body)


def _dropped_table(light: pa.Table, valid: np.ndarray, plan: DedupPlan) -> pa.Table:
    """Duplicates (with the id of the kept copy and the distance) and undecodable rows."""
    ids = light.column(S.ID).to_numpy(zero_copy_only=False)
    undecodable = np.setdiff1d(np.arange(light.num_rows), valid)
    dup_local = np.flatnonzero(~plan.keep)
    dup_rows = valid[dup_local]
    rows = np.concatenate([dup_rows, undecodable])
    base = light.select([c for c in LIGHT_COLUMNS if c != S.ID]).take(pa.array(rows, pa.int64()))
    n_dup = len(dup_rows)
    columns = {S.ID: pa.array(ids[rows], pa.string()), **{c: base.column(c) for c in base.column_names},
               S.REASON: pa.array([DUPLICATE] * n_dup + [UNDECODABLE] * len(undecodable)),
               S.DUPLICATE_OF: pa.array(list(ids[valid[plan.duplicate_of[dup_local]]]) + [None] * len(undecodable),
                                        pa.string()),
               S.DISTANCE: pa.array(list(plan.distance[dup_local]) + [None] * len(undecodable), pa.int32())}
    return S.conform(pa.table(columns), S.DROPPED)


def _stats(run: StageRun, light: pa.Table, dropped: pa.Table, kept: int) -> None:
    run.stats.add("input", light.num_rows)
    run.stats.add("kept", kept)
    run.stats.add("dropped", dropped.num_rows)
    reasons = dropped.column(S.REASON).to_pylist()
    for reason, k in Counter(reasons).items():
        run.stats.fail(reason, k)
    label_of = dict(zip(light.column(S.ID).to_pylist(), light.column(S.LABEL).to_pylist()))
    dups = [i for i, reason in enumerate(reasons) if reason == DUPLICATE]
    classes = dropped.column(S.CLASS_NAME).to_pylist()
    labels = dropped.column(S.LABEL).to_pylist()
    methods = dropped.column(S.METHOD).to_pylist()
    of = dropped.column(S.DUPLICATE_OF).to_pylist()
    run.stats.extra["duplicates_by_class"] = dict(Counter(classes[i] or str(labels[i]) for i in dups))
    run.stats.extra["duplicates_by_method"] = dict(Counter(str(methods[i]) for i in dups))
    run.stats.extra["cross_class_duplicates"] = sum(labels[i] != label_of.get(of[i]) for i in dups)
    run.stats.extra["resolution"] = "greedy-by-rank"
