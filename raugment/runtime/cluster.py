"""Reaching Ray, and turning config sections into Ray resource arguments.

Resources for every Ray operation come from config (never hard-coded in a stage). The defaults are
sized so they run on a 2-CPU machine without Ray's three known hangs there: actor pools use
fractional CPUs (their read tasks still get a CPU), Train workers use 0.5 CPU (ingest still runs),
and the dashboard is on so Tune can clean up the placement groups of early-stopped trials.
:class:`ActorGroup` keeps actors up across many calls, for stages that map in rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from raugment.core.config import ActorPoolConfig, ClusterConfig, ConfigError, WorkersConfig
from raugment.core.storage import charge

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
    _JOINED = _joined(cfg)
    if address:
        log.info("joining Ray cluster at %s", address)
        if cfg.preload_modules:
            log.info("cluster.preload_modules applies to a cluster started here; this one preloads what its "
                     "nodes were started with (RAY_preload_python_modules=%s at `ray start`)",
                     ",".join(cfg.preload_modules))
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
        if cfg.preload_modules:
            kwargs["_system_config"] = {"preload_python_modules": list(cfg.preload_modules)}
        # read by the raylet this starts (a joined cluster's raylets were started elsewhere)
        os.environ["RAY_worker_niceness"] = str(cfg.worker_niceness)  # noqa: SIM112 - Ray's own (lower-case) name
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


def check_resources(cluster: ClusterConfig, section: Any, key: str) -> None:
    """A stage asking a local cluster of known size for more than it has would wait forever:
    say so before starting anything. Clusters joined by address are not checked (they scale).

    GPUs follow one policy everywhere (see :func:`available_gpus`): a pool with
    ``gpu_fallback`` runs on CPU when there is no GPU; any other GPU request that the local
    cluster cannot meet is an error here.

    Raises:
        ConfigError: naming the resource key, what it asks and what ``cluster`` offers.
    """
    c = cluster
    if _joined(c) or section is None:
        return
    gpus_here: int | None = None
    for req_key, cpus, gpus, optional in _resource_requests(section, key):
        if c.num_cpus is not None and cpus > c.num_cpus:
            raise ConfigError(f"{req_key} asks for {cpus:g} CPUs but cluster.num_cpus={c.num_cpus}; lower it "
                              "(fractions such as 0.5 are fine) or raise cluster.num_cpus")
        if gpus <= 0:
            continue
        gpus_here = local_gpu_count(c) if gpus_here is None else gpus_here
        if gpus > gpus_here and not (optional and gpus_here == 0):
            where = f"cluster.num_gpus={c.num_gpus}" if c.num_gpus is not None else "this machine"
            raise _gpu_error(req_key, gpus, gpus_here, where)


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


def match_torch_threads() -> int:
    """Give torch the thread count Ray gives this task or actor (``OMP_NUM_THREADS``); returns
    torch's thread count (0 when torch is not imported).

    A fresh import reads that variable, but a worker that imported torch when it started
    (``cluster.preload_modules``) fixed its thread count before Ray assigned it any CPUs (all of
    the machine's cores). Every raugment actor (``ActorGroup``'s hosts) and Ray Train worker
    (``train.RayContext``) calls this first; without torch imported, or outside Ray (no
    variable), it changes nothing.
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) >= 1 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


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


# While a new group waits for Ray to place its actors, look this often for idle groups to give back
# (their CPUs may be exactly what it waits for), as worker_group does for training groups.
PLACEMENT_POLL_S = 2.0


def _spec_key(cls: type, args: tuple, kwargs: dict) -> str:
    """Equal class + constructor arguments -> equal key (compared on the driver, before re-hosting)."""
    import hashlib

    import cloudpickle

    return hashlib.sha256(cloudpickle.dumps((cls, args, kwargs))).hexdigest()[:16]


def _actor_id() -> str:
    """The id of the Ray actor this runs in (:class:`_Hosted` methods run only inside one)."""
    import ray

    actor_id = ray.get_runtime_context().get_actor_id()
    if actor_id is None:
        raise RuntimeError("_Hosted methods run inside a Ray actor; this process is not one")
    return actor_id


class _Hosted:
    """A Ray actor that hosts one plain object and calls its methods (see :class:`ActorGroup`).

    The object is built from a spec (class, args, kwargs): the first comes with the constructor,
    later ones are fetched from the object store; every call carries the key of the spec it wants,
    and the actor builds a new object first when its own differs. So a group re-hosts a new object
    without a new process, and an actor that Ray restarted (which re-runs ``__init__`` with the first
    spec) catches up on its next call.
    """

    def __init__(self, key: str, box: list, gpus: float = 0.0):
        import time

        cpu0 = time.process_time()
        match_torch_threads()
        self.key: str | None = None
        self.obj: Any = None
        self.builds = 0       # objects built by this process (= model loads of their constructors)
        self.build_s = 0.0    # seconds spent building them (imports + model loads)
        self.gpus = gpus      # GPUs Ray gave this actor: its GPU-seconds are call wall time x this
        self._unbilled = (0.0, 0.0)  # (CPU s, GPU s) of builds outside a call, billed with the next call
        t0 = time.perf_counter()
        self._host(key, box)
        self._unbilled = (time.process_time() - cpu0, (time.perf_counter() - t0) * gpus)

    def _host(self, key: str, box: list) -> None:
        if key == self.key:
            return
        import time

        import ray

        t0 = time.perf_counter()
        spec = box[0]
        cls, args, kwargs = ray.get(spec) if isinstance(spec, ray.ObjectRef) else spec
        self.obj = None  # free the old object (and its model) before building the next
        self.obj = cls(*args, **kwargs)
        self.key = key
        self.builds += 1
        self.build_s += time.perf_counter() - t0

    def whoami(self) -> tuple[str, int]:
        return _actor_id(), os.getpid()

    def info(self, key: str, box: list) -> dict[str, Any]:
        """The process's builds; the hosted object's own ``info()`` too when it has one."""
        import time

        cpu0, t0 = time.process_time(), time.perf_counter()
        self._host(key, box)
        cpu, gpu = self._unbilled
        self._unbilled = (cpu + time.process_time() - cpu0, gpu + (time.perf_counter() - t0) * self.gpus)
        out = {"actor_id": _actor_id(), "pid": os.getpid(),
               "builds": self.builds, "build_s": self.build_s}
        if hasattr(self.obj, "info"):
            out.update(self.obj.info())
        return out

    def call(self, key: str, box: list, method: str, item: Any) -> tuple[str, Any, tuple[float, float]]:
        """(actor id, the result, (CPU s, GPU s) this process spent on it: its own process CPU time
        across all its threads, and wall time x the GPUs it holds; builds since the last call included)."""
        import time

        cpu0, t0 = time.process_time(), time.perf_counter()
        self._host(key, box)
        result = getattr(self.obj, method)(item)
        cpu, gpu = self._unbilled
        self._unbilled = (0.0, 0.0)
        usage = (cpu + time.process_time() - cpu0, gpu + (time.perf_counter() - t0) * self.gpus)
        return _actor_id(), result, usage


class ActorGroup:
    """``size`` Ray actors (default ``pool.concurrency``) hosting ``cls(*args, **kwargs)``, reused by every map.

    Ray Data starts a fresh actor pool for every Dataset it executes, so a stage that maps again and
    again (retrieval's k rounds) or a study that runs a stage many times would pay process start-up
    (torch/diffusers/open_clip imports) and model loading every time; these actors live until
    :meth:`close` (or, leased from :data:`POOLS` inside :func:`keep_pools`, until the study ends).
    Construction only asks Ray for the actors and returns: they start and build the object in the
    background (overlapping whatever the caller does next); the first :meth:`map` waits for them.
    :meth:`host` swaps in a new object (same processes). ``ray.util.ActorPool`` hands each item to
    the next idle actor. Actors are restarted (and their call retried) up to twice when their
    process dies, so methods must be safe to repeat.

    Attributes:
        name: label for logs and stats.
        cls: the class hosted now.
        resources: (actors, CPUs, GPUs per actor): groups of equal class and resources are interchangeable.
        actors: the actor handles.
        served: actor id -> number of calls it answered.
        leases: how many times :data:`POOLS` has handed this group out (1 = started for its first lease).
    """

    def __init__(self, cls: type, pool: ActorPoolConfig, *args: Any, num_gpus: float | None = None,
                 name: str | None = None, size: int | None = None, **kwargs: Any):
        import ray

        self.name = name or cls.__name__
        self.batch_size = pool.batch_size
        gpus = pool.num_gpus if num_gpus is None else num_gpus
        self.resources = (size or pool.concurrency, pool.num_cpus, gpus)
        self.served: dict[str, int] = {}
        self.cpu_s = 0.0  # CPU / GPU seconds the actors measured for the calls of every map so far
        self.gpu_s = 0.0
        self.leases = 1
        self.broken = False
        self._pids: dict[str, int] = {}
        self._seen_builds: dict[tuple[str, int], int] = {}
        self._set_spec(cls, args, kwargs)
        remote = ray.remote(_Hosted).options(num_cpus=pool.num_cpus, num_gpus=gpus, max_restarts=2,
                                             max_task_retries=2)
        # The first spec goes by value: Ray restarts an actor with its constructor arguments, and
        # those must not depend on an object-store entry staying alive. Handles are typed Any: Ray
        # types ``handle.method.remote`` only for methods decorated with ``@ray.method``, which would
        # import Ray with this module.
        self.actors: list[Any] = [remote.remote(self._key, [(cls, args, kwargs)], float(gpus))
                                  for _ in range(self.resources[0])]
        self._ready = [a.whoami.remote() for a in self.actors]
        self._pool: Any = None

    def _set_spec(self, cls: type, args: tuple, kwargs: dict) -> None:
        import ray

        self.cls = cls
        self._key = _spec_key(cls, args, kwargs)
        # in a list, so Ray passes the ref itself and an actor fetches the spec only when it re-hosts
        self._box = [ray.put((cls, args, kwargs))]

    def host(self, cls: type, *args: Any, **kwargs: Any) -> bool:
        """Host ``cls(*args, **kwargs)`` from now on; False when it is what the actors host already.

        Each actor builds the new object on its next call (in the background from here: an
        ``info`` call is queued at once), so equal arguments keep the loaded model.
        """
        key = _spec_key(cls, args, kwargs)
        if key == self._key:
            return False
        self._set_spec(cls, args, kwargs)
        for actor in self.actors:
            actor.info.remote(self._key, self._box)
        return True

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """True once every actor runs (its pid is known); False if not within ``timeout_s``.

        Without a timeout, waits; while Ray cannot place the actors, idle pools of :data:`POOLS`
        are given back every ``PLACEMENT_POLL_S`` (they may hold the CPUs these actors need).
        """
        import ray

        while self._ready:
            ready, _ = ray.wait(self._ready, num_returns=len(self._ready),
                                timeout=PLACEMENT_POLL_S if timeout_s is None else timeout_s)
            if len(ready) == len(self._ready):
                self._pids = dict(ray.get(self._ready))
                self._ready = []
                log.info("started %d %s actor(s) (pids %s)", len(self.actors), self.name,
                         sorted(self._pids.values()))
                break
            if timeout_s is not None:
                return False
            # Not ready yet: placed and still starting (imports take a while on a busy box), or
            # not placed because idle pools hold the resources; only the latter gives them back.
            release_idle_pools(self.resources[1], self.resources[2])
        return True

    @property
    def started(self) -> dict[str, int]:
        """Actor id -> process id of every actor of this group (waits for them to start)."""
        self.wait_ready()
        return dict(self._pids)

    def map(self, method: str, items: Sequence[Any], ordered: bool = True) -> Iterator[Any]:
        """``obj.method(item)`` for each item across the actors; results in order, or as they finish."""
        from ray.util import ActorPool

        key, box = self._key, self._box

        def submit(actor: Any, item: Any) -> Any:
            return actor.call.remote(key, box, method, item)

        try:
            self.wait_ready()
            if self._pool is None:
                self._pool = ActorPool(self.actors)
            results = (self._pool.map(submit, list(items)) if ordered
                       else self._pool.map_unordered(submit, list(items)))
            for actor_id, result, (cpu_s, gpu_s) in results:
                self.served[actor_id] = self.served.get(actor_id, 0) + 1
                self.cpu_s += cpu_s
                self.gpu_s += gpu_s
                charge("actors", cpu_s, gpu_s)  # to the stage run this map serves
                yield result
        except BaseException:
            # a failed (or abandoned) map: never hand the group out again with calls in flight
            self.broken = True
            raise

    def info(self) -> list[dict[str, Any]]:
        """Per actor: pid, objects built (``builds``; ``new_builds`` since the last ``info()``: a stage
        calls it once at its end, so these are its model loads), build seconds, and the hosted
        object's own ``info()`` if it has one."""
        import ray

        self.wait_ready()
        out = ray.get([a.info.remote(self._key, self._box) for a in self.actors])
        for i in out:
            self._pids[i["actor_id"]] = i["pid"]  # a restarted actor has a new pid
            seen = self._seen_builds.get((i["actor_id"], i["pid"]), 0)
            i["new_builds"] = i["builds"] - seen
            self._seen_builds[(i["actor_id"], i["pid"])] = i["builds"]
        return out

    def healthy(self, timeout_s: float = 30.0) -> bool:
        """Every actor answers (a dead one past its restarts does not); refreshes the pids."""
        import ray

        if self.broken or not self.actors:
            return False
        try:
            ready, _ = ray.wait([a.whoami.remote() for a in self.actors], num_returns=len(self.actors),
                                timeout=timeout_s)
            if len(ready) < len(self.actors):
                return False
            self._pids.update(dict(ray.get(ready)))
            return True
        except Exception:
            return False

    def batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        """``items`` cut into batches of ``pool.batch_size``."""
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def stats(self) -> dict[str, Any]:
        """Actors started (actor id -> pid), calls served per actor id, leases.

        A stage's ``stats.json`` records these.
        """
        return {"started": len(self.started), "pids": dict(self.started), "served": dict(self.served),
                "reused": self.leases > 1}

    def close(self) -> None:
        """Stop the actors."""
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []
        self._ready = []

    def __enter__(self) -> ActorGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class IdleScope:
    """Things kept idle between uses inside a scope (actor pools here, worker groups in
    :mod:`raugment.runtime.worker_group`): given back after a use, one is kept while a :meth:`keep`
    scope is open (stopped at once outside one, or when broken), and all are stopped when the
    outermost scope ends or :meth:`release_idle` is called. Subclasses say how to stop one."""

    what = "groups"  # for the log

    def __init__(self) -> None:
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._scopes = 0

    def _stop(self, item: Any) -> None:
        raise NotImplementedError

    def _give_back(self, item: Any, reusable: bool) -> None:
        """After a use: keep ``item`` idle inside a scope when it is reusable, else stop it."""
        with self._lock:
            keep = self._scopes > 0 and reusable
            if keep:
                self._idle.append(item)
        if not keep:
            self._stop(item)

    @contextlib.contextmanager
    def keep(self) -> Iterator[Any]:
        """Keep things alive between uses until the outermost scope ends, then stop them."""
        with self._lock:
            self._scopes += 1
        try:
            yield self
        finally:
            with self._lock:
                self._scopes -= 1
                last = self._scopes == 0
            if last:
                self.release_idle()

    def release_idle(self) -> int:
        """Stop everything idle (its CPUs/GPUs go back to Ray); how many there were."""
        with self._lock:
            idle, self._idle = self._idle, []
        for item in idle:
            self._stop(item)
        if idle:
            log.info("%s: stopped %d idle one(s)", self.what, len(idle))
        return len(idle)


class ActorPools(IdleScope):
    r"""Idle :class:`ActorGroup`\ s by (class, resources); reused only inside a :meth:`keep` scope.

    A stage leases its group (:meth:`lease`); inside a scope (a study) the group goes back to the
    idle list afterwards, and the next lease of the same class and resources gets the same
    processes, re-hosting a new object when the constructor arguments differ (equal arguments keep
    the loaded model). Outside a scope, or when the group failed, it is stopped after its lease.
    """

    what = "actor pools"

    def __init__(self) -> None:
        super().__init__()
        self.started = 0  # groups started by this process
        self.reused = 0   # leases served by an idle group

    def _take(self, cls: type, resources: tuple) -> ActorGroup | None:
        with self._lock:
            group = next((g for g in self._idle if g.cls is cls and g.resources == resources), None)
            if group is not None:
                self._idle.remove(group)
        return group

    @contextlib.contextmanager
    def lease(self, cls: type, pool: ActorPoolConfig, *args: Any, num_gpus: float | None = None,
              name: str | None = None, size: int | None = None, key: str | None = None,
              **kwargs: Any) -> Iterator[ActorGroup]:
        """An idle group of this class and resources (re-hosting ``cls(*args, **kwargs)``), or a new one.

        Returns at once either way (a new group starts in the background; a reused one re-hosts
        in the background when the arguments differ). Without ``num_gpus``, the GPUs per actor
        follow the one GPU policy (:func:`available_gpus`; ``key`` = the pool's config key, for
        its error message).
        """
        if num_gpus is None:
            num_gpus = available_gpus(pool, key or f"{name or cls.__name__}.pool")
        resources = (size or pool.concurrency, pool.num_cpus, num_gpus)
        group = self._take(cls, resources)
        while group is not None and not group.healthy():
            log.warning("%s pool: an idle actor died; starting a new group", group.name)
            group.close()
            group = self._take(cls, resources)
        if group is not None:
            group.host(cls, *args, **kwargs)
            group.name = name or cls.__name__
            group.leases += 1
            group.served = {}
            with self._lock:
                self.reused += 1
            log.info("%s pool: reusing %d warm actor(s)", group.name, len(group.actors))
        else:
            group = ActorGroup(cls, pool, *args, num_gpus=num_gpus, name=name, size=size, **kwargs)
            with self._lock:
                self.started += 1
        try:
            yield group
        finally:
            self._give_back(group, not group.broken and bool(group.actors))

    def _stop(self, group: ActorGroup) -> None:
        group.close()

    def idle_pids(self) -> list[list[int]]:
        """Process ids of each idle group (tests, logs)."""
        with self._lock:
            return [sorted(g._pids.values()) for g in self._idle]


POOLS = ActorPools()


def keep_pools() -> contextlib.AbstractContextManager[ActorPools]:
    """Scope in which consecutive stage runs reuse their actor pools (a study)."""
    return POOLS.keep()


def release_idle_pools(need_cpus: float | None = None, need_gpus: float = 0.0) -> int:
    """Give the resources of idle actor pools back (before Ray work that is not a leased pool).

    With ``need_cpus`` (a waiting actor's request), only when the cluster has no room for it now:
    an actor that is placed but still starting must not cost the study its warm pools.
    """
    if need_cpus is not None:
        import ray

        free = ray.available_resources()
        if free.get("CPU", 0.0) >= need_cpus - 1e-9 and (need_gpus <= 0 or free.get("GPU", 0.0) >= need_gpus - 1e-9):
            return 0
    return POOLS.release_idle()
