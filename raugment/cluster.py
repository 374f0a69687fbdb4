"""Reaching Ray, and turning config sections into Ray resource arguments.

Resources for every Ray operation come from config (never hard-coded in a stage). The defaults are
sized so they run on a 2-CPU machine without the three hangs in STACK-NOTES: actor pools use
fractional CPUs (their read tasks still get a CPU), Train workers use 0.5 CPU (ingest still runs),
and the dashboard is on so Tune can clean up the placement groups of early-stopped trials.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator

from raugment.config import ActorPoolConfig, ClusterConfig, Config, ConfigError, WorkersConfig

log = logging.getLogger(__name__)


def init_ray(cfg: ClusterConfig, progress: bool = True, runtime_env: dict | None = None) -> None:
    """Start or join Ray once per process.

    ``cfg.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) joins an existing cluster;
    otherwise a local one is started with the configured CPUs/GPUs. ``runtime_env`` is passed
    through (tests use it to make their own modules importable in workers).
    """
    import ray

    if ray.is_initialized():
        return
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


def _resource_requests(section: Any, key: str) -> Iterator[tuple[str, float, float]]:
    """(dotted key, CPUs, GPUs) of every actor pool / worker group in a config section."""
    if isinstance(section, ActorPoolConfig):
        yield key, section.num_cpus, section.num_gpus
    elif isinstance(section, WorkersConfig):
        n = section.num_workers
        yield key, n * section.cpus_per_worker, n * section.gpus_per_worker if section.use_gpu else 0.0
    elif dataclasses.is_dataclass(section):
        for f in dataclasses.fields(section):
            yield from _resource_requests(getattr(section, f.name), f"{key}.{f.name}")


def check_resources(cfg: Config, stage: str) -> None:
    """A stage asking a local cluster of known size for more than it has would wait forever:
    say so before starting anything. Clusters joined by address are not checked (they scale).

    Raises:
        ConfigError: naming the resource key, what it asks and what ``cluster`` offers.
    """
    c = cfg.cluster
    section = getattr(cfg, stage, None)
    if c.address or os.environ.get("RAY_ADDRESS") or section is None:
        return
    for key, cpus, gpus in _resource_requests(section, stage):
        if c.num_cpus is not None and cpus > c.num_cpus:
            raise ConfigError(f"{key} asks for {cpus:g} CPUs but cluster.num_cpus={c.num_cpus}; lower it "
                              "(fractions such as 0.5 are fine) or raise cluster.num_cpus")
        if c.num_gpus is not None and gpus > c.num_gpus:
            raise ConfigError(f"{key} asks for {gpus:g} GPUs but cluster.num_gpus={c.num_gpus}; set its "
                              "num_gpus to 0 (CPU) or use_gpu=false, or join a cluster with GPUs")


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
