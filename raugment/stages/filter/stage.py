"""The filter stage: score every added image, keep those that pass, record why the others left.

Filters are plug-ins, one module each in :mod:`raugment.stages.filter.filters` (registry
``FILTERS``: ``min_size``, ``nsfw``, ``aesthetic``, ``clip_similarity``). Each is a class built once
per Ray actor from the resolved :class:`~raugment.stages.filter.config.FilterConfig` and a shared
:class:`~raugment.stages.filter.filters.FilterContext` (which loads CLIP once for every CLIP-based
filter), called on a decoded batch. :func:`filter_batch` applies the configured filters to one Arrow batch, and
:func:`run` maps it over spans of the input's shards on a leased :class:`~raugment.runtime.cluster.ActorGroup`
(``cfg.filter.pool``; inside a study the same actors, and with equal settings the same loaded
models, serve every filter run).

Output (stage ``filter``): ``images`` with the kept rows (score columns and ``filters`` filled),
``dropped`` (schema ``DROPPED``) with one row per dropped image: ``reason`` = the first filter it
failed in the configured order, ``detail`` = every filter it failed, ``score`` = the deciding score.
``stats.json`` counts drops by reason, by filter and by class.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.core.imageio import ImageDecodeError, decode_image
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.stages.filter.config import FilterConfig
from raugment.stages.filter.filters import FILTERS, FilterContext, FilterFn, FilterOutcome

log = logging.getLogger(__name__)

STAGE = "filter"
UNDECODABLE = "undecodable"
# Transient columns carried from the actors to the writer (not part of the images schema).
_REASON, _DETAIL, _SCORE = "_reason", "_detail", "_score"


def build_filters(cfg: FilterConfig) -> list[tuple[str, FilterFn]]:
    """Instantiate the configured filters in order (loads their models); a filter that
    ``cfg.only_on`` limits to some sources is wrapped by :func:`only_on`."""
    ctx = FilterContext(cfg)
    out: list[tuple[str, FilterFn]] = []
    for name in cfg.filters:
        fn: FilterFn = FILTERS.get(name)(cfg, ctx)
        if name in cfg.only_on:
            fn = only_on(fn, cfg.only_on[name])
        out.append((name, fn))
    return out


def only_on(fn: FilterFn, sources: Sequence[str]) -> FilterFn:
    """``fn`` judging only rows whose ``source`` is in ``sources``: the others pass (scores kept)."""
    keep = frozenset(sources)

    def judged(images: Sequence[Any], batch: pa.Table) -> FilterOutcome:
        out = fn(images, batch)
        of = batch.column(S.SOURCE).to_pylist() if S.SOURCE in batch.column_names else [None] * batch.num_rows
        applies = np.array([s in keep for s in of], dtype=bool)
        return FilterOutcome(out.passed | ~applies, out.scores, out.column)

    return judged


def preflight(cfg: Config) -> None:
    """Checks before a study starts Ray (:func:`resolve_config`)."""
    resolve_config(cfg)


def resolve_config(cfg: Config) -> FilterConfig:
    """``cfg.filter`` with defaults filled from other sections (e.g. ``safety_model`` from
    ``generate.model``, by the ``nsfw`` filter); checks settings before any work.

    Raises:
        ConfigError: unknown filter names, or a listed filter that cannot run (e.g. without its model).
    """
    section = cfg.filter
    unknown = [f for f in section.filters if f not in FILTERS]
    if unknown:
        raise ConfigError(f"filter.filters: unknown filter(s) {unknown}; known: {', '.join(FILTERS.names())}")
    if not section.filters:
        raise ConfigError("filter.filters is empty; list at least one of " + ", ".join(FILTERS.names()))
    for name in section.filters:
        FILTERS.get(name).check(section)
    # Every registered filter fills its keys' defaults (the resolved section keys the output).
    for name in FILTERS.names():
        section = FILTERS.get(name).resolve(section, cfg)
    return section


# ---- one batch -------------------------------------------------------------------------------

def _decode_all(data: list[bytes | None]) -> tuple[list[Any], list[str | None]]:
    images: list[Any] = []
    errors: list[str | None] = []
    for blob in data:
        try:
            images.append(decode_image(blob or b""))
            errors.append(None)
        except ImageDecodeError as exc:
            images.append(None)
            errors.append(exc.reason)
    return images, errors


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def filter_batch(batch: pa.Table, filters: Sequence[tuple[str, FilterFn]]) -> pa.Table:
    """Apply ``filters`` in order to a batch of image rows.

    Every filter scores every decodable row (so scores are complete). Returns the batch with score
    columns, ``width``/``height`` and ``filters`` (existing names + those passed) filled, plus the
    transient columns ``_reason`` (``None`` = kept; else the first failed filter, or
    ``"undecodable"``), ``_detail`` (all failed filters, or the decode error) and ``_score``.
    """
    n = batch.num_rows
    images, errors = _decode_all(batch.column(S.IMAGE).to_pylist())
    ok = np.array([e is None for e in errors], dtype=bool)
    good = [im for im in images if im is not None]
    sub = batch.filter(pa.array(ok))
    failed: list[list[str]] = [[] for _ in range(n)]
    first_score: list[float | None] = [None] * n
    passed_names: list[list[str]] = [[] for _ in range(n)]
    columns: dict[str, np.ndarray] = {}
    rows = np.flatnonzero(ok)
    for name, fn in filters:
        out = fn(good, sub) if len(good) else FilterOutcome(np.zeros(0, bool), np.zeros(0, np.float32))
        if out.column:
            col = columns.setdefault(out.column, np.full(n, np.nan, np.float32))
            col[rows] = out.scores
        for r, p, s in zip(rows, out.passed, out.scores):
            if p:
                passed_names[r].append(name)
            else:
                if not failed[r]:
                    first_score[r] = float(s)
                failed[r].append(name)
    reasons = [UNDECODABLE if not ok[i] else (failed[i][0] if failed[i] else None) for i in range(n)]
    details = [errors[i] if not ok[i] else (",".join(failed[i]) or None) for i in range(n)]

    for column, values in columns.items():
        old = batch.column(column).to_numpy(zero_copy_only=False) if column in batch.column_names else None
        if old is not None:  # keep an upstream score where this batch could not compute one
            values = np.where(np.isnan(values), old.astype(np.float32), values)
        batch = _set(batch, column, pa.array(values, pa.float32(), from_pandas=True))
    ws = [im.width if im is not None else None for im in images]
    hs = [im.height if im is not None else None for im in images]
    batch = _set(batch, S.WIDTH, pa.array(ws, pa.int32()))
    batch = _set(batch, S.HEIGHT, pa.array(hs, pa.int32()))
    prior = batch.column(S.FILTERS).to_pylist() if S.FILTERS in batch.column_names else [None] * n
    merged = [list(dict.fromkeys([*(p or []), *names])) for p, names in zip(prior, passed_names)]
    batch = _set(batch, S.FILTERS, pa.array(merged, pa.list_(pa.string())))
    batch = _set(batch, _REASON, pa.array(reasons, pa.string()))
    batch = _set(batch, _DETAIL, pa.array(details, pa.string()))
    return _set(batch, _SCORE, pa.array(first_score, pa.float32()))


def split_batch(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A :func:`filter_batch` result -> (kept rows as ``IMAGES``, dropped rows as ``DROPPED``)."""
    import pyarrow.compute as pc

    drop = pc.is_valid(batch.column(_REASON))
    kept = batch.filter(pc.invert(drop)).drop_columns([_REASON, _DETAIL, _SCORE])
    gone = batch.filter(drop)
    dropped = {c: gone.column(c) for c in (S.ID, S.LABEL, S.CLASS_NAME, S.SOURCE, S.METHOD, S.RANK)
               if c in gone.column_names}
    dropped.update({S.REASON: gone.column(_REASON), S.DETAIL: gone.column(_DETAIL),
                    S.SCORE: gone.column(_SCORE)})
    return S.conform(kept, S.IMAGES), S.conform(pa.table(dropped), S.DROPPED)


# Rows per pool call: a call reads this many rows of one input file in its actor (the models see
# them in batches of ``filter.pool.batch_size``). Output shards hold the results of a fixed row
# range of one input file (SHARD_ROWS, a multiple of SPAN_ROWS), named by it: a resumed run
# redoes only unfinished ranges and writes the same shards an uninterrupted run writes, so what
# trains on them never depends on where a kill landed.
SPAN_ROWS = 256
SHARD_ROWS = 1024


class FilterBatch:
    """The object a filter actor hosts: builds the filters once (models loaded once), then filters
    spans of input files read in the actor (no image bytes pass through the driver on the way in).

    Inside a study the same actors host it for every filter run; equal filter settings keep the
    object, so its models are loaded once per study.
    """

    def __init__(self, cfg: FilterConfig):
        self.filters = build_filters(cfg)
        self.batch_size = cfg.pool.batch_size
        self._file: tuple[str, pa.Table] | None = None  # the last file read (spans of it come in a row)

    def span(self, work: tuple[str, int, int]) -> pa.Table:
        """``work`` = (Parquet file, first row, end row) -> :func:`filter_batch` of those rows."""
        import pyarrow.parquet as pq

        path, start, stop = work
        if self._file is None or self._file[0] != path:
            self._file = (path, pq.read_table(path))
        rows = self._file[1].slice(start, stop - start)
        parts = [filter_batch(rows.slice(i, self.batch_size), self.filters)
                 for i in range(0, rows.num_rows, self.batch_size)]
        return pa.concat_tables(parts) if parts else filter_batch(rows, self.filters)


def output_shard(file_index: int, start: int, shard_rows: int) -> str:
    """Name of the output shard holding input file ``file_index``'s rows around ``start``."""
    return f"f{file_index:05d}-r{start // shard_rows:06d}"


def plan_spans(files: Sequence[Any], done: set[str], span_rows: int | None = None,
               shard_rows: int | None = None) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(output shard, its pool calls) for every output shard not written yet, in file order; a call
    is (file, start, stop) and covers rows of one shard only."""
    import pyarrow.parquet as pq

    span_rows = span_rows or SPAN_ROWS
    shard_rows = max(shard_rows or SHARD_ROWS, span_rows) // span_rows * span_rows
    plan: dict[str, list[tuple[str, int, int]]] = {}
    for k, f in enumerate(files):
        n = pq.ParquetFile(str(f)).metadata.num_rows
        for start in range(0, n, span_rows):
            shard = output_shard(k, start, shard_rows)
            if shard not in done:
                plan.setdefault(shard, []).append((str(f), start, min(n, start + span_rows)))
    return list(plan.items())


# ---- statistics ------------------------------------------------------------------------------

def drop_stats(dropped: pa.Table) -> dict[str, Any]:
    """Drops by reason, by filter (a row failing two filters counts for both) and by class."""
    by_filter: Counter = Counter()
    by_class: dict[str, Counter] = defaultdict(Counter)
    reasons = dropped.column(S.REASON).to_pylist()
    details = dropped.column(S.DETAIL).to_pylist()
    labels = dropped.column(S.LABEL).to_pylist()
    names = dropped.column(S.CLASS_NAME).to_pylist()
    for reason, detail, label, name in zip(reasons, details, labels, names):
        by_filter.update((detail or "").split(",") if reason != UNDECODABLE else [UNDECODABLE])
        by_class[name or str(label)][reason] += 1
    return {"by_reason": dict(Counter(reasons)), "by_filter": dict(by_filter),
            "by_class": {k: dict(v) for k, v in sorted(by_class.items())}}


# ---- the stage -------------------------------------------------------------------------------

def run(cfg: Config, added: Artifact) -> Artifact:
    """Filter one added-image artifact (stage ``filter``), resumable.

    Args:
        cfg: the whole config; reads ``filter`` (and ``generate.model`` as the default safety model).
        added: an artifact with an ``images`` table (generation or retrieval output).
    """
    section = resolve_config(cfg)
    if not added.has("images"):
        raise ValueError(f"{added.path} has no images table; pass a generation or retrieval output")

    def body(run: StageRun) -> None:
        from raugment.lib.hashing import image_files
        from raugment.runtime.cluster import POOLS, init_ray

        # an output shard is done once its "dropped" part (written last, possibly empty) exists
        done = {f.stem[len("part-"):] for f in (run.path / "dropped").glob("part-*.parquet")}
        if done:
            log.info("filter: resuming, %d output shards already written", len(done))
        plan = plan_spans(image_files(added), done)
        if not plan:
            return _finish_stats(run)
        init_ray(cfg.cluster, progress=cfg.run.progress)
        work = [call for _, calls in plan for call in calls]
        ends: dict[int, str] = {}  # index of a shard's last call -> the shard
        position = 0
        for shard, calls in plan:
            position += len(calls)
            ends[position - 1] = shard
        kept_rows: list[pa.Table] = []
        dropped_rows: list[pa.Table] = []

        with POOLS.lease(FilterBatch, section.pool, section, name="filter", key="filter.pool") as group:
            for i, batch in enumerate(group.map("span", work)):  # in order: shards fill one by one
                kept, dropped = split_batch(batch)
                kept_rows.append(kept)
                dropped_rows.append(dropped)
                if i in ends:  # the shard's last call: kept rows (if any), then the marker
                    kept = pa.concat_tables(kept_rows)
                    if kept.num_rows:
                        run.write(kept, "images", shard=ends[i])
                    run.write(pa.concat_tables(dropped_rows), "dropped", shard=ends[i])
                    kept_rows.clear()
                    dropped_rows.clear()
            info = group.info()
            run.stats.extra.update(actors=len(info), actors_reused=group.leases > 1,
                                   model_loads=int(sum(i["new_builds"] for i in info)),
                                   pids=sorted(i["pid"] for i in info))
        _finish_stats(run)

    return run_stage(cfg.run.root, STAGE, section, {"added": added}, body, resumable=True)


def _finish_stats(run: StageRun) -> None:
    """Stats from the written tables, so that a resumed run counts its earlier shards too."""
    art = run.artifact
    kept = art.read("images", columns=[S.ID], schema=S.IMAGES).num_rows
    dropped = art.read("dropped", schema=S.DROPPED)
    stats = drop_stats(dropped)
    run.stats.add("input", kept + dropped.num_rows)
    run.stats.add("kept", kept)
    run.stats.add("dropped", dropped.num_rows)
    for reason, n in stats["by_reason"].items():
        run.stats.fail(reason, n)
    run.stats.extra["dropped_by_filter"] = stats["by_filter"]
    run.stats.extra["dropped_by_class"] = stats["by_class"]
