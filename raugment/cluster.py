"""Reaching Ray, and turning config sections into Ray resource arguments.

Resources for every Ray operation come from config (never hard-coded in a stage). The defaults are
sized so they run on a 2-CPU machine without the three hangs in STACK-NOTES: actor pools use
fractional CPUs (their read tasks still get a CPU), Train workers use 0.5 CPU (ingest still runs),
and the dashboard is on so Tune can clean up the placement groups of early-stopped trials.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from raugment.config import ActorPoolConfig, ClusterConfig, WorkersConfig

log = logging.getLogger(__name__)

# Stages call init_ray lazily, some from the study's training threads: start Ray only once.
_INIT_LOCK = threading.Lock()


def init_ray(cfg: ClusterConfig, progress: bool = True, runtime_env: dict | None = None) -> None:
    """Start or join Ray once per process.

    ``cfg.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) joins an existing cluster;
    otherwise a local one is started with the configured CPUs/GPUs. ``runtime_env`` is passed
    through (tests use it to make their own modules importable in workers).
    """
    import ray

    with _INIT_LOCK:
        if not ray.is_initialized():
            _start(cfg, progress, runtime_env)


def _start(cfg: ClusterConfig, progress: bool, runtime_env: dict | None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        kwargs: dict[str, Any] = {"include_dashboard": cfg.include_dashboard, "log_to_driver": True,
                                  "runtime_env": runtime_env}
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.num_gpus is not None:
            kwargs["num_gpus"] = cfg.num_gpus
        if cfg.temp_dir:
            kwargs["_temp_dir"] = os.path.abspath(cfg.temp_dir)
        if cfg.object_store_memory:
            kwargs["object_store_memory"] = cfg.object_store_memory
        log.info("starting a local Ray (%s)", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
        ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress


def actor_pool_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """``map_batches`` keyword arguments for a callable class on an actor pool."""
    import ray.data

    return {
        "compute": ray.data.ActorPoolStrategy(size=pool.concurrency),
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        "batch_size": pool.batch_size,
    }


def scaling_config(workers: WorkersConfig):
    """A Ray Train ``ScalingConfig`` from a workers section."""
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        per_worker["GPU"] = workers.gpus_per_worker
    return ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                         resources_per_worker=per_worker)


def pick_device(preference: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible to this process, else ``"cpu"``."""
    if preference != "auto":
        return preference
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
