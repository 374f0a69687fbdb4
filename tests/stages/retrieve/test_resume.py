"""Resuming retrieval: the stage key ignores where the pool is served, and a resumed download cache
holds each id once (failed rows of the killed attempt dropped, retried rows written once)."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from raugment.config import from_dict
from raugment.core import schema
from raugment.core.storage import Artifact, StageRun
from raugment.stages.retrieve.download import DownloadResult, download_id, results_table
from raugment.stages.retrieve.stage import DownloadCache, key_section

from .test_retrieve import demo, embeddings_index, png, stage_config  # noqa: F401  (demo: a fixture)

BASE_A, BASE_B = "http://127.0.0.1:40001/", "http://127.0.0.1:40002/"


class Killed(BaseException):
    """Stands for the process dying between two download shards."""


class Server:
    """A fake pool behind ``base``: ``bad`` paths fail (``http_503``) until ``heal()``; counts fetches."""

    def __init__(self, base: str, bad: set[str] = frozenset(), batch: int = 3, kill_after: int | None = None):
        self.base, self.bad, self.batch, self.kill_after = base, set(bad), batch, kill_after
        self.asked: list[str] = []

    def __call__(self, urls):
        for n, i in enumerate(range(0, len(urls), self.batch)):
            if self.kill_after is not None and n >= self.kill_after:
                raise Killed()
            res = []
            for u in urls[i:i + self.batch]:
                assert "://" in u, u     # fetched from the served base, never the relative table URL
                self.asked.append(u)
                path = u.removeprefix(self.base)
                if path in self.bad:
                    res.append(DownloadResult(url=u, reason="http_503", attempts=2))
                else:
                    data = png(int(hashlib.sha256(path.encode()).hexdigest()[:4], 16))
                    res.append(DownloadResult(url=u, image=data, num_bytes=len(data), attempts=1, width=8,
                                              height=8, content_hash=hashlib.sha256(data).hexdigest()))
            yield results_table(res)


def stage_run(root, url_base=None, **retrieve):
    cfg = from_dict({"retrieve": {"url_base": url_base, **retrieve}})
    run = StageRun(root, "retrieve", key_section(cfg.retrieve), {"dataset": "d0"})
    run.prepare(resumable=True)
    return run


URLS = [f"img/{i:03d}.jpg" for i in range(12)]
BAD = {"img/002.jpg", "img/007.jpg", "img/011.jpg"}


def downloads(run):
    rows = run.artifact.read("downloads").drop_columns([schema.IMAGE]).to_pylist()
    return sorted((r[schema.ID], r[schema.URL], r[schema.REASON], r[schema.CONTENT_HASH]) for r in rows)


def test_key_ignores_where_the_pool_is_served(tmp_path):
    a, b = stage_run(tmp_path, BASE_A), stage_run(tmp_path, BASE_B)
    assert a.key == b.key and a.path == b.path
    assert stage_run(tmp_path, None).key == a.key
    assert stage_run(tmp_path, BASE_A, images_per_class=7).key != a.key   # what it holds still keys it


def test_rows_keep_relative_urls_and_a_new_port_reuses_everything(tmp_path):
    run = stage_run(tmp_path, BASE_A)
    srv = Server(BASE_A, BAD)
    rows = DownloadCache(run, srv, BASE_A).fetch([*URLS, "https://example.org/x.jpg"])
    assert sorted(srv.asked) == sorted([*(BASE_A + u for u in URLS), "https://example.org/x.jpg"])
    table = {r[0]: r for r in downloads(run)}
    assert set(rows) == set(URLS) | {"https://example.org/x.jpg"}
    for u in URLS:
        assert rows[u][schema.URL] == u and table[download_id(u)][1] == u   # the table URL, its id
    # The next run serves the pool on another port: same key, nothing downloaded but the failures.
    srv_b = Server(BASE_B)
    cache = DownloadCache(stage_run(tmp_path, BASE_B), srv_b, BASE_B)
    again = cache.fetch(URLS)
    assert sorted(srv_b.asked) == sorted(BASE_B + u for u in BAD)
    assert cache.reused == len(URLS) - len(BAD)
    assert all(again[u][schema.REASON] is None for u in URLS)
    assert set(cache.images(URLS)) == set(URLS)


def test_a_resumed_cache_holds_each_id_once_and_equals_an_uninterrupted_one(tmp_path):
    # Uninterrupted: the failing URLs fail, in one attempt.
    whole = stage_run(tmp_path / "whole", BASE_A)
    DownloadCache(whole, Server(BASE_A, BAD), BASE_A).fetch(URLS)
    # Killed after two shards, then resumed (the server fails the same URLs again).
    run = stage_run(tmp_path / "killed", BASE_A)
    with pytest.raises(Killed):
        DownloadCache(run, Server(BASE_A, BAD, kill_after=2), BASE_A).fetch(URLS)
    assert len(run.artifact.files("downloads")) == 2
    first = downloads(run)
    assert any(r[2] == "http_503" for r in first)          # a failure written before the kill
    for _ in range(2):  # resumed twice: the failures are retried and written once each time
        srv = Server(BASE_A, BAD)
        cache = DownloadCache(stage_run(tmp_path / "killed", BASE_A), srv, BASE_A)
        cache.fetch(URLS)
        got = downloads(run)
        ids = [r[0] for r in got]
        assert len(ids) == len(set(ids)) == len(URLS)
        assert got == downloads(whole)
        assert set(srv.asked) >= {BASE_A + u for u in BAD}
    assert cache.dropped_on_load == len(BAD)


def test_shards_of_only_failures_are_removed_and_duplicates_keep_the_success(tmp_path):
    run = stage_run(tmp_path, BASE_A)
    DownloadCache(run, Server(BASE_A, set(URLS[:3]), batch=3), BASE_A).fetch(URLS[:6])  # shard 1: all fail
    DownloadCache(stage_run(tmp_path, BASE_A), Server(BASE_A, batch=3), BASE_A).fetch(URLS[:6])
    # a second success of a URL (written by hand, as an older version could leave): dropped on load
    shard = run.artifact.files("downloads")[0]
    pq.write_table(pq.read_table(shard), shard.with_name("part-zzz.parquet"))
    cache = DownloadCache(stage_run(tmp_path, BASE_A), Server(BASE_A), BASE_A)
    got = downloads(run)
    assert sorted(r[1] for r in got) == sorted(URLS[:6]) and all(r[2] is None for r in got)
    assert len(run.artifact.files("downloads")) == 2
    assert set(cache.images(URLS[:6])) == set(URLS[:6])


# --------------------------------------------------------------------------------------------
# the stage on the demo's fault pool, killed between download shards and resumed on another port
# --------------------------------------------------------------------------------------------

DL_COLUMNS = [schema.ID, schema.URL, schema.REASON, schema.CONTENT_HASH, schema.WIDTH, schema.HEIGHT]


def shard_downloader(dcfg, batch=8, kill_after=None):
    """Real downloads in shards of ``batch`` URLs; :class:`Killed` before shard ``kill_after``."""
    from raugment.stages.retrieve.download import download_urls

    shards = []

    def download(urls):
        for i in range(0, len(urls), batch):
            if kill_after is not None and len(shards) >= kill_after:
                raise Killed()
            shards.append(i)
            yield results_table(download_urls(urls[i:i + batch], dcfg))

    return download


@pytest.mark.slow
def test_killed_retrieve_resumes_to_the_uninterrupted_rows(ray_session, demo, tmp_path):  # noqa: F811
    from raugment.core.config import with_overrides
    from raugment.demo.corpus import CorpusServer
    from raugment.stages.retrieve import stage as retrieve

    _root, pool, clip, dataset, _names = demo
    index_dir = embeddings_index(pool, clip, tmp_path / "laion")

    def config(root, srv):
        return with_overrides(stage_config(root, pool, clip, srv, index_dir), {"retrieve.aesthetic_threshold": None})

    def rows(art, table, columns):
        return sorted(tuple(r[c] for c in columns) for r in art.read(table).to_pylist())

    with CorpusServer(pool) as srv:
        cfg = config(tmp_path / "whole", srv)
        whole = retrieve.run(cfg, dataset, downloader=shard_downloader(cfg.retrieve.download))
        killed = config(tmp_path / "killed", srv)
        with pytest.raises(Killed):
            retrieve.run(killed, dataset, downloader=shard_downloader(killed.retrieve.download, kill_after=2))
    with CorpusServer(pool) as srv2:  # the next run's server: another port, the same stage key
        assert srv2.url != srv.url
        resumed_cfg = config(tmp_path / "killed", srv2)
        stage_dir = tmp_path / "killed" / "runs" / "retrieve"
        (partial,) = stage_dir.iterdir()
        before = rows(Artifact("retrieve", partial.name, partial), "downloads", DL_COLUMNS)
        assert len(before) == 16 and any(r[2] is not None for r in before)  # two shards, failures among them
        resumed = retrieve.run(resumed_cfg, dataset, downloader=shard_downloader(resumed_cfg.retrieve.download))
    assert resumed.path == partial and resumed.key == whole.key
    got = rows(resumed, "downloads", DL_COLUMNS)
    ids = [r[0] for r in got]
    assert len(ids) == len(set(ids))                                    # no duplicate ids
    assert got == rows(whole, "downloads", DL_COLUMNS)                  # the uninterrupted rows
    assert resumed.stats["counts"]["download_reused"] > 0
    cand = [schema.LABEL, schema.RANK, schema.URL, schema.STATUS, schema.REASON]
    assert rows(resumed, "candidates", cand) == rows(whole, "candidates", cand)
    assert resumed.read("images").column(schema.ID).to_pylist() == whole.read("images").column(schema.ID).to_pylist()
