"""The benchmarks' statistics and the side-environment helper (fast), and the download benchmark end to end (slow).

``benchmarks/`` and ``tools/`` are scripts, not packages: they are loaded by path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def download():
    return _load("benchmarks/download.py", "bench_download")


@pytest.fixture(scope="module")
def retrieve():
    return _load("benchmarks/retrieve.py", "bench_retrieve")


@pytest.fixture(scope="module")
def side_env():
    return _load("tools/side_env.py", "raugment_side_env_test")


# --- download: start-up and steady state apart -----------------------------------------------

def test_steady_rate_ignores_a_slow_start_and_a_straggling_tail(download):
    # 2 s before anything, 1,000 requests at 500/s, then 5 stragglers 3 s later
    arrivals = [2.0 + i / 500 for i in range(1000)] + [7.0 + i for i in range(5)]
    assert download.steady_rate(arrivals) == pytest.approx(500, rel=0.01)
    # the end-to-end rate of the same run is far lower: that is what the steady figure removes
    assert len(arrivals) / max(arrivals) < 150


def test_steady_rate_refuses_what_it_cannot_measure(download):
    with pytest.raises(ValueError, match="at least 10"):
        download.steady_rate([0.1] * 9)
    with pytest.raises(ValueError, match="one time stamp"):
        download.steady_rate([1.0] * 20)


def test_run_figures_start_up_is_spawn_to_first_request(download):
    arrivals = [10.5 + i / 100 for i in range(200)]   # spawned at 10.0, done at 13.0
    f = download.run_figures(10.0, 13.0, arrivals, 200, cpu_s=1.5)
    assert f["startup_s"] == pytest.approx(0.5)
    assert f["steady_url_s"] == pytest.approx(100, rel=0.02)
    assert f["e2e_url_s"] == pytest.approx(200 / 3.0)
    assert f["cores"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no request"):
        download.run_figures(0.0, 1.0, [], 10, 0.0)


def test_medians_per_figure(download):
    runs = [{"a": 1.0, "b": 10.0}, {"a": 5.0, "b": 30.0}, {"a": 3.0, "b": 20.0}]
    assert download.medians(runs) == {"a": 3.0, "b": 20.0}


def test_url_list_has_n_distinct_urls_with_five_percent_dead(download):
    urls = download.url_list("http://127.0.0.1:1/", ["img/a.jpg", "img/b.jpg", "img/c.jpg"], 1000)
    assert len(urls) == len(set(urls)) == 1000
    assert sum("missing" in u for u in urls) == 50
    assert urls[0] == "http://127.0.0.1:1/img/a.jpg?copy=0" and urls[3] == "http://127.0.0.1:1/img/a.jpg?copy=1"


# --- retrieve: mean overhead ± s.e., ratio of means -------------------------------------------

def test_overhead_ratio_of_means(retrieve):
    base = [1.0, 1.1, 0.9, 1.0]
    before = [b + o for b, o in zip(base, [3.0, 3.2, 2.8, 3.0])]
    after = [b + o for b, o in zip(base, [0.10, 0.12, 0.08, 0.10])]
    o = retrieve.overhead_summary(before, after, base, start_s=0.4)   # + 0.1 s per round
    assert o["before"] == pytest.approx(3.0) and o["after"] == pytest.approx(0.2)
    assert o["before_se"] == pytest.approx(math.sqrt(0.08 / 3 / 4))
    assert o["ratio"] == pytest.approx(15.0)


def test_overhead_ratio_is_not_a_division_by_noise(retrieve):
    """The persistent pool's overhead ~0 s: the old median ratio printed 2506x; now no ratio, a bound."""
    base = [1.0] * 6
    before = [4.0, 4.2, 3.8, 4.1, 3.9, 4.0]
    after = [1.0012, 0.9990, 1.0004, 0.9980, 1.0030, 1.0001]
    o = retrieve.overhead_summary(before, after, base, start_s=0.0)
    assert o["ratio"] is None
    assert 0 < o["ratio_lower"] < o["before"] / o["after"]   # before / (after + 2 s.e.): a finite bound
    with pytest.raises(ValueError, match="same number"):
        retrieve.overhead_summary([1.0, 2.0], [1.0], [1.0, 1.0], 0.0)


def test_dataset_paired_medians():
    dataset = _load("benchmarks/dataset.py", "bench_dataset")
    m = dataset.paired_medians([2.0, 4.0, 3.0], [1.0, 4.0, 1.0], images=120)
    assert m["plain_img_s"] == pytest.approx(40.0) and m["stage_img_s"] == pytest.approx(120.0)
    assert m["ratio"] == pytest.approx(2.0) and (m["ratio_min"], m["ratio_max"]) == (1.0, 3.0)
    with pytest.raises(ValueError):
        dataset.paired_medians([1.0], [1.0, 2.0], images=1)


# --- side environments: stamp and lock ---------------------------------------------------------

class _FakeInstaller:
    def __init__(self, sleep_s: float = 0.0, fail: bool = False):
        self.calls = 0
        self.sleep_s = sleep_s
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, venv: Path, lock: Path, deadline: float) -> None:
        with self._lock:
            self.calls += 1
        venv.mkdir(parents=True)      # fails if a concurrent build left it there
        (venv / "partial").write_text("x")
        time.sleep(self.sleep_s)
        if self.fail:
            raise RuntimeError("pip failed")


def test_side_env_builds_once_then_reuses_and_rebuilds_on_a_changed_lock(side_env, tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("pkg==1.0\n")
    fake = _FakeInstaller()
    venv, took = side_env.ensure_env("venv-x", lock, root=tmp_path / "envs", installer=fake)
    assert venv == tmp_path / "envs" / "venv-x" and took is not None and fake.calls == 1
    assert side_env.is_current(venv, lock)
    assert side_env.ensure_env("venv-x", lock, root=tmp_path / "envs", installer=fake) == (venv, None)
    assert fake.calls == 1
    lock.write_text("pkg==2.0\n")
    assert not side_env.is_current(venv, lock)
    _, took = side_env.ensure_env("venv-x", lock, root=tmp_path / "envs", installer=fake)
    assert took is not None and fake.calls == 2


def test_side_env_failed_build_leaves_no_stamp_and_is_rebuilt_from_nothing(side_env, tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("pkg==1.0\n")
    with pytest.raises(RuntimeError, match="pip failed"):
        side_env.ensure_env("venv-x", lock, root=tmp_path, installer=_FakeInstaller(fail=True))
    assert (tmp_path / "venv-x" / "partial").exists() and not side_env.is_current(tmp_path / "venv-x", lock)
    ok = _FakeInstaller()     # would fail on mkdir if the partial environment were kept
    _, took = side_env.ensure_env("venv-x", lock, root=tmp_path, installer=ok)
    assert took is not None and ok.calls == 1


def test_side_env_concurrent_callers_build_once(side_env, tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("pkg==1.0\n")
    fake = _FakeInstaller(sleep_s=0.3)
    results, errors = [], []

    def call():
        try:
            results.append(side_env.ensure_env("venv-x", lock, root=tmp_path, installer=fake))
        except Exception as exc:   # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and fake.calls == 1
    assert sorted(took is None for _, took in results) == [False, True, True, True]


def test_side_env_lock_wait_is_bounded(side_env, tmp_path):
    with side_env.file_lock(tmp_path / "x.lock", timeout_s=1.0), \
            pytest.raises(TimeoutError, match="stayed locked"), \
            side_env.file_lock(tmp_path / "x.lock", timeout_s=0.3, poll_s=0.05):
        pass


def test_side_env_root_follows_the_environment(side_env, monkeypatch, tmp_path):
    monkeypatch.setenv("RAUGMENT_SIDE_ENVS", str(tmp_path))
    assert side_env.side_envs_root() == tmp_path
    monkeypatch.setenv("RAUGMENT_SIDE_ENVS", "")
    assert side_env.side_envs_root() == Path.home() / ".cache" / "raugment"


# --- the download benchmark, end to end at a tiny size ----------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_download_benchmark_end_to_end(download, tmp_path, capsys):
    setup = _load("tools/img2dataset_env/setup_env.py", "img2dataset_setup_env")
    setup.ensure_img2dataset_env()        # built once (about a minute), reused afterwards
    t0 = time.monotonic()
    out = tmp_path / "dl.json"
    assert download.main(["--urls", "400", "--runs", "1", "--latency-ms", "0", "--pool-images", "80",
                          "--json", str(out)]) == 0
    took = time.monotonic() - t0
    report = json.loads(out.read_text())
    fig = report["latencies"]["0"]
    for tool in ("raugment", "img2dataset"):
        assert fig[tool]["ok"] == 400 - 400 // 20          # every live URL, no dead one
        assert 0 < fig[tool]["startup_s"] < 60
        assert fig[tool]["steady_url_s"] > fig[tool]["e2e_url_s"] > 0
    assert "ratio raugment/img2dataset: steady" in capsys.readouterr().out
    assert took < 60, f"the tiny benchmark took {took:.0f} s"


# --- index build: the planner's measured rate --------------------------------------------------


def test_index_build_benchmark_fits_the_planners_cost_model(capsys):
    """A tiny run of benchmarks/index_build.py gives the three rates the planner's index cost uses,
    and the planner's DEFAULT_COSTS carry a measured (non-zero) figure for each."""
    from raugment.study.planner import DEFAULT_COSTS, INDEX_RATE

    bench = _load("benchmarks/index_build.py", "bench_index_build")
    out = bench.main(["--train", "3000", "--add", "2000", "--nlist", "16", "64"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))
    assert set(out["points"]) == {16, 64} and out["threads"] == 1
    for key in INDEX_RATE:
        assert out[key] >= 0 and DEFAULT_COSTS[key] == INDEX_RATE[key] > 0
    assert out["points"][64]["add_s"] > 0 and out["points"][64]["train_s"] > 0
