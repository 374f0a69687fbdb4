"""Long-lived DDP worker groups: Ray actors that stay up across many training runs.

A Ray Train ``TorchTrainer`` starts its controller, its worker processes and its process group
for every run; on 2 CPUs that costs tens of seconds per classifier, more than training a small
one. A :class:`WorkerGroup` pays it once: ``num_workers`` actors (resources from a
:class:`~raugment.core.config.WorkersConfig`, whose defaults leave CPUs for data ingest), one
``torch.distributed`` process group among them (gloo on CPU, NCCL on GPU), then any number of
``group.run(fn, *args)`` calls, each running ``fn(member, *args)`` on every rank at once.

Groups are leased from :data:`GROUPS`. Inside :func:`keep_groups` (a study, ``run_repeats``) a
group goes back to the idle list after a run and the next run with the same resources reuses it;
outside, it is shut down after its run, so nothing holds CPUs that a later Ray Data stage needs.
:func:`run_with_retries` rebuilds a group whose actor died or whose run raised, up to
``max_failures`` times (the function resumes from its own checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raugment.core.config import WorkersConfig
from raugment.core.storage import charge
from raugment.runtime.cluster import IdleScope, release_idle_pools

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# How long a collective may wait for a peer. A dead peer is normally noticed at once (its socket
# closes) and the driver kills the rest of the group on the first failure anyway.
COLLECTIVE_TIMEOUT_S = 1800
# While a new group waits for Ray to place its actors, look this often for a group that another
# run has just given back (the CPUs/GPUs it needs may be held by exactly that idle group).
PLACEMENT_POLL_S = 2.0


@dataclass
class Member:
    """What a function run on the group knows about its rank."""

    rank: int
    world_size: int
    device: torch.device


class _MemberActor:
    """One rank: a Ray actor process that keeps its torch state (and process group) between runs."""

    def __init__(self, rank: int, world_size: int, use_gpu: bool, threads: int, gpus: float = 0.0):
        import torch

        # the same thread count Ray gives a Train worker of this many CPUs (>= 1)
        torch.set_num_threads(threads)
        if use_gpu:
            torch.cuda.set_device(0)  # Ray restricts CUDA_VISIBLE_DEVICES to this actor's GPU
        self.member = Member(rank, world_size, torch.device("cuda", 0) if use_gpu else torch.device("cpu"))
        self.gpus = gpus if use_gpu else 0.0

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port for the process group's rendezvous (rank 0)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, host: str, port: int, backend: str) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.member.rank,
                                world_size=self.member.world_size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))

    def call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, tuple[float, float]]:
        """``fn``'s result and (CPU s, GPU s) this rank spent on it: its process CPU time (all
        threads: DataLoader threads, intra-op pools) and wall time x the GPUs it holds."""
        import time

        cpu0, t0 = time.process_time(), time.perf_counter()
        result = fn(self.member, *args)
        return result, (time.process_time() - cpu0, (time.perf_counter() - t0) * self.gpus)


def shape(workers: WorkersConfig) -> tuple:
    """The resource shape of a group: groups of the same shape are interchangeable."""
    return (workers.num_workers, workers.use_gpu, workers.cpus_per_worker,
            workers.gpus_per_worker if workers.use_gpu else 0.0)


class WorkerGroup:
    """``num_workers`` member actors joined in one process group (none needed for one worker).

    Construction only asks Ray for the actors; :meth:`wait_ready` waits until they are placed
    and forms the process group.
    """

    def __init__(self, workers: WorkersConfig):
        import ray

        self.shape = shape(workers)
        self.broken = False
        self.workers = workers
        options: dict[str, Any] = {"num_cpus": workers.cpus_per_worker, "max_restarts": 0}
        if workers.use_gpu:
            options["num_gpus"] = workers.gpus_per_worker
        threads = max(1, int(workers.cpus_per_worker))
        actor = ray.remote(_MemberActor).options(**options)
        # Handles are typed Any: Ray types ``handle.method.remote`` only for methods decorated with
        # ``@ray.method``, which would import Ray with this module.
        self.actors: list[Any] = [actor.remote(rank, workers.num_workers, workers.use_gpu, threads,
                                               float(workers.gpus_per_worker))
                                  for rank in range(workers.num_workers)]
        self._pid_refs = [a.pid.remote() for a in self.actors]
        self._pids: list[int] = []

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """True once every member runs and the process group is formed; False on timeout."""
        import ray

        if self._pids:
            return True
        ready, _ = ray.wait(self._pid_refs, num_returns=len(self._pid_refs), timeout=timeout_s)
        if len(ready) < len(self._pid_refs):
            return False
        pids = ray.get(self._pid_refs)
        w = self.workers
        if w.num_workers > 1:
            host, port = ray.get(self.actors[0].address.remote())
            backend = "nccl" if w.use_gpu else "gloo"
            ray.get([a.join.remote(host, port, backend) for a in self.actors])
        self._pids = pids
        log.info("worker group up: %d workers x %s CPU%s (pids %s)", w.num_workers, w.cpus_per_worker,
                 f" + {w.gpus_per_worker} GPU" if w.use_gpu else "", pids)
        return True

    def pids(self) -> list[int]:
        """Process ids of the members, rank order (the same between runs while the group lives)."""
        return list(self._pids)

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(member, *args)`` on every rank; the results in rank order.

        Each rank's CPU and GPU seconds for the call are charged to the stage run in progress in
        this thread (:func:`raugment.core.storage.charge`, ``usage.workers`` in its stats.json).

        The first failure (an actor died, or ``fn`` raised on some rank) is raised at once and
        marks the group broken: the other ranks may be stuck in a collective with the dead one.
        """
        import ray

        refs = [a.call.remote(fn, *args) for a in self.actors]
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
        except BaseException:
            self.broken = True
            raise
        out = ray.get(refs)
        for _, (cpu_s, gpu_s) in out:  # every rank's own measurement, to the stage run it serves
            charge("workers", cpu_s, gpu_s)
        return [result for result, _ in out]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        self.actors = []


class GroupPool(IdleScope):
    """Idle groups by resource shape; a group is reused only inside a :meth:`keep` scope."""

    what = "worker groups"

    def __init__(self) -> None:
        super().__init__()
        self.started = 0  # groups started by this process (tests, logs)

    def _take(self, want: tuple) -> WorkerGroup | None:
        with self._lock:
            group = next((g for g in self._idle if g.shape == want), None)
            if group is not None:
                self._idle.remove(group)
            return group

    def _release_other_shapes(self, want: tuple) -> None:
        with self._lock:
            other = [g for g in self._idle if g.shape != want]
            self._idle = [g for g in self._idle if g.shape == want]
        for g in other:
            g.shutdown()

    def _start(self, workers: WorkersConfig) -> WorkerGroup:
        """A new group, or an idle one of the same shape given back while this one waited.

        When Ray cannot place the new group (more runs in flight than the cluster fits), its
        resources may be held by idle groups: take one of the same shape as soon as there is one,
        and shut down idle groups of other shapes, so a waiting run never waits for ever.
        """
        want = shape(workers)
        group = WorkerGroup(workers)
        try:
            while not group.wait_ready(PLACEMENT_POLL_S):
                idle = self._take(want)
                if idle is not None:
                    group.shutdown()
                    return idle
                self._release_other_shapes(want)
                # idle generate/filter/index actors of a study may hold the CPUs it waits for
                release_idle_pools(workers.cpus_per_worker, workers.gpus_per_worker if workers.use_gpu else 0.0)
        except BaseException:
            group.shutdown()
            raise
        with self._lock:
            self.started += 1
        return group

    @contextlib.contextmanager
    def lease(self, workers: WorkersConfig) -> Iterator[WorkerGroup]:
        """An idle group of this shape, or a new one; back to the idle list afterwards (in scope)."""
        group = self._take(shape(workers)) or self._start(workers)
        try:
            yield group
        finally:
            self._give_back(group, not group.broken)

    def _stop(self, group: WorkerGroup) -> None:
        group.shutdown()

    def idle_pids(self) -> list[list[int]]:
        with self._lock:
            return [g.pids() for g in self._idle]


GROUPS = GroupPool()


def keep_groups() -> contextlib.AbstractContextManager[GroupPool]:
    """Scope in which training runs reuse worker groups (a study, a list of repeats)."""
    return GROUPS.keep()


def release_idle() -> int:
    """Give the CPUs of idle groups back (before a stage that needs them for Ray Data)."""
    return GROUPS.release_idle()


def run_with_retries(workers: WorkersConfig, fn: Callable[..., Any], *args: Any,
                     what: str = "run") -> list[Any]:
    """``fn(member, *args)`` on a leased group; a failed run is retried on a fresh group.

    ``fn`` must resume from its own checkpoints (the retry calls it again with the same
    arguments). At most ``workers.max_failures`` retries, then the last error is raised.
    """
    failures = 0
    while True:
        with GROUPS.lease(workers) as group:
            try:
                return group.run(fn, *args)
            except Exception as exc:
                failures += 1
                if failures > workers.max_failures:
                    raise
                log.warning("%s failed on worker group %s (%s: %s); retry %d of %d on a new group",
                            what, group.pids(), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                            failures, workers.max_failures)
