"""Worker groups: reused within a scope, shut down outside it, never waiting for ever for room."""

import os
import sys
import threading
import time

import pytest

from raugment.core.config import WorkersConfig


def member_info(member, pause_s: float = 0.0) -> tuple[int, int, int]:
    time.sleep(pause_s)
    return member.rank, member.world_size, os.getpid()


def _cpus_free(ray) -> float:
    return ray.available_resources().get("CPU", 0.0)


@pytest.mark.timeout(240)
def test_a_run_that_finds_no_room_takes_the_group_another_run_gives_back(ray_session):
    """Only one 1.5-CPU group fits on 2 CPUs: the second run waits for the first one's group
    (kept idle inside the scope) instead of waiting for ever for a group of its own."""
    import ray
    import ray.cloudpickle

    from raugment.runtime.worker_group import GROUPS, keep_groups, run_with_retries

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    big = WorkersConfig(num_workers=1, cpus_per_worker=1.5)
    started, free = GROUPS.started, _cpus_free(ray)
    results: dict[str, list] = {}

    def one(name: str, pause: float) -> None:
        results[name] = run_with_retries(big, member_info, pause)

    with keep_groups():
        first = threading.Thread(target=one, args=("first", 4.0))
        first.start()
        time.sleep(1.0)
        second = threading.Thread(target=one, args=("second", 0.0))
        second.start()
        first.join(180)
        second.join(180)
        assert not first.is_alive() and not second.is_alive()
    assert results["first"][0][2] == results["second"][0][2]  # the same process ran both
    assert GROUPS.started == started + 1
    deadline = time.monotonic() + 30  # the scope's end gives the CPUs back
    while _cpus_free(ray) < free and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _cpus_free(ray) >= free


@pytest.mark.timeout(240)
def test_members_know_their_rank_and_share_one_process_group(ray_session):
    import ray.cloudpickle

    from raugment.runtime.worker_group import keep_groups, run_with_retries

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    two = WorkersConfig(num_workers=2, cpus_per_worker=0.5)
    with keep_groups():
        a = run_with_retries(two, member_info)
        b = run_with_retries(two, all_reduce_rank)
    assert [r[:2] for r in a] == [(0, 2), (1, 2)] and a[0][2] != a[1][2]
    assert b == [1.0, 1.0]  # 0 + 1 summed over the group's gloo process group, on both ranks


def all_reduce_rank(member) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(member.rank)])
    dist.all_reduce(t)
    return float(t.item())
