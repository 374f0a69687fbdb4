import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from raugment.core import schema as S
from raugment.core.storage import SUCCESS, Artifact, StageRun, run_stage
from raugment.stages.train.config import TrainConfig


def _rows(ids, label=0):
    return S.to_table([{"id": i, "label": label, "split": "train"} for i in ids])


def test_stage_writes_contract_and_skips_rerun(tmp_path):
    calls = []

    def body(run: StageRun):
        calls.append(1)
        run.write(_rows(["a", "b"]), shard="0")
        run.write(_rows(["c"]), shard="1")
        run.stats.add("images", 3)
        run.stats.fail("http_404", 2)

    art = run_stage(tmp_path, "demo", TrainConfig(), {}, body)
    assert (art.path / SUCCESS).exists() and (art.path / "config.yaml").exists()
    stats = json.loads((art.path / "stats.json").read_text())
    assert stats["counts"] == {"images": 3} and stats["failures"] == {"http_404": 2}
    assert {"wall_s", "cpu_s", "gpu_s"} <= set(stats)
    assert sorted(art.read().column("id").to_pylist()) == ["a", "b", "c"]
    again = run_stage(tmp_path, "demo", TrainConfig(), {}, body)
    assert again.path == art.path and len(calls) == 1
    other = run_stage(tmp_path, "demo", TrainConfig(lr=0.5), {}, body)
    assert other.path != art.path and len(calls) == 2


def test_input_key_changes_output_dir(tmp_path):
    up = run_stage(tmp_path, "up", {"v": 1}, {}, lambda r: r.write(_rows(["x"])))
    up2 = run_stage(tmp_path, "up", {"v": 2}, {}, lambda r: r.write(_rows(["y"])))
    down1 = run_stage(tmp_path, "down", {"d": 0}, {"data": up}, lambda r: None)
    down2 = run_stage(tmp_path, "down", {"d": 0}, {"data": up2}, lambda r: None)
    assert down1.key != down2.key


def test_incomplete_stage_is_not_complete_and_open_refuses(tmp_path):
    run = StageRun(tmp_path, "s", {"a": 1})
    run.prepare(resumable=True)
    run.write(_rows(["a"]))
    assert not run.complete
    with pytest.raises(ValueError, match="not a complete stage output"):
        Artifact.open(run.path)


def _killed_writer(root):
    def body(run: StageRun):
        run.write(_rows(["a", "b"]), shard="0")
        # a half-written shard: a temp file as an interrupted write leaves it
        (run.path / "images" / ".tmp-deadbeef.parquet").write_bytes(b"PAR1 partial")
        os.kill(os.getpid(), signal.SIGKILL)
    run_stage(root, "gen", {"n": 4}, {}, body, resumable=True)


def test_killed_stage_resumes_without_partial_or_duplicates(tmp_path):
    p = mp.get_context("fork").Process(target=_killed_writer, args=(tmp_path,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    run_dir = next((tmp_path / "gen").iterdir())
    assert not (run_dir / SUCCESS).exists()

    seen = {}

    def body(run: StageRun):
        done = run.done_ids()
        seen["done"] = set(done)
        todo = [i for i in ["a", "b", "c", "d"] if i not in done]
        run.write(_rows(todo), shard="1")

    art = run_stage(tmp_path, "gen", {"n": 4}, {}, body, resumable=True)
    assert seen["done"] == {"a", "b"}
    ids = art.read().column("id").to_pylist()
    assert sorted(ids) == ["a", "b", "c", "d"]
    assert not list(art.path.rglob(".tmp-*"))


def test_non_resumable_stage_starts_clean(tmp_path):
    run = StageRun(tmp_path, "t", {"a": 1})
    run.prepare(resumable=True)
    run.write(_rows(["stale"]))
    art = run_stage(tmp_path, "t", {"a": 1}, {}, lambda r: r.write(_rows(["fresh"])))
    assert art.read().column("id").to_pylist() == ["fresh"]


def test_to_table_rejects_unknown_columns_and_fills_nulls():
    t = S.to_table([{"id": "a", "label": 1, "params": {"steps": 2}}])
    assert t.schema == S.IMAGES and t.column("url").to_pylist() == [None]
    assert json.loads(t.column("params")[0].as_py()) == {"steps": 2}
    with pytest.raises(ValueError, match="not in the schema"):
        S.to_table([{"id": "a", "label": 1, "colour": "red"}])


def test_phash_roundtrip():
    for v in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        assert S.int64_to_phash(S.phash_to_int64(v)) == v
        assert -(1 << 63) <= S.phash_to_int64(v) < (1 << 63)


def test_relative_root_gives_absolute_artifact_paths(tmp_path, monkeypatch):
    # Ray Train workers run in another working directory: artifact paths must not depend on cwd.
    monkeypatch.chdir(tmp_path)
    art = run_stage("runs/rel", "s", {"a": 1}, {}, lambda r: r.write(_rows(["x"])))
    assert art.path.is_absolute() and art.path == (tmp_path / "runs/rel/s" / art.key)
    monkeypatch.chdir("/")
    assert art.read().column("id").to_pylist() == ["x"]
    assert Artifact.open(art.path).path == art.path


def test_atomic_dir_replaces_whole_and_restart_removes_a_killed_writers_dir(tmp_path):
    from raugment.core.storage import atomic_dir

    final = tmp_path / "s" / "k" / "ckpt"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "old"  # a failed writer leaves the old one whole
    with atomic_dir(final) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    # what a SIGKILLed writer leaves: a temp directory with files in it
    stray = final.parent / ".tmp-dead"
    (stray / "sub").mkdir(parents=True)
    (stray / "sub" / ".tmp-x").write_text("partial")
    run = StageRun(tmp_path, "s", {"a": 1})
    run.path = tmp_path / "s" / "k"
    run.prepare(resumable=True)
    assert not stray.exists() and final.exists()


def test_two_threads_reaching_one_key_run_it_once(tmp_path):
    import threading

    bodies = []

    def body(run):
        bodies.append(run.key)
        time.sleep(0.3)  # the second thread arrives while the first is still writing

    out = []
    threads = [threading.Thread(target=lambda: out.append(run_stage(tmp_path, "train", {"a": 1}, {}, body)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(bodies) == 1 and len(out) == 2 and out[0].path == out[1].path and out[0].complete
