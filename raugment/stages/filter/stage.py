"""The filter stage: score every added image, keep those that pass, record why the others left.

Filters are registered by name in :data:`raugment.stages.filter.stage.FILTERS` (``nsfw``, ``aesthetic``,
``clip_similarity``, ``min_size``). Each is a class built once per Ray actor from the
:class:`~raugment.stages.filter.config.FilterConfig` and a shared :class:`FilterContext` (which loads CLIP once
for the two CLIP-based filters), called on a decoded batch; the arithmetic lives in pure
``*_scores`` functions. :func:`filter_batch` applies the configured filters to one Arrow batch, and
:func:`run` maps it over spans of the input's shards on a leased :class:`~raugment.runtime.cluster.ActorGroup`
(``cfg.filter.pool``; inside a study the same actors, and with equal settings the same loaded
models, serve every filter run).

Output (stage ``filter``): ``images`` with the kept rows (score columns and ``filters`` filled),
``dropped`` (schema ``DROPPED``) with one row per dropped image: ``reason`` = the first filter it
failed in the configured order, ``detail`` = every filter it failed, ``score`` = the deciding score.
``stats.json`` counts drops by reason, by filter and by class.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.core.imageio import ImageDecodeError, decode_image
from raugment.core.registry import Registry
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.stages.filter.config import FilterConfig

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

FILTERS: Registry = Registry("filter")

STAGE = "filter"
UNDECODABLE = "undecodable"
# Transient columns carried from the actors to the writer (not part of the images schema).
_REASON, _DETAIL, _SCORE = "_reason", "_detail", "_score"


@dataclass
class FilterOutcome:
    """One filter's verdict on a batch.

    Attributes:
        passed: bool (n,), True where the image passes.
        scores: float32 (n,), the filter's score per image.
        column: the images column that stores the score (``None``: the score is not kept).
    """

    passed: np.ndarray
    scores: np.ndarray
    column: str | None = None


# ---- pure scoring ----------------------------------------------------------------------------

def min_size_scores(widths: Sequence[int], heights: Sequence[int]) -> np.ndarray:
    """The shorter side of each image (what ``min_size`` compares with ``min_side``)."""
    return np.minimum(np.asarray(widths), np.asarray(heights)).astype(np.float32)


def clip_similarity_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Row-wise cosine of L2-normalised image and text embeddings (row i with row i)."""
    return np.einsum("nd,nd->n", image_embeddings, text_embeddings).astype(np.float32)


def threshold_pass(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """``scores >= threshold`` (NaN fails); everything passes when ``threshold`` is ``None``."""
    if threshold is None:
        return np.ones(len(scores), dtype=bool)
    return np.nan_to_num(scores, nan=-np.inf) >= threshold


def class_prompts(template: str, class_names: Sequence[str | None]) -> list[str]:
    """The class prompt of each row: ``template`` with ``{name}`` = the first lemma of the class name."""
    return [template.format(name=(name or "").split(",")[0].strip()) for name in class_names]


# ---- shared models ---------------------------------------------------------------------------

class FilterContext:
    """Models shared by filters inside one actor, loaded on first use; CLIP embeddings per batch."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self._clip = None
        self._memo: tuple[Sequence[Any], np.ndarray] | None = None

    @property
    def clip(self):
        """The CLIP encoder of ``cfg.clip_model`` (loaded once)."""
        if self._clip is None:
            from raugment.models.clip import load_clip

            self._clip = load_clip(self.cfg.clip_model, self.cfg.clip_pretrained, self.cfg.device)
        return self._clip

    def image_embeddings(self, images: Sequence["Image.Image"]) -> np.ndarray:
        """CLIP image embeddings of this batch; computed once however many filters ask."""
        # Keyed by the batch object itself (held, so its identity cannot be reused by a later one).
        if self._memo is None or self._memo[0] is not images:
            self._memo = (images, self.clip.embed_images(list(images)))
        return self._memo[1]


FilterFn = Callable[[Sequence["Image.Image"], pa.Table], FilterOutcome]


@FILTERS.register("min_size")
class MinSizeFilter:
    """Drops images whose shorter side is below ``min_side`` pixels (score: the shorter side)."""

    def __init__(self, cfg: FilterConfig, ctx: FilterContext):
        self.min_side = cfg.min_side

    def __call__(self, images: Sequence["Image.Image"], batch: pa.Table) -> FilterOutcome:
        scores = min_size_scores([im.width for im in images], [im.height for im in images])
        return FilterOutcome(scores >= self.min_side, scores)


@FILTERS.register("nsfw")
class NsfwFilter:
    """Drops what the Stable Diffusion safety checker flags (score: its NSFW score, > 0 flagged)."""

    def __init__(self, cfg: FilterConfig, ctx: FilterContext):
        from raugment.models.safety import load_safety_checker

        self.checker = load_safety_checker(cfg.safety_model, cfg.device)

    def __call__(self, images: Sequence["Image.Image"], batch: pa.Table) -> FilterOutcome:
        flags, scores = self.checker.score(images)
        return FilterOutcome(~flags, scores, S.NSFW_SCORE)


@FILTERS.register("aesthetic")
class AestheticFilter:
    """Keeps LAION aesthetic score >= ``aesthetic_threshold`` (the predictor on CLIP embeddings)."""

    def __init__(self, cfg: FilterConfig, ctx: FilterContext):
        from raugment.models.aesthetic import load_aesthetic

        self.ctx = ctx
        self.threshold = cfg.aesthetic_threshold
        self.predictor = load_aesthetic(cfg.aesthetic_model, ctx.clip.dim)

    def __call__(self, images: Sequence["Image.Image"], batch: pa.Table) -> FilterOutcome:
        scores = self.predictor.score(self.ctx.image_embeddings(images))
        return FilterOutcome(threshold_pass(scores, self.threshold), scores, S.AESTHETIC_SCORE)


@FILTERS.register("clip_similarity")
class ClipSimilarityFilter:
    """CLIP cosine between the image and its class prompt; drops below ``clip_threshold`` if set."""

    def __init__(self, cfg: FilterConfig, ctx: FilterContext):
        self.ctx = ctx
        self.threshold = cfg.clip_threshold
        self.template = cfg.clip_prompt
        self._text: dict[str, np.ndarray] = {}

    def _texts(self, prompts: list[str]) -> np.ndarray:
        new = sorted(set(prompts) - set(self._text))
        if new:  # a batch holds few classes: embed each prompt once per actor
            self._text.update(zip(new, self.ctx.clip.embed_texts(new)))
        return np.stack([self._text[p] for p in prompts])

    def __call__(self, images: Sequence["Image.Image"], batch: pa.Table) -> FilterOutcome:
        prompts = class_prompts(self.template, batch.column(S.CLASS_NAME).to_pylist())
        scores = clip_similarity_scores(self.ctx.image_embeddings(images), self._texts(prompts))
        return FilterOutcome(threshold_pass(scores, self.threshold), scores, S.CLIP_SIMILARITY)


def build_filters(cfg: FilterConfig) -> list[tuple[str, FilterFn]]:
    """Instantiate the configured filters in order (loads their models)."""
    ctx = FilterContext(cfg)
    return [(name, FILTERS.get(name)(cfg, ctx)) for name in cfg.filters]


def preflight(cfg: Config) -> None:
    """Checks before a study starts Ray (:func:`resolve_config`)."""
    resolve_config(cfg)


def resolve_config(cfg: Config) -> FilterConfig:
    """``cfg.filter`` with defaults filled from other sections; checks settings before any work.

    Raises:
        ConfigError: unknown filter names, or a model filter without its model.
    """
    section = cfg.filter
    unknown = [f for f in section.filters if f not in FILTERS]
    if unknown:
        raise ConfigError(f"filter.filters: unknown filter(s) {unknown}; known: {', '.join(FILTERS.names())}")
    if not section.filters:
        raise ConfigError("filter.filters is empty; list at least one of " + ", ".join(FILTERS.names()))
    if "aesthetic" in section.filters and not section.aesthetic_model:
        raise ConfigError("filter.aesthetic_model: set the path of the LAION aesthetic predictor weights "
                          "(`raugment models tiny DIR` writes a tiny one in DIR/aesthetic)")
    # The safety checker belongs to the diffusion model used for generation unless set otherwise.
    return dataclasses.replace(section, safety_model=section.safety_model or cfg.generate.model)


# ---- one batch -------------------------------------------------------------------------------

def _decode_all(data: list[bytes | None]) -> tuple[list[Any], list[str | None]]:
    images, errors = [], []
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
