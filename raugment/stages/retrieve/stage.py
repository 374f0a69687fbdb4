"""Stage "retrieve": CLIP kNN of class prompts, quota-driven growth of k, downloads, filters (paper 3.1 ⑩).

For each class the no-whitespace simple prompt ("A photo of {w(name)}.") is searched with a
backend of :mod:`raugment.stages.retrieve.backends` (``retrieve.backend``: a local faiss index,
a clip-retrieval service ...). k starts at 1.4·n and grows by 1.4·n
up to 10·1.4·n until n candidates survive, in rank order: NSFW (index tag, optional safety
checker), aesthetic score >= 5 (the index's score, else the LAION predictor on the stored image
embedding, else on the downloaded image's CLIP embedding), de-duplication (URL, then exact bytes),
and the download itself. The n most similar survivors are kept; a class that cannot be filled is
reported with its shortfall. Every candidate keeps rank, similarity and why it was dropped.

Outputs (tables): ``images`` (schema.IMAGES), ``candidates`` (schema.CANDIDATES), ``failures``
(schema.FAILURES: dropped candidates, except those only over quota), ``downloads``
(schema.DOWNLOADS, the download cache: a resumed run re-downloads only what failed, and each id
appears once). URLs stay as the index gives them: a local pool's relative ones are fetched from
``retrieve.url_base``, which is not part of the stage's key (:func:`key_section`).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raugment.config import Config
from raugment.core import schema
from raugment.core.config import ConfigError, to_dict
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.stages.retrieve.backends import backend_class, needs_index
from raugment.stages.retrieve.config import RetrieveConfig

log = logging.getLogger(__name__)

SELECTED = "selected"
DROPPED = "dropped"
OVER_QUOTA = "over_quota"
METHOD = "retrieval"
FINAL_TABLES = ("images", "candidates", "failures")


# --------------------------------------------------------------------------------------------
# Plan: classes, prompts, quotas, k schedule
# --------------------------------------------------------------------------------------------


@dataclass
class ClassQuery:
    """One class to fill: its prompt, quota n and k schedule."""

    label: int
    class_id: str | None
    class_name: str
    prompt: str
    quota: int
    ks: list[int]
    accepted: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0
    round: int = 0
    done: bool = False
    exhausted: bool = False

    @property
    def k(self) -> int:
        return self.ks[min(self.round, len(self.ks) - 1)]


def k_schedule(n: int, cfg: RetrieveConfig) -> list[int]:
    """k for each round: start·n, (start+step)·n, ... up to max·n (paper: 1.4n ... 14n)."""
    k_max = math.ceil(cfg.k_max_factor * n)
    ks: list[int] = []
    factor = cfg.k_start_factor
    while True:
        k = min(math.ceil(factor * n - 1e-9), k_max)
        if not ks or k > ks[-1]:
            ks.append(k)
        if k >= k_max:
            return ks
        factor += cfg.k_step_factor


def class_prompt(name: str, kind: str) -> str:
    """The query prompt of a class (``retrieve.prompt``; the paper uses "simple_nows")."""
    if kind != "simple_nows":
        raise ConfigError(f"retrieve.prompt={kind!r} is not supported; the paper's retrieval uses 'simple_nows'")
    from raugment.lib.prompts import simple_nows_prompt  # the generation engineer's prompt builder

    return simple_nows_prompt(name)


def plan_queries(classes: pa.Table, cfg: RetrieveConfig) -> list[ClassQuery]:
    """One :class:`ClassQuery` per class of the dataset's ``classes`` table."""
    rows = classes.to_pylist()
    queries = []
    for row in sorted(rows, key=lambda r: r[schema.LABEL]):
        if cfg.ratio is not None:
            n_train = row.get(schema.COUNT_TRAIN)
            if not n_train:
                raise ConfigError("retrieve.ratio needs the classes table's n_train counts; "
                                  "set retrieve.images_per_class instead")
            n = max(1, math.ceil(cfg.ratio / 100.0 * n_train))
        else:
            n = cfg.images_per_class
        queries.append(ClassQuery(label=int(row[schema.LABEL]), class_id=row.get(schema.CLASS_ID),
                                  class_name=row[schema.CLASS_NAME],
                                  prompt=class_prompt(row[schema.CLASS_NAME], cfg.prompt), quota=n,
                                  ks=k_schedule(n, cfg)))
    return queries


# --------------------------------------------------------------------------------------------
# Screening: what drops a candidate
# --------------------------------------------------------------------------------------------


class Screener:
    """The filters of retrieval, in order; the models behind them are called, never held.

    Args:
        cfg: the retrieve section.
        score_embeddings: stored CLIP image embeddings (n, d) -> aesthetic scores (n,).
        score_images: downloaded image bytes -> aesthetic scores (CLIP image embedding, then the predictor).
        safety: downloaded image bytes -> NSFW verdicts (1.0 / 0.0), or None (index tags decide alone).
    """

    def __init__(self, cfg: RetrieveConfig, score_embeddings: Callable[[np.ndarray], np.ndarray],
                 score_images: Callable[[list[bytes]], np.ndarray],
                 safety: Callable[[list[bytes]], np.ndarray] | None = None):
        self.cfg = cfg
        self.score_embeddings = score_embeddings
        self.score_images = score_images
        self.safety = safety
        self.claimed_urls: set[str] = set()
        self.hashes: set[str] = set()

    def fill_scores_from_embeddings(self, cands: list[dict[str, Any]]) -> None:
        """Score candidates without an aesthetic score but with a stored image embedding."""
        todo = [c for c in cands if c[schema.AESTHETIC_SCORE] is None and c.get("embedding") is not None]
        if self.cfg.aesthetic_threshold is None or not todo:
            return
        emb = np.stack([np.asarray(c["embedding"], np.float32) for c in todo])
        for c, s in zip(todo, self.score_embeddings(emb)):
            c[schema.AESTHETIC_SCORE] = float(s)

    def before_download(self, c: dict[str, Any]) -> str | None:
        """Reason to drop a candidate without downloading it, or None."""
        if not c.get(schema.URL):
            return "no_url"
        if self.cfg.drop_nsfw and (c[schema.NSFW_SCORE] or 0.0) >= self.cfg.nsfw_threshold:
            return "nsfw"
        if self._below(c[schema.AESTHETIC_SCORE]):
            return "aesthetic"
        if self.cfg.deduplicate:
            if c[schema.URL] in self.claimed_urls:
                return "duplicate_url"
            self.claimed_urls.add(c[schema.URL])
        return None

    def _below(self, score: float | None) -> bool:
        return self.cfg.aesthetic_threshold is not None and score is not None and score < self.cfg.aesthetic_threshold

    def after_download(self, cands: list[dict[str, Any]], images: Callable[[list[str]], dict[str, bytes]]) -> None:
        """Set ``reason`` on downloaded candidates (in rank order): bytes duplicates, aesthetics, NSFW."""
        for c in cands:
            if c["reason"] is None and self.cfg.deduplicate:
                if c[schema.CONTENT_HASH] in self.hashes:
                    c["reason"] = "duplicate_image"
                else:
                    self.hashes.add(c[schema.CONTENT_HASH])
        live = [c for c in cands if c["reason"] is None]
        need_score = [c for c in live if c[schema.AESTHETIC_SCORE] is None and self.cfg.aesthetic_threshold is not None]
        if need_score or (self.safety is not None and live):
            data = images([c[schema.URL] for c in live])
        if need_score:
            for c, s in zip(need_score, self.score_images([data[c[schema.URL]] for c in need_score])):
                c[schema.AESTHETIC_SCORE] = float(s)
        for c in live:
            if self._below(c[schema.AESTHETIC_SCORE]):
                c["reason"] = "aesthetic"
        if self.safety is not None and self.cfg.drop_nsfw:
            checked = [c for c in live if c["reason"] is None]
            scores: np.ndarray | list[float] = self.safety([data[c[schema.URL]] for c in checked]) if checked else []
            for c, s in zip(checked, scores):
                c[schema.NSFW_SCORE] = float(s)
                if s >= self.cfg.nsfw_threshold:
                    c["reason"] = "nsfw"


# --------------------------------------------------------------------------------------------
# Scoring models (plain classes; the stage hosts them in actors that live for every round)
# --------------------------------------------------------------------------------------------


class AestheticScorer:
    """The LAION aesthetic predictor on CLIP image embeddings, with the CLIP model to embed images.

    Models load on first use, so an actor that only scores stored embeddings never loads CLIP.

    Args:
        aesthetic_model: predictor weights (``retrieve.aesthetic_model``; ``random`` = seeded random).
        clip_model: the CLIP model whose embedding space the index lives in.
        clip_pretrained: its pretrained tag.
        device: where both run.
    """

    def __init__(self, aesthetic_model: str | None, clip_model: str, clip_pretrained: str | None, device: str):
        self.aesthetic_model = aesthetic_model
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.device = device
        self._clip: Any = None
        self._predictor: Any = None

    def _predict(self, emb: np.ndarray) -> np.ndarray:
        if self._predictor is None:
            from raugment.models.aesthetic import load_aesthetic

            self._predictor = load_aesthetic(self.aesthetic_model, emb.shape[1])
        return np.asarray(self._predictor.score(emb), np.float32)

    def embeddings(self, emb: np.ndarray) -> np.ndarray:
        """Scores of stored image embeddings (n, d)."""
        return self._predict(np.asarray(emb, np.float32))

    def images(self, images: Sequence[bytes]) -> np.ndarray:
        """Scores of encoded images: CLIP image embeddings, then the predictor."""
        from raugment.core.imageio import decode_image

        if self._clip is None:
            from raugment.models.clip import load_clip

            self._clip = load_clip(self.clip_model, self.clip_pretrained, self.device)
        return self._predict(self._clip.embed_images([decode_image(b) for b in images]))


class SafetyScorer:
    """NSFW verdicts (1.0 / 0.0) of the Stable Diffusion safety checker on encoded images.

    ``retrieve.safety_model`` names the SD model (hub id or local directory); the paper used the
    same checker as for generated images. The checker loads on first use.
    """

    def __init__(self, safety_model: str, device: str):
        self.safety_model = safety_model
        self.device = device
        self._checker: Any = None

    def verdicts(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> float32 (n,): 1.0 where the checker flags the image."""
        from raugment.core.imageio import decode_image

        if self._checker is None:
            from raugment.models.safety import load_safety_checker

            self._checker = load_safety_checker(self.safety_model, self.device)
        flags, _ = self._checker.score([decode_image(b) for b in images])
        return np.asarray(flags, dtype=np.float32)


class ScoringPools:
    """The stage's scoring actors: one pool per model, started on first use and kept for every round.

    Scoring never runs on the driver. Each pool takes its resources from config
    (``retrieve.score_pool``, ``retrieve.safety_pool``); an actor asks for a GPU only when its pool
    does and the cluster has one, and then runs its model there.
    """

    def __init__(self, cfg: RetrieveConfig, clip_model: str, clip_pretrained: str | None):
        self.cfg = cfg
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.groups: dict[str, Any] = {}

    def _group(self, name: str) -> Any:
        if name not in self.groups:
            from raugment.runtime.cluster import ActorGroup, available_gpus

            pool = self.cfg.score_pool if name == "score" else self.cfg.safety_pool
            gpus = available_gpus(pool, f"retrieve.{name}_pool")
            # Ray hides GPUs from actors that asked for none; "auto" alone could still see them.
            device = self.cfg.device if gpus > 0 else "cpu"
            if name == "score":
                args: tuple = (AestheticScorer, pool, self.cfg.aesthetic_model, self.clip_model,
                               self.clip_pretrained, device)
            else:
                args = (SafetyScorer, pool, self.cfg.safety_model, device)
            self.groups[name] = ActorGroup(*args, num_gpus=gpus, name=name)
        return self.groups[name]

    def _map(self, name: str, method: str, items: Any) -> np.ndarray:
        group = self._group(name)
        parts = list(group.map(method, group.batches(items)))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def score_embeddings(self, emb: np.ndarray) -> np.ndarray:
        """Aesthetic scores of stored embeddings, on the score pool."""
        return self._map("score", "embeddings", emb)

    def score_images(self, images: list[bytes]) -> np.ndarray:
        """Aesthetic scores of downloaded images (CLIP, then the predictor), on the score pool."""
        return self._map("score", "images", images)

    def safety(self, images: list[bytes]) -> np.ndarray:
        """Safety-checker verdicts on downloaded images, on the safety pool."""
        return self._map("safety", "verdicts", images)

    def screener(self) -> Screener:
        """A :class:`Screener` that scores on these pools (the checker only with ``retrieve.safety_model``)."""
        use_safety = bool(self.cfg.safety_model) and self.cfg.drop_nsfw
        return Screener(self.cfg, self.score_embeddings, self.score_images, self.safety if use_safety else None)

    def stats(self) -> dict[str, Any]:
        """Per pool: actors started, calls served."""
        return {name: group.stats() for name, group in self.groups.items()}

    def close(self) -> None:
        """Stop every pool's actors."""
        for group in self.groups.values():
            group.close()


# --------------------------------------------------------------------------------------------
# Downloads with a resumable cache
# --------------------------------------------------------------------------------------------


def absolute_url(url: str | None, url_base: str | None) -> str | None:
    """Where a table URL is fetched from: a relative one (a local pool's) joined with ``url_base``."""
    if url and url_base and "://" not in url:
        return urljoin(url_base, url)
    return url


class DownloadCache:
    """Downloads (``downloader``: urls -> DOWNLOADS tables; the stage's download actors), written as
    ``downloads`` shards; successes of earlier attempts are reused.

    URLs are kept as the index gives them (a local pool's are relative): ``url_base`` is joined to
    them only to fetch, so rows, ids and the stage's key stay the same when the pool is served
    elsewhere (the demo's server takes a free port each run).

    Failed URLs of an earlier (interrupted or forced) attempt are not loaded, so a re-run retries
    exactly those; their rows (and any second copy of a URL) are dropped from the shards on load,
    so the ``downloads`` table never holds an id twice. Image bytes stay on disk; :meth:`images`
    reads them back by shard.
    """

    def __init__(self, run: StageRun | None, downloader: Callable[[list[str]], Iterable[pa.Table]],
                 url_base: str | None = None):
        self.run = run
        self._download = downloader
        self.url_base = url_base
        self.rows: dict[str, dict[str, Any]] = {}
        self.shard_of: dict[str, Path] = {}
        self.outcomes: Counter = Counter()
        self.reused = 0
        self.dropped_on_load = 0
        if run is not None:
            for f in run.artifact.files("downloads"):
                self._load(f)

    def _load(self, shard: Path) -> None:
        """Take a shard's first successful row of each URL not seen yet; rewrite the shard without
        the rest (failed rows a re-run retries, duplicates), or remove it when nothing is left."""
        from raugment.core.storage import write_parquet_atomic

        small = pq.read_table(shard, columns=[c for c in schema.DOWNLOADS.names if c != schema.IMAGE])
        keep = []
        for i, row in enumerate(small.to_pylist()):
            if row[schema.REASON] is None and row[schema.URL] not in self.rows:
                self.rows[row[schema.URL]] = row
                self.shard_of[row[schema.URL]] = shard
                keep.append(i)
        dropped = small.num_rows - len(keep)
        if not dropped:
            return
        self.dropped_on_load += dropped
        if keep:  # atomic replace: a kill now leaves the old shard or the new one, both readable
            write_parquet_atomic(pq.read_table(shard).take(keep), shard)
        else:
            shard.unlink()

    def _as_table_urls(self, table: pa.Table, where: dict[str, list[str]]) -> pa.Table:
        """Rows of fetched (absolute) URLs -> one row per table URL, with its URL and id."""
        from raugment.stages.retrieve.download import download_id

        idx, urls = [], []
        for i, fetched in enumerate(table.column(schema.URL).to_pylist()):
            for url in where.get(fetched, ()):
                idx.append(i)
                urls.append(url)
        out = table.take(idx)
        for name, values in ((schema.URL, urls), (schema.ID, [download_id(u) for u in urls])):
            pos = out.schema.get_field_index(name)
            out = out.set_column(pos, out.schema.field(pos), pa.array(values, out.schema.field(pos).type))
        return out

    def fetch(self, urls: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Download rows (without bytes) for ``urls``; only URLs not already known are downloaded."""
        todo = list(dict.fromkeys(u for u in urls if u not in self.rows))
        self.reused += sum(1 for u in set(urls) if u in self.rows)
        where: dict[str, list[str]] = defaultdict(list)
        for u in todo:
            where[str(absolute_url(u, self.url_base))].append(u)
        for fetched in self._download(list(where)) if todo else []:
            table = self._as_table_urls(fetched, where)
            path = self.run.write(table, "downloads") if self.run is not None else None
            for row in table.drop_columns([schema.IMAGE]).to_pylist():
                self.rows[row[schema.URL]] = row
                self.outcomes[row[schema.REASON] or "ok"] += 1
                if path is not None and row[schema.REASON] is None:
                    self.shard_of[row[schema.URL]] = path
            if path is None:  # no stage directory (unit use): keep bytes in memory
                for url, data in zip(table.column(schema.URL).to_pylist(), table.column(schema.IMAGE).to_pylist()):
                    if data is not None:
                        self.rows[url]["_bytes"] = data
        return {u: self.rows[u] for u in urls}

    def images(self, urls: Sequence[str]) -> dict[str, bytes]:
        """Image bytes of successfully downloaded ``urls``, reading each shard once."""
        out = {u: self.rows[u]["_bytes"] for u in urls if "_bytes" in self.rows.get(u, {})}
        by_shard: dict[Path, set[str]] = defaultdict(set)
        for u in urls:
            if u not in out:
                by_shard[self.shard_of[u]].add(u)
        for shard, wanted in by_shard.items():
            t = pq.read_table(shard, columns=[schema.URL, schema.IMAGE])
            for url, data in zip(t.column(schema.URL).to_pylist(), t.column(schema.IMAGE).to_pylist()):
                if url in wanted and data is not None:
                    out[url] = data
        return out


# --------------------------------------------------------------------------------------------
# The quota loop (pure given a backend, a fetch function and a screener)
# --------------------------------------------------------------------------------------------


def _candidate(q: ClassQuery, rank: int, hit: dict[str, Any]) -> dict[str, Any]:
    url = hit.get(schema.URL)  # as the index gives it: a relative one is fetched from retrieve.url_base
    return {schema.LABEL: q.label, schema.CLASS_NAME: q.class_name, schema.PROMPT: q.prompt,
            schema.RANK: rank, schema.K: q.k, schema.CLIP_SIMILARITY: hit.get(schema.CLIP_SIMILARITY),
            schema.URL: url, schema.CAPTION: hit.get(schema.CAPTION),
            schema.AESTHETIC_SCORE: hit.get(schema.AESTHETIC_SCORE), schema.NSFW_SCORE: hit.get(schema.NSFW_SCORE),
            schema.POOL_LABEL: hit.get(schema.POOL_LABEL), "embedding": hit.get("embedding"),
            "reason": None, schema.DETAIL: None, schema.CONTENT_HASH: None}


def grow_and_select(queries: list[ClassQuery], backend: Any, cache: DownloadCache,
                    screener: Screener) -> list[dict[str, Any]]:
    """Grow k per class until each quota is met or k is at its maximum; return every candidate.

    Candidates get ``status`` ``selected`` (the n most similar survivors of their class) or
    ``dropped`` with a ``reason`` (``over_quota`` for survivors beyond n).
    """
    everything: list[dict[str, Any]] = []
    while True:
        open_ = [q for q in queries if not q.done]
        if not open_:
            break
        k = max(q.k for q in open_)
        results = backend.query([q.prompt for q in open_], k)
        fresh: list[dict[str, Any]] = []
        for q, hits in zip(open_, results):
            fresh.extend(_candidate(q, rank, hit) for rank, hit in enumerate(hits[:q.k]) if rank >= q.seen)
            q.seen = max(q.seen, min(len(hits), q.k))
            q.exhausted = len(hits) < q.k  # the backend has no more neighbours to give
        screener.fill_scores_from_embeddings(fresh)  # one call per round (scoring runs on actors)
        for c in fresh:  # class by class, rank by rank: which copy of a URL is claimed first
            c["reason"] = screener.before_download(c)
        pending = [c for c in fresh if c["reason"] is None]
        rows = cache.fetch([c[schema.URL] for c in pending])
        for c in pending:
            row = rows[c[schema.URL]]
            c["reason"], c[schema.DETAIL], c[schema.CONTENT_HASH] = (row[schema.REASON], row[schema.DETAIL],
                                                                     row[schema.CONTENT_HASH])
        screener.after_download(pending, cache.images)
        for q in open_:
            q.accepted.extend(c for c in fresh if c[schema.LABEL] == q.label and c["reason"] is None)
            if len(q.accepted) >= q.quota or q.round >= len(q.ks) - 1 or q.exhausted:
                q.done = True
            else:
                q.round += 1
        everything.extend(fresh)
    for q in queries:
        q.accepted.sort(key=lambda c: c[schema.RANK])
        for c in q.accepted[q.quota:]:
            c["reason"] = OVER_QUOTA
        q.accepted = q.accepted[:q.quota]
    for c in everything:
        c[schema.STATUS] = SELECTED if c["reason"] is None else DROPPED
    return everything


def precision_at_n(selected: Iterable[dict[str, Any]]) -> float | None:
    """Share of selected images whose hidden pool label is the queried class (None without labels)."""
    pairs = [(c[schema.POOL_LABEL], c[schema.CLASS_NAME]) for c in selected if c.get(schema.POOL_LABEL) is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


# --------------------------------------------------------------------------------------------
# Writing the stage's tables
# --------------------------------------------------------------------------------------------


def _candidate_rows(cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from raugment.core.imageio import item_id

    keep = set(schema.CANDIDATES.names)
    rows = []
    for c in cands:
        row = {k: v for k, v in c.items() if k in keep}
        row[schema.ID] = item_id("cand", c[schema.LABEL], c[schema.RANK], c[schema.URL])
        row[schema.REASON] = c["reason"]
        rows.append(row)
    return rows


def _image_rows(cands: list[dict[str, Any]], queries: list[ClassQuery], cache: DownloadCache,
                backend: Any, cfg: RetrieveConfig) -> list[dict[str, Any]]:
    from raugment.core.imageio import item_id

    class_ids = {q.label: q.class_id for q in queries}
    data = cache.images([c[schema.URL] for c in cands])
    filters = [name for name, on in (("nsfw", cfg.drop_nsfw), ("aesthetic", cfg.aesthetic_threshold is not None),
                                     ("dedup", cfg.deduplicate)) if on]
    rows = []
    for c in cands:
        dl = cache.rows[c[schema.URL]]
        rows.append({
            schema.ID: (item_id("ret", c[schema.URL]) if cfg.deduplicate
                        else item_id("ret", c[schema.URL], c[schema.LABEL])),
            schema.LABEL: c[schema.LABEL], schema.CLASS_ID: class_ids[c[schema.LABEL]],
            schema.CLASS_NAME: c[schema.CLASS_NAME], schema.SPLIT: "added", schema.SOURCE: "retrieved",
            schema.METHOD: METHOD, schema.PROMPT: c[schema.PROMPT], schema.MODEL_ID: backend.clip_model,
            schema.URL: c[schema.URL], schema.CAPTION: c[schema.CAPTION], schema.RANK: c[schema.RANK],
            schema.CLIP_SIMILARITY: c[schema.CLIP_SIMILARITY], schema.AESTHETIC_SCORE: c[schema.AESTHETIC_SCORE],
            schema.NSFW_SCORE: c[schema.NSFW_SCORE], schema.IMAGE: data[c[schema.URL]],
            schema.WIDTH: dl[schema.WIDTH], schema.HEIGHT: dl[schema.HEIGHT], schema.FILTERS: filters,
            schema.PARAMS: {"backend": cfg.backend, "k": c[schema.K], "pool_label": c[schema.POOL_LABEL],
                            "content_hash": c[schema.CONTENT_HASH]},
        })
    return rows


def _write_outputs(run: StageRun, cands: list[dict[str, Any]], queries: list[ClassQuery],
                   cache: DownloadCache, backend: Any, cfg: RetrieveConfig, shard_rows: int = 2000) -> None:
    for name in FINAL_TABLES:  # a forced re-run replaces them; the download cache stays
        shutil.rmtree(run.path / name, ignore_errors=True)
    selected = [c for c in cands if c[schema.STATUS] == SELECTED]
    for i in range(0, len(selected), shard_rows):
        chunk = selected[i:i + shard_rows]
        run.write(schema.to_table(_image_rows(chunk, queries, cache, backend, cfg), schema.IMAGES),
                  "images", shard=f"{i // shard_rows:05d}")
    run.write(schema.to_table(_candidate_rows(cands), schema.CANDIDATES), "candidates", shard="00000")
    fails = [{schema.ID: r[schema.ID], schema.LABEL: r[schema.LABEL], schema.URL: r[schema.URL],
              schema.REASON: r[schema.REASON], schema.DETAIL: r[schema.DETAIL]}
             for r in _candidate_rows(cands) if r[schema.REASON] not in (None, OVER_QUOTA)]
    run.write(schema.to_table(fails, schema.FAILURES), "failures", shard="00000")


def _record_stats(run: StageRun, cands: list[dict[str, Any]], queries: list[ClassQuery], cache: DownloadCache) -> None:
    st = run.stats
    st.add("classes", len(queries))
    st.add("candidates", len(cands))
    st.add("selected", sum(c[schema.STATUS] == SELECTED for c in cands))
    st.add("over_quota", sum(c["reason"] == OVER_QUOTA for c in cands))
    st.add("downloaded", sum(cache.outcomes.values()))
    st.add("download_reused", cache.reused)
    for c in cands:
        if c["reason"] not in (None, OVER_QUOTA):
            st.fail(c["reason"])
    per_class, shortfall = {}, {}
    for q in queries:
        got = len(q.accepted)
        per_class[q.class_name] = {"quota": q.quota, "selected": got, "shortfall": q.quota - got,
                                   "k_final": q.k, "candidates": q.seen}
        if got < q.quota:
            shortfall[q.class_name] = q.quota - got
    total = sum(cache.outcomes.values())
    st.extra.update({
        "per_class": per_class, "shortfall": shortfall,
        "download_outcomes": dict(cache.outcomes),
        "download_success_rate": round(cache.outcomes.get("ok", 0) / total, 4) if total else None,
        "precision_at_n": precision_at_n(c for c in cands if c[schema.STATUS] == SELECTED),
    })
    for name, missing in shortfall.items():
        log.warning("retrieve: class %r is %d images short of its quota (k reached its maximum)", name, missing)


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


def key_section(cfg: RetrieveConfig) -> dict[str, Any]:
    """What keys the stage's output: the section without ``url_base``, which says where a local pool
    is served (the demo's server takes a free port each run), not what it holds."""
    data = to_dict(cfg)
    data.pop("url_base")
    return data


def preflight(cfg: Config) -> None:
    """Checks before a study starts Ray: a known backend, and ``retrieve.index`` when it is set and
    the backend needs an index (otherwise the study's index stage provides the index)."""
    if needs_index(cfg.retrieve.backend) and cfg.retrieve.index:
        check_config(cfg, None)
    else:
        backend_class(cfg.retrieve.backend)
        check_models(cfg.retrieve)


def check_config(cfg: Config, index: Artifact | None) -> str | None:
    """Errors naming the key before any work; returns the index directory for a backend that needs
    one (``retrieve.index``, else the ``index`` artifact), else None."""
    rcfg = cfg.retrieve
    backend_class(rcfg.backend)  # unknown backend -> ConfigError listing the known ones
    check_models(rcfg)
    if not needs_index(rcfg.backend):
        return None
    path = rcfg.index or (str(index.path) if index is not None else None)
    if not path:
        raise ConfigError(f"retrieve.index: the {rcfg.backend} backend needs an index; build one with "
                          "`raugment index build` or set retrieve.index to its directory")
    if not Path(path).is_dir():
        raise ConfigError(f"retrieve.index {path!r} is not a directory")
    from raugment.lib.knn_index import check_index_dir

    check_index_dir(path, "retrieve.index")
    return path


def check_models(rcfg: RetrieveConfig) -> None:
    """The models load inside actors, mid-run: check their references now."""
    from raugment.core.config import check_local_model
    from raugment.models.aesthetic import check_aesthetic_ref
    from raugment.models.safety import CHECKER_DIR, PROCESSOR_DIR

    if rcfg.aesthetic_threshold is not None or rcfg.aesthetic_model is not None:
        # hits without an index score are scored by it (null aesthetic_threshold: no scoring)
        check_aesthetic_ref(rcfg.aesthetic_model, "retrieve.aesthetic_model")
    if rcfg.safety_model and rcfg.drop_nsfw and Path(rcfg.safety_model).exists():
        missing = [d for d in (CHECKER_DIR, PROCESSOR_DIR) if not (Path(rcfg.safety_model) / d).is_dir()]
        if missing:
            raise ConfigError(f"retrieve.safety_model {rcfg.safety_model!r} lacks {', '.join(missing)}/; "
                              "point it at a Stable Diffusion directory (or hub id) with a safety checker")
    if rcfg.safety_model and rcfg.drop_nsfw:
        check_local_model(rcfg.safety_model, "retrieve.safety_model", CHECKER_DIR,
                          "point it at a Stable Diffusion directory (or hub id) with a safety checker",
                          hub_file=f"{CHECKER_DIR}/config.json")


def run(cfg: Config, dataset: Artifact, index: Artifact | None = None, *, force: bool = False,
        downloader: Callable[[list[str]], Iterable[pa.Table]] | None = None) -> Artifact:
    """Stage "retrieve": fill each class of ``dataset`` with retrieved images.

    Args:
        cfg: the config (``retrieve`` section; ``cluster`` for Ray).
        dataset: the dataset stage's output (its ``classes`` table).
        index: the index stage's output (for a backend that needs an index), unless
            ``retrieve.index`` names one.
        force: re-run a complete stage; successful downloads of the earlier run are reused.
        downloader: replaces the Ray download (tests, benchmarks): urls -> DOWNLOADS tables.
    """
    from raugment.runtime.cluster import init_ray

    index_path = check_config(cfg, index)
    queries = plan_queries(dataset.read("classes"), cfg.retrieve)
    inputs: dict[str, Artifact | str] = {"dataset": dataset}
    if index_path is not None:
        inputs["index"] = index if index is not None and not cfg.retrieve.index else index_path

    def body(run_: StageRun) -> None:
        from contextlib import ExitStack

        from raugment.stages.retrieve.download import DownloadPool

        init_ray(cfg.cluster, cfg.run.progress)
        backend = backend_class(cfg.retrieve.backend)(cfg, index_path)
        with ExitStack() as stack:
            # Actors live for the whole stage: every k round reuses them (started on first use).
            scoring = ScoringPools(cfg.retrieve, backend.clip_model, backend.clip_pretrained)
            stack.callback(scoring.close)
            pool: DownloadPool | None = None
            download = downloader
            if download is None:
                pool = stack.enter_context(DownloadPool(cfg.retrieve.download))
                download = pool.download
            cache = DownloadCache(run_, download, cfg.retrieve.url_base)
            cands = grow_and_select(queries, backend, cache, scoring.screener())
            actors = {**scoring.stats(), **({"download": pool.group.stats()} if pool is not None else {})}
        _write_outputs(run_, cands, queries, cache, backend, cfg.retrieve)
        _record_stats(run_, cands, queries, cache)
        run_.stats.extra.update({"clip_model": backend.clip_model, "actors": actors,
                                 "rounds": max((q.round for q in queries), default=-1) + 1})

    return run_stage(cfg.run.root, "retrieve", key_section(cfg.retrieve), inputs, body, resumable=True,
                     force=force)
