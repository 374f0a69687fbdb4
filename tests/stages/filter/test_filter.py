"""The filter stage: one batch through the filters, config errors, the stage on Ray (planted drops,
resume, actors kept in a study scope), the ``raugment filter`` command."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.config import ActorPoolConfig, ConfigError
from raugment.core.storage import StageRun
from raugment.stages.filter import stage as F
from raugment.stages.filter.config import FilterConfig
from raugment.stages.filter.filters import FilterOutcome
from tests.helpers.planted import draw, make_artifact, png, row
from tests.stages.filter.filters.test_aesthetic import plant_aesthetic
from tests.stages.filter.filters.test_nsfw import checkerboard, plant_nsfw

MIN_SIDE = 32


# ---- one batch -------------------------------------------------------------------------------

def test_filter_batch_keeps_prior_filters_and_upstream_scores_and_marks_bad_bytes():
    def always(images, batch):
        return FilterOutcome(np.ones(len(images), bool), np.full(len(images), np.nan, np.float32),
                             S.AESTHETIC_SCORE)

    rows = [row("a", png(draw(0, 40)), filters=["retrieval_aesthetic"], aesthetic_score=6.5),
            row("b", b"garbage", aesthetic_score=7.0)]
    out = F.filter_batch(S.to_table(rows), [("aesthetic", always)])
    kept, dropped = F.split_batch(out)
    assert kept.column(S.FILTERS).to_pylist() == [["retrieval_aesthetic", "aesthetic"]]
    assert kept.column(S.AESTHETIC_SCORE).to_pylist() == [6.5]  # not recomputed: upstream kept
    assert kept.column(S.WIDTH).to_pylist() == [40]
    assert dropped.to_pylist()[0][S.REASON] == "undecodable"
    assert dropped.to_pylist()[0][S.DETAIL] == "not_an_image"


def test_config_errors_before_any_work(tmp_path, monkeypatch):
    art = make_artifact(tmp_path / "in", "retrieve", [row("x", png(draw(0)))])
    cfg = Config()
    cfg.run.root = str(tmp_path / "runs")
    cfg.filter.filters = ["min_size", "sharpness"]
    with pytest.raises(ConfigError, match=r"unknown filter.*sharpness"):
        F.run(cfg, art)
    cfg.filter.filters = ["aesthetic"]
    with pytest.raises(ConfigError, match=r"filter\.aesthetic_model"):
        F.run(cfg, art)
    assert not (tmp_path / "runs").exists()
    cfg.filter.filters = ["nsfw"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")   # online: hub ids are not looked up in the cache
    assert F.resolve_config(cfg).safety_model == cfg.generate.model


# ---- the stage with the real (tiny) models -----------------------------------------------------

@pytest.mark.ray
def test_filter_stage_drops_exactly_planted_rows_and_resumes(tmp_path, ray_session):
    from raugment.models.clip import write_tiny_clip
    from raugment.models.diffusion import write_tiny_sd

    normal = [png(draw(10 + i, 64)) for i in range(6)]
    nsfw, dark, small = png(checkerboard()), png(Image.new("RGB", (64, 64))), png(draw(30, 24))
    sd_dir, clip_dir = write_tiny_sd(tmp_path / "sd"), write_tiny_clip(tmp_path / "clip")
    plant_nsfw(sd_dir, nsfw, [*normal, dark, small])
    plant_aesthetic(clip_dir, tmp_path / "aesthetic", dark, [*normal, nsfw, small])

    rows = [row(f"n{i}", b, label=i % 2, rank=i) for i, b in enumerate(normal)]
    rows += [row("p-nsfw", nsfw, label=0), row("p-dark", dark, label=1), row("p-small", small, label=1),
             row("p-broken", b"\xff\xd8 truncated jpeg", label=0)]
    added = make_artifact(tmp_path / "in", "retrieve", rows, shards=2)
    cfg = Config()
    cfg.run.root = str(tmp_path / "runs")
    cfg.run.progress = False
    cfg.filter = FilterConfig(filters=["min_size", "nsfw", "aesthetic", "clip_similarity"],
                              min_side=MIN_SIDE, safety_model=str(sd_dir), aesthetic_model=str(tmp_path / "aesthetic"),
                              clip_model=str(clip_dir), clip_pretrained=None, device="cpu",
                              pool=ActorPoolConfig(concurrency=1, num_cpus=0.5, batch_size=4))

    # an earlier attempt was killed while writing the first output shard (images part, no
    # "dropped" marker): the shard is made again and replaced, no row appears twice
    earlier = StageRun(cfg.run.root, F.STAGE, F.resolve_config(cfg), {"added": added})
    earlier.prepare(resumable=True)
    earlier.write(S.to_table([dict(rows[0], filters=["min_size", "nsfw", "aesthetic", "clip_similarity"])]),
                  "images", shard=F.output_shard(0, 0, F.SHARD_ROWS))

    out = F.run(cfg, added)
    assert out.path == earlier.path
    kept = out.read("images")
    assert sorted(kept.column(S.ID).to_pylist()) == [f"n{i}" for i in range(6)]
    fresh = [r for r in kept.to_pylist() if r[S.ID] != "n0"]
    for r in fresh:
        assert r[S.FILTERS] == ["min_size", "nsfw", "aesthetic", "clip_similarity"]
        assert r[S.NSFW_SCORE] <= 0 and r[S.AESTHETIC_SCORE] >= 5.0
        assert -1 <= r[S.CLIP_SIMILARITY] <= 1 and (r[S.WIDTH], r[S.HEIGHT]) == (64, 64)
    dropped = {r[S.ID]: r for r in out.read("dropped").to_pylist()}
    assert {k: (r[S.REASON], r[S.DETAIL]) for k, r in dropped.items()} == {
        "p-nsfw": ("nsfw", "nsfw"), "p-dark": ("aesthetic", "aesthetic"),
        "p-small": ("min_size", "min_size"), "p-broken": ("undecodable", "not_an_image")}
    assert dropped["p-nsfw"][S.SCORE] > 0 and dropped["p-dark"][S.SCORE] < 5
    assert dropped["p-small"][S.SCORE] == 24
    stats = out.stats
    assert stats["counts"] == {"input": 10, "kept": 6, "dropped": 4}
    assert stats["failures"] == {"nsfw": 1, "aesthetic": 1, "min_size": 1, "undecodable": 1}
    assert stats["dropped_by_class"] == {"class0": {"nsfw": 1, "undecodable": 1},
                                         "class1": {"aesthetic": 1, "min_size": 1}}
    assert F.run(cfg, added).path == out.path


@pytest.mark.ray
def test_filter_command_filters_and_dedup_command_dedups(tmp_path, ray_session):
    """``raugment filter --added DIR`` runs only the filter stage on DIR; ``raugment dedup --added``
    on the filter's output de-duplicates it (``raugment dedup --method M`` plans filter -> dedup)."""
    from raugment.cli import main
    from raugment.core.storage import latest

    base = draw(40, 64)
    rows = [row("keep", png(base), rank=0), row("copy", png(base.resize((48, 48))), rank=1),
            row("tiny", png(draw(41, 24)), rank=2), row("other", png(draw(42, 64)), rank=3)]
    added = make_artifact(tmp_path / "in", "generate", rows)
    root = tmp_path / "runs"
    sets = ["--set", f"run.root={root}", "--set", "filter.filters=[min_size]", "--set", "run.progress=false"]
    assert main(["filter", "--added", str(added.path), *sets]) == 0
    filtered = latest(root, "filter")
    assert filtered.read("dropped").column(S.ID).to_pylist() == ["tiny"]
    assert latest(root, "dedup") is None and latest(root, "generate") is None  # the pin is only read
    assert main(["dedup", "--added", str(filtered.path), *sets]) == 0
    deduped = latest(root, "dedup")
    assert sorted(deduped.read("images").column(S.ID).to_pylist()) == ["keep", "other"]
    assert deduped.read("dropped").to_pylist()[0][S.DUPLICATE_OF] == "keep"


@pytest.mark.ray
def test_filter_runs_in_a_study_scope_share_actors_and_models_with_the_same_tables(tmp_path, ray_session,
                                                                                   tiny_sd, monkeypatch):
    """Two filter runs in one scope: the second reuses the first one's actor process and its loaded
    safety checker; spans and shard flushes cut the input, and the tables equal fresh runs'."""
    from raugment.runtime.cluster import POOLS, keep_pools

    monkeypatch.setattr(F, "SPAN_ROWS", 3)    # several calls per input shard
    monkeypatch.setattr(F, "SHARD_ROWS", 3)   # an output shard per call
    inputs = [make_artifact(tmp_path / f"in{k}", "generate",
                            [row(f"{k}-{i}", png(draw(50 + 10 * k + i, 24 if i % 4 == 0 else 48)), label=i % 2, rank=i)
                             for i in range(9)], shards=2) for k in range(2)]

    def cfg(root):
        c = Config()
        c.run.root, c.run.progress = str(root), False
        c.filter = FilterConfig(filters=["min_size", "nsfw"], min_side=MIN_SIDE, safety_model=str(tiny_sd),
                                device="cpu", pool=ActorPoolConfig(concurrency=1, num_cpus=0.5, batch_size=2))
        return c

    def tables(art):
        return {name: sorted(art.read(name).to_pylist(), key=lambda r: r[S.ID]) for name in ("images", "dropped")}

    with keep_pools():
        scoped = [F.run(cfg(tmp_path / "scope"), a) for a in inputs]
    first, second = (a.stats for a in scoped)
    assert first["model_loads"] == 1 and not first["actors_reused"]
    assert second["pids"] == first["pids"] and second["actors_reused"] and second["model_loads"] == 0
    assert POOLS.idle_pids() == []
    assert len(scoped[0].files("images")) + len(scoped[0].files("dropped")) >= 3   # flushed as it went
    for k, (art, added) in enumerate(zip(scoped, inputs)):
        fresh = F.run(cfg(tmp_path / "alone"), added)
        assert fresh.stats["pids"] != first["pids"]
        got = tables(art)
        assert got == tables(fresh)
        too_small = {r[S.ID] for r in got["dropped"] if r[S.REASON] == "min_size"}
        assert too_small == {f"{k}-{i}" for i in (0, 4, 8)}
        assert len(got["images"]) + len(got["dropped"]) == 9


@pytest.mark.ray
def test_a_resumed_filter_writes_the_shards_an_uninterrupted_run_writes(tmp_path, ray_session, monkeypatch):
    """Output shards are fixed row ranges of the input files: finished ones are kept as they are,
    an unfinished one is made again whole, and the result equals an uninterrupted run's."""
    monkeypatch.setattr(F, "SPAN_ROWS", 2)
    monkeypatch.setattr(F, "SHARD_ROWS", 4)   # two calls per output shard
    rows = [row(f"r{i}", png(draw(70 + i, 24 if i % 3 == 0 else 48)), label=i % 2, rank=i) for i in range(10)]
    added = make_artifact(tmp_path / "in", "generate", rows, shards=2)   # 5 + 5 rows
    cfg = Config()
    cfg.run.root, cfg.run.progress = str(tmp_path / "runs"), False
    cfg.filter = FilterConfig(filters=["min_size"], min_side=MIN_SIDE,
                              pool=ActorPoolConfig(concurrency=1, num_cpus=0.5, batch_size=2))
    art = F.run(cfg, added)
    names = {t: sorted(f.name for f in (art.path / t).glob("part-*.parquet")) for t in ("images", "dropped")}
    assert names["dropped"] == [f"part-f{k:05d}-r{g:06d}.parquet" for k in (0, 1) for g in (0, 1)]
    first = {(t, n): pq.read_table(art.path / t / n) for t, ns in names.items() for n in ns}
    kept_before = (art.path / "dropped" / names["dropped"][0]).stat().st_mtime_ns
    # killed in the middle of the last output shard: neither of its parts was written
    (art.path / "_SUCCESS").unlink()
    for t in ("images", "dropped"):
        (art.path / t / "part-f00001-r000001.parquet").unlink(missing_ok=True)
    again = F.run(cfg, added)
    assert {t: sorted(f.name for f in (again.path / t).glob("part-*.parquet")) for t in names} == names
    for (t, n), table in first.items():
        assert pq.read_table(again.path / t / n).equals(table), (t, n)
    assert (again.path / "dropped" / names["dropped"][0]).stat().st_mtime_ns == kept_before  # not redone
    assert again.stats["counts"] == {"input": 10, "kept": 6, "dropped": 4}
