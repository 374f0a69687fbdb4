"""Reaching Ray, and turning config sections into Ray resource arguments.

Resources for every Ray operation come from config (never hard-coded in a stage). The defaults are
sized so they run on a 2-CPU machine without the three hangs in STACK-NOTES: actor pools use
fractional CPUs (their read tasks still get a CPU), Train workers use 0.5 CPU (ingest still runs),
and the dashboard is on so Tune can clean up the placement groups of early-stopped trials.
:class:`ActorGroup` keeps actors up across many calls, for stages that map in rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Iterator, Sequence

from raugment.config import ActorPoolConfig, ClusterConfig, Config, ConfigError, WorkersConfig

log = logging.getLogger(__name__)

# Stages call init_ray lazily, some from the study's training threads: start Ray only once.
_INIT_LOCK = threading.Lock()
# Whether init_ray joined an existing cluster (which may scale up) rather than starting one here.
_JOINED = False


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

    global _JOINED
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    _JOINED = bool(address)
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


def _resource_requests(section: Any, key: str) -> Iterator[tuple[str, float, float, bool]]:
    """(dotted key, CPUs, GPUs, GPU optional) of every actor pool / worker group in a config section."""
    if isinstance(section, ActorPoolConfig):
        yield key, section.num_cpus, section.num_gpus, section.gpu_fallback
    elif isinstance(section, WorkersConfig):
        n = section.num_workers
        yield key, n * section.cpus_per_worker, n * section.gpus_per_worker if section.use_gpu else 0.0, False
    elif dataclasses.is_dataclass(section):
        for f in dataclasses.fields(section):
            yield from _resource_requests(getattr(section, f.name), f"{key}.{f.name}")


def local_gpu_count(cfg: ClusterConfig) -> int:
    """GPUs a local cluster started here will have, without starting Ray or importing torch:
    ``cluster.num_gpus`` when set, else the NVIDIA devices this process may use
    (``CUDA_VISIBLE_DEVICES`` when set, else ``/dev/nvidia<N>``)."""
    if cfg.num_gpus is not None:
        return int(cfg.num_gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    import glob

    return len(glob.glob("/dev/nvidia[0-9]*"))


def _joined(cfg: ClusterConfig) -> bool:
    """Whether this process joins an existing cluster (which may scale) rather than starting one."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def _gpu_error(key: str, gpus: float, have: float, where: str) -> ConfigError:
    if have <= 0:
        fix = ("set its num_gpus to 0 to run on CPU (slow for diffusion and ResNet-50)"
               if not key.endswith("workers") else "set use_gpu=false to run on CPU")
        return ConfigError(f"{key} asks for {gpus:g} GPUs but {where} has none; {fix}, or run where "
                           "there is a GPU")
    return ConfigError(f"{key} asks for {gpus:g} GPUs but {where} has {have:g}; lower its num_gpus / "
                       "workers, or join a cluster with more GPUs")


def check_resources(cfg: Config, stage: str) -> None:
    """A stage asking a local cluster of known size for more than it has would wait forever:
    say so before starting anything. Clusters joined by address are not checked (they scale).

    GPUs follow one policy everywhere (see :func:`available_gpus`): a pool with
    ``gpu_fallback`` runs on CPU when there is no GPU; any other GPU request that the local
    cluster cannot meet is an error here.

    Raises:
        ConfigError: naming the resource key, what it asks and what ``cluster`` offers.
    """
    c = cfg.cluster
    section = getattr(cfg, stage, None)
    if _joined(c) or section is None:
        return
    gpus_here: int | None = None
    for key, cpus, gpus, optional in _resource_requests(section, stage):
        if c.num_cpus is not None and cpus > c.num_cpus:
            raise ConfigError(f"{key} asks for {cpus:g} CPUs but cluster.num_cpus={c.num_cpus}; lower it "
                              "(fractions such as 0.5 are fine) or raise cluster.num_cpus")
        if gpus <= 0:
            continue
        gpus_here = local_gpu_count(c) if gpus_here is None else gpus_here
        if gpus > gpus_here and not (optional and gpus_here == 0):
            where = f"cluster.num_gpus={c.num_gpus}" if c.num_gpus is not None else "this machine"
            raise _gpu_error(key, gpus, gpus_here, where)


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


def available_gpus(pool: ActorPoolConfig, key: str) -> float:
    """The GPUs per actor to ask Ray for, by the one GPU policy (see :func:`check_resources`).

    A GPU request on a cluster without GPUs: 0 (CPU, logged) when ``pool.gpu_fallback``; else an
    error on a local cluster (its actors would wait forever), and the request as it is on a joined
    cluster (an autoscaler may add GPU nodes). More GPUs than a GPU cluster has is an error.
    """
    import ray

    if pool.num_gpus <= 0:
        return 0.0
    have = ray.cluster_resources().get("GPU", 0)
    if have <= 0 and pool.gpu_fallback:
        log.info("%s.num_gpus=%s but the Ray cluster has no GPU: its actors run on CPU", key, pool.num_gpus)
        return 0.0
    if have <= 0 and not _JOINED:
        raise _gpu_error(key, pool.num_gpus, 0, "this Ray cluster")
    if 0 < have < pool.num_gpus:
        raise ConfigError(f"{key}.num_gpus={pool.num_gpus} but this Ray cluster has {have} GPUs; "
                          f"set {key}.num_gpus to at most {have}")
    return float(pool.num_gpus)


class _Hosted:
    """A Ray actor that builds one plain object and calls its methods (see :class:`ActorGroup`)."""

    def __init__(self, cls: type, args: tuple, kwargs: dict):
        self.obj = cls(*args, **kwargs)

    def whoami(self) -> tuple[str, int]:
        import ray

        return ray.get_runtime_context().get_actor_id(), os.getpid()

    def call(self, method: str, item: Any) -> tuple[str, Any]:
        import ray

        return ray.get_runtime_context().get_actor_id(), getattr(self.obj, method)(item)


class ActorGroup:
    """``pool.concurrency`` Ray actors hosting ``cls(*args, **kwargs)``, started once, reused by every map.

    Ray Data starts a fresh actor pool for every Dataset it executes, so a stage that maps again and
    again (retrieval's k rounds) would pay process start-up and model loading every time; these
    actors live until :meth:`close` (use the group as a context manager). ``ray.util.ActorPool``
    hands each item to the next idle actor. Actors are restarted (and their call retried) up to
    twice when their process dies, so methods must be safe to repeat.

    Attributes:
        name: label for logs and stats.
        actors: the actor handles.
        started: actor id -> process id of every actor this group started.
        served: actor id -> number of calls it answered.
    """

    def __init__(self, cls: type, pool: ActorPoolConfig, *args: Any, num_gpus: float | None = None,
                 name: str | None = None, **kwargs: Any):
        import ray
        from ray.util import ActorPool

        self.name = name or cls.__name__
        self.batch_size = pool.batch_size
        remote = ray.remote(_Hosted).options(
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus if num_gpus is None else num_gpus,
            max_restarts=2, max_task_retries=2)
        self.actors = [remote.remote(cls, args, kwargs) for _ in range(pool.concurrency)]
        self.started: dict[str, int] = dict(ray.get([a.whoami.remote() for a in self.actors]))
        self.served: dict[str, int] = {}
        self._pool = ActorPool(self.actors)
        log.info("started %d %s actor(s)", len(self.actors), self.name)

    def map(self, method: str, items: Sequence[Any], ordered: bool = True) -> Iterator[Any]:
        """``obj.method(item)`` for each item across the actors; results in order, or as they finish."""
        def submit(actor: Any, item: Any) -> Any:
            return actor.call.remote(method, item)

        results = self._pool.map(submit, list(items)) if ordered else self._pool.map_unordered(submit, list(items))
        for actor_id, result in results:
            self.served[actor_id] = self.served.get(actor_id, 0) + 1
            yield result

    def batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        """``items`` cut into batches of ``pool.batch_size``."""
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def stats(self) -> dict[str, Any]:
        """Actors started (actor id -> pid) and calls served per actor id (a stage's ``stats.json`` records these)."""
        return {"started": len(self.started), "pids": dict(self.started), "served": dict(self.served)}

    def close(self) -> None:
        """Stop the actors."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "ActorGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
