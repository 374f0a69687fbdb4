"""The default resources must not hang on a 2-CPU machine (Ray hangs silently when a pool or Train starves ingest).

Each test here would hang — and the timeout turn it into a failure — if the defaults in
config.py took every CPU: an actor pool holding all CPUs starves its own read tasks, and Train
workers at 1 CPU each leave nothing for Ray Data ingest.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from raugment.config import Config
from raugment.core.config import ActorPoolConfig, WorkersConfig
from raugment.runtime.cluster import actor_pool_args, scaling_config
from tests import REPO


class _Double:
    def __init__(self):
        self.factor = 2

    def __call__(self, batch):
        batch["y"] = batch["x"] * self.factor
        return batch


@pytest.mark.timeout(180)
def test_default_actor_pool_does_not_starve_reads(ray_session):
    import ray

    pool = ActorPoolConfig(concurrency=2)  # two actors at the default fractional CPU
    ds = ray.data.range(200, override_num_blocks=8).map_batches(
        lambda b: {"x": b["id"]}).map_batches(_Double, **actor_pool_args(pool))
    out = ds.take_all()
    assert sorted(r["y"] for r in out) == [2 * i for i in range(200)]


@pytest.mark.timeout(240)
def test_default_train_workers_leave_room_for_ingest(ray_session, tmp_path):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = tmp_path / "totals"
    out_dir.mkdir()

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        total = 0
        for batch in shard.iter_batches(batch_size=16):
            total += int(np.sum(batch["id"]))
        rank = ray.train.get_context().get_world_rank()
        (out_dir / f"{rank}.txt").write_text(str(total))

    workers = Config().train.workers
    assert workers.cpus_per_worker < 1
    trainer = TorchTrainer(
        loop,
        scaling_config=scaling_config(workers),
        datasets={"train": ray.data.range(64)},
        run_config=ray.train.RunConfig(name="hang-guard", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    totals = [int(p.read_text()) for p in sorted(out_dir.glob("*.txt"))]
    # every worker ingested a shard, and together exactly every row once
    assert len(totals) == workers.num_workers and sum(totals) == sum(range(64))


def test_scaling_config_from_workers():
    sc = scaling_config(WorkersConfig(num_workers=3, cpus_per_worker=0.5))
    assert sc.num_workers == 3 and sc.resources_per_worker == {"CPU": 0.5}
    gpu = scaling_config(WorkersConfig(num_workers=1, use_gpu=True, gpus_per_worker=1.0))
    assert gpu.use_gpu and gpu.resources_per_worker["GPU"] == 1.0


class _Scale:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, xs):
        return [x * self.factor for x in xs]


@pytest.mark.timeout(240)
def test_actor_groups_reuse_their_actors_and_retrieval_defaults_fit(ray_session):
    """Retrieval's three default pools (download, CLIP scoring, safety) up at once on 2 CPUs, reused."""
    import os

    from raugment.runtime.cluster import ActorGroup, available_gpus

    rcfg = Config().retrieve
    pools = {"download": rcfg.download.pool, "score": rcfg.score_pool, "safety": rcfg.safety_pool}
    assert sum(p.num_cpus * p.concurrency for p in pools.values()) < 2     # room left for other tasks
    groups = {k: ActorGroup(_Scale, p, 3, num_gpus=available_gpus(p, k), name=k) for k, p in pools.items()}
    try:
        for group in groups.values():
            for _ in range(3):                                             # three "rounds"
                items = group.batches(list(range(150)))
                assert [x for part in group.map("scale", items) for x in part] == [3 * x for x in range(150)]
                assert sorted(x for part in group.map("scale", items, ordered=False) for x in part) == \
                    [3 * x for x in range(150)]
            st = group.stats()
            assert st["started"] == len(group.actors) == pools[group.name].concurrency
            assert set(st["served"]) <= set(st["pids"]) and os.getpid() not in st["pids"].values()
            assert sum(st["served"].values()) == 6 * len(items)
        assert groups["download"].stats()["started"] == 2
    finally:
        for group in groups.values():
            group.close()


def test_leased_pools_follow_the_gpu_policy(ray_session, monkeypatch):
    """Every stage pool (generate, filter, index lease theirs) gets the policy from the lease: a GPU
    request on a local cluster without GPUs is an error naming the key, before any actor starts."""
    from raugment.core.config import ConfigError
    from raugment.runtime import cluster
    from raugment.runtime.cluster import POOLS

    monkeypatch.setattr(cluster, "_JOINED", False)
    started = POOLS.started
    with (pytest.raises(ConfigError, match="filter.pool asks for 1 GPUs but this Ray cluster has none"),
          POOLS.lease(_Scale, ActorPoolConfig(num_gpus=1), 2, name="filter", key="filter.pool")):
        pass
    assert POOLS.started == started
    with POOLS.lease(_Scale, ActorPoolConfig(num_gpus=0.5, num_cpus=0.25, gpu_fallback=True), 2) as group:
        assert group.resources[2] == 0.0 and list(group.map("scale", [[1, 2]])) == [[2, 4]]


def test_one_gpu_policy_for_every_pool(monkeypatch):
    """No GPU: a pool with gpu_fallback runs on CPU, any other request is an error on a local
    cluster and waits for the autoscaler on a joined one; more than there is: an error."""
    import ray

    from raugment.core.config import ConfigError
    from raugment.runtime import cluster
    from raugment.runtime.cluster import available_gpus, check_resources, local_gpu_count

    optional = Config().retrieve.score_pool
    assert optional.num_gpus > 0 and optional.gpu_fallback
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(cluster, "_JOINED", False)
    assert available_gpus(optional, "retrieve.score_pool") == 0.0          # no GPU: run on CPU, never wait
    with pytest.raises(ConfigError, match="generate.pool asks for 1 GPUs but this Ray cluster has none"):
        available_gpus(ActorPoolConfig(num_gpus=1), "generate.pool")
    monkeypatch.setattr(cluster, "_JOINED", True)
    assert available_gpus(ActorPoolConfig(num_gpus=1), "generate.pool") == 1.0  # GPU nodes may come
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    assert available_gpus(optional, "retrieve.score_pool") == 0.25
    assert available_gpus(ActorPoolConfig(num_gpus=0), "x") == 0.0
    with pytest.raises(ConfigError, match="retrieve.score_pool.num_gpus"):
        available_gpus(ActorPoolConfig(num_gpus=2, gpu_fallback=True), "retrieve.score_pool")
    # the same rule before Ray starts, from what the machine has
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cfg = Config()
    assert local_gpu_count(cfg.cluster) == 0
    check_resources(cfg.cluster, cfg.retrieve, "retrieve")                                         # fallback pools pass
    with pytest.raises(ConfigError, match="generate.pool asks for 1 GPUs but this machine has none"):
        check_resources(cfg.cluster, cfg.generate, "generate")                                     # default: a GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert local_gpu_count(cfg.cluster) == 2
    check_resources(cfg.cluster, cfg.generate, "generate")
    cfg.cluster.num_gpus = 1
    assert local_gpu_count(cfg.cluster) == 1


class _Gated:
    """Builds only once ``gate`` exists (so a test can tell whether starting a group waited for it)."""

    def __init__(self, gate, factor):
        import time

        while not Path(gate).exists():
            time.sleep(0.05)
        self.factor = factor

    def scale(self, xs):
        return [x * self.factor for x in xs]


@pytest.mark.timeout(240)
def test_starting_a_group_does_not_wait_for_its_actors(ray_session, tmp_path):
    from raugment.runtime.cluster import ActorGroup

    gate = tmp_path / "gate"
    group = ActorGroup(_Gated, ActorPoolConfig(concurrency=1, num_cpus=0.25), str(gate), 2)  # would hang if it waited
    try:
        assert not group.wait_ready(timeout_s=0.5)      # still building
        gate.touch()
        assert list(group.map("scale", [[1, 2]])) == [[2, 4]]
        assert group.wait_ready(timeout_s=0)
    finally:
        group.close()


@pytest.mark.timeout(300)
def test_pools_are_reused_inside_a_scope_and_released_outside(ray_session):
    from raugment.runtime.cluster import POOLS, keep_pools

    pool = ActorPoolConfig(concurrency=2, num_cpus=0.25, batch_size=2)
    items = [[1, 2], [3, 4], [5, 6]]
    started = POOLS.started
    with keep_pools():
        with POOLS.lease(_Scale, pool, 3, name="a") as first:
            assert [y for part in first.map("scale", items) for y in part] == [3, 6, 9, 12, 15, 18]
            info1 = first.info()
        assert len(POOLS.idle_pids()) == 1
        with POOLS.lease(_Scale, pool, 3, name="b") as second:          # equal args: same object, no build
            assert second is first and second.leases == 2
            assert list(second.map("scale", [[7]])) == [[21]]
            info2 = second.info()
        with POOLS.lease(_Scale, pool, 5, name="c") as third:           # other args: same processes, new object
            assert list(third.map("scale", [[7]])) == [[35]]
            info3 = third.info()
        with POOLS.lease(_Scale, ActorPoolConfig(concurrency=1, num_cpus=0.25), 3) as other:  # other resources
            assert other is not first
            other_pids = set(other.started.values())
        assert POOLS.started == started + 2
        pids = {i["pid"] for i in info1}
        assert len(pids) == 2 and pids == {i["pid"] for i in info2} == {i["pid"] for i in info3}
        assert not pids & other_pids
        assert [i["new_builds"] for i in info1] == [1, 1]             # one build per actor at start
        assert [i["new_builds"] for i in info2] == [0, 0]             # equal args: the model stays loaded
        assert [i["new_builds"] for i in info3] == [1, 1]             # re-hosted once per actor
        assert len(POOLS.idle_pids()) == 2
    assert POOLS.idle_pids() == [] and first.actors == [] and other.actors == []  # scope over: stopped
    # outside a scope a lease stops its actors at once
    with POOLS.lease(_Scale, pool, 3) as alone:
        assert list(alone.map("scale", [[1]])) == [[3]]
    assert alone.actors == [] and POOLS.idle_pids() == []


@pytest.mark.timeout(300)
def test_a_dead_actor_is_restarted_and_its_call_retried(ray_session):
    import os
    import signal
    import time

    from raugment.runtime.cluster import POOLS, keep_pools

    pool = ActorPoolConfig(concurrency=1, num_cpus=0.25)
    with keep_pools():
        with POOLS.lease(_Scale, pool, 2) as group:
            assert list(group.map("scale", [[1]])) == [[2]]
            (pid,) = group.started.values()
        os.kill(pid, signal.SIGKILL)                                   # dies while idle
        time.sleep(1.0)
        with POOLS.lease(_Scale, pool, 4) as again:                   # re-hosted in the restarted process
            assert again is group
            assert list(again.map("scale", [[1], [2]])) == [[4], [8]]
            (new_pid,) = again.started.values()
            assert new_pid != pid


@pytest.mark.timeout(300)
def test_a_group_ray_cannot_place_takes_the_cpus_of_idle_pools(ray_session):
    """Idle pools of a study must never make a new group wait for ever (2 CPUs here)."""
    import ray

    from raugment.runtime.cluster import POOLS, keep_pools

    cpus = ray.cluster_resources()["CPU"]
    with keep_pools():
        with POOLS.lease(_Scale, ActorPoolConfig(concurrency=1, num_cpus=cpus * 0.75), 2) as big:
            assert list(big.map("scale", [[1]])) == [[2]]
        assert len(POOLS.idle_pids()) == 1
        with POOLS.lease(_Gated, ActorPoolConfig(concurrency=1, num_cpus=cpus * 0.5), "/", 3) as next_:
            assert list(next_.map("scale", [[1]])) == [[3]]            # placed once the idle pool left
            assert big.actors == [] and POOLS.idle_pids() == []


class _Nice:
    def nice(self, _):
        import os

        return os.nice(0)


@pytest.mark.timeout(240)
def test_stage_actors_run_at_the_configured_niceness_not_rays_15(ray_session):
    """Ray starts workers at nice 15 by default: on a shared box every other process would take the
    CPU from the stage actors. A cluster started by init_ray uses cluster.worker_niceness (0)."""
    from raugment.config import from_dict
    from raugment.core.config import ClusterConfig, ConfigError
    from raugment.runtime.cluster import ActorGroup

    assert ClusterConfig().worker_niceness == 0
    with ActorGroup(_Nice, ActorPoolConfig(concurrency=1, num_cpus=0.25)) as group:
        assert list(group.map("nice", [None])) == [0]
    with pytest.raises(ConfigError, match="cluster.worker_niceness"):
        from_dict({"cluster": {"worker_niceness": -5}})


def test_match_torch_threads_follows_the_cpus_ray_assigned(monkeypatch):
    """A worker that imported torch before Ray assigned it CPUs (cluster.preload_modules) has the
    machine's thread count; match_torch_threads gives torch the count of OMP_NUM_THREADS."""
    import torch

    from raugment.runtime.cluster import match_torch_threads

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    monkeypatch.setenv("OMP_NUM_THREADS", str(wanted))
    try:
        assert match_torch_threads() == wanted
        assert torch.get_num_threads() == wanted
        monkeypatch.delenv("OMP_NUM_THREADS")  # outside Ray: nothing to follow, nothing changed
        torch.set_num_threads(before)
        assert match_torch_threads() == before and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


PRELOAD_DRIVER = """
import json, os, sys

from raugment.runtime.cluster import ActorGroup, init_ray
from raugment.core.config import ActorPoolConfig, ClusterConfig


class Probe:
    def __init__(self):
        import torch  # already imported when the worker started

        self.seen = {"probe": "preload_probe" in sys.modules, "threads": torch.get_num_threads(),
                     "omp": os.environ.get("OMP_NUM_THREADS")}

    def seen_at_start(self, _):
        return self.seen


init_ray(ClusterConfig(num_cpus=2, include_dashboard=False, temp_dir=sys.argv[1],
                       preload_modules=["torch", "preload_probe"]), progress=False)
with ActorGroup(Probe, ActorPoolConfig(concurrency=1, num_cpus=0.5)) as group:
    print(json.dumps(list(group.map("seen_at_start", [None]))[0]))
"""


@pytest.mark.timeout(240)
def test_preloaded_workers_start_actors_with_the_modules_imported(tmp_path):
    """cluster.preload_modules reaches the workers of a cluster init_ray starts: an actor finds the
    module imported before its constructor ran (nothing else imports it), and torch, imported
    before Ray gave the actor its half CPU, runs on that actor's one thread."""
    (tmp_path / "preload_probe.py").write_text("import time\nIMPORTED_AT = time.time()\n")
    (tmp_path / "driver.py").write_text(PRELOAD_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(tmp_path), str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("OMP_NUM_THREADS", None)
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    out = subprocess.run([sys.executable, str(tmp_path / "driver.py"), temp_dir], env=env, capture_output=True,
                         text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"probe": True, "threads": 1, "omp": "1"}
