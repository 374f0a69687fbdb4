"""Measured cost: the CPU (and GPU) seconds of Ray actors and DDP ranks reach the stage's stats.json.

The driver's own CPU time says nothing about a stage whose work runs in actors: each actor and rank
measures its own process and the stage run it serves sums them (``usage`` by where it was spent).
"""

import json
import sys
import time

import pytest

from raugment.core.config import ActorPoolConfig, WorkersConfig
from raugment.core.storage import Stats, run_stage

BURN_S = 0.4


def _burn(seconds: float) -> int:
    """Spin on this process's CPU for ``seconds`` of CPU time."""
    t0, n = time.process_time(), 0
    while time.process_time() - t0 < seconds:
        n += sum(range(1000))
    return n


class _Burner:
    def burn(self, seconds: float) -> int:
        return _burn(seconds)


def burn_member(member, seconds: float) -> int:
    return _burn(seconds)


def test_stats_charge_totals_and_usage_by_place():
    stats = Stats()
    stats.charge("actors", 2.0, 0.5)
    stats.charge("actors", 1.0)
    stats.charge("driver", 0.25, calls=0)
    out = stats.to_dict()
    assert out["cpu_s"] == 3.25 and out["gpu_s"] == 0.5
    assert out["usage"] == {"actors": {"cpu_s": 3.0, "gpu_s": 0.5, "calls": 2},
                            "driver": {"cpu_s": 0.25, "gpu_s": 0.0, "calls": 0}}


@pytest.mark.timeout(240)
def test_a_stage_whose_work_runs_in_actors_reports_their_cpu_seconds(ray_session, tmp_path):
    import ray.cloudpickle

    from raugment.runtime.cluster import ActorGroup

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    group = ActorGroup(_Burner, ActorPoolConfig(concurrency=2), num_gpus=0.0, name="burn")
    try:
        group.wait_ready()

        def body(run):
            assert sum(group.map("burn", [BURN_S] * 4)) > 0

        art = run_stage(tmp_path, "burn", {"x": 1}, None, body)
    finally:
        group.close()
    stats = json.loads((art.path / "stats.json").read_text())
    actors = stats["usage"]["actors"]
    assert actors["calls"] == 4
    assert actors["cpu_s"] >= 4 * BURN_S * 0.95          # every call's own CPU, not the driver's
    assert stats["usage"]["driver"]["cpu_s"] < actors["cpu_s"]
    assert stats["cpu_s"] >= actors["cpu_s"] + stats["usage"]["driver"]["cpu_s"] - 0.01
    assert actors["gpu_s"] == 0.0
    assert group.cpu_s == pytest.approx(actors["cpu_s"], abs=0.01)


@pytest.mark.timeout(240)
def test_worker_group_ranks_charge_their_cpu_seconds_to_the_stage(ray_session, tmp_path):
    import ray.cloudpickle

    from raugment.runtime.worker_group import run_with_retries

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    workers = WorkersConfig(num_workers=1, cpus_per_worker=0.5)

    def body(run):
        assert run_with_retries(workers, burn_member, BURN_S)[0] > 0

    art = run_stage(tmp_path, "burn", {"x": 2}, None, body)
    stats = json.loads((art.path / "stats.json").read_text())
    assert stats["usage"]["workers"]["calls"] == 1
    assert stats["usage"]["workers"]["cpu_s"] >= BURN_S * 0.95
    assert stats["cpu_s"] >= stats["usage"]["workers"]["cpu_s"]
