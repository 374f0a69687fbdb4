"""The default resources must not hang on this machine (STACK-NOTES, hangs 1 and 2).

Each test here would hang — and the timeout turn it into a failure — if the defaults in
config.py took every CPU: an actor pool holding all CPUs starves its own read tasks, and Train
workers at 1 CPU each leave nothing for Ray Data ingest.
"""

import numpy as np
import pytest

from raugment.cluster import actor_pool_args, scaling_config
from raugment.config import ActorPoolConfig, Config, WorkersConfig


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
