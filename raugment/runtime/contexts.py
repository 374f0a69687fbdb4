"""Where a training loop runs: one rank of a DDP group or a plain process (:class:`LoopContext`).

The classifier loop (``stages/train``) and the fine-tuning loop (``stages/finetune``) are each
written once against this small interface and run unchanged on every runner:

* :class:`LocalContext` — this process, no Ray (benchmarks, quick tests);
* :class:`GroupContext` — one rank of a long-lived :class:`~raugment.runtime.worker_group.WorkerGroup`
  (checkpoints in the stage directory, shared by the ranks);
* :class:`RayContext` — a Ray Train ``TorchTrainer`` worker (Ray Train's checkpoints).

What a checkpoint holds is the loop's own :class:`CheckpointState` class.

Two helpers make a resumed or distributed run give the uninterrupted, single-model result:

* :func:`seed_epoch` re-seeds every global RNG from ``(seed, rank, epoch)`` at the start of each
  epoch (and before test scoring), so a run resumed at epoch ``e`` draws exactly the augmentation,
  dropout and loader-worker seeds the uninterrupted run drew: no RNG state has to be checkpointed;
* :func:`sync_buffers` averages a model's buffers (BatchNorm running statistics) over the ranks,
  so every rank evaluates, and rank 0 saves, the same model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from raugment.core.storage import atomic_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch


class CheckpointState(Protocol):
    """What a loop checkpoints: written to and read from a directory; ``MARKER`` marks it complete."""

    MARKER: ClassVar[str]

    def write(self, directory: str | Path) -> None: ...

    @classmethod
    def read(cls, directory: str | Path) -> CheckpointState: ...


StateT = TypeVar("StateT", bound=CheckpointState)


class LoopContext(Protocol[StateT]):
    """Where :func:`fit` runs: one rank of a DDP group (Ray) or a plain process.

    ``LoopContext[TrainState]``: a context built with ``state_type=TrainState`` (it restores those).
    """

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def load_checkpoint(self) -> StateT | None: ...

    def report(self, metrics: dict[str, Any], state: StateT | None) -> None: ...


class LocalContext:
    """Run :func:`fit` in this process (no Ray): checkpoints go to ``checkpoint_dir/latest``.

    ``state_type`` is what a checkpoint holds: a :class:`CheckpointState` class (the classifier's
    ``TrainState``, the fine-tuning loop's ``FinetuneState``), so every loop runs on the same contexts.
    """

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_dir: str | Path, state_type: type[CheckpointState],
                 device: str | torch.device = "cpu"):
        import torch

        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.reports: list[dict[str, Any]] = []
        self.state_type = state_type

    def prepare_model(self, model):
        return model

    def all_reduce(self, tensor):
        return tensor

    def load_checkpoint(self) -> Any:
        latest = self.checkpoint_dir / "latest"
        return self.state_type.read(latest) if (latest / self.state_type.MARKER).exists() else None

    def report(self, metrics: dict[str, Any], state: CheckpointState | None) -> None:
        self.reports.append(metrics)
        if state is not None:
            with atomic_dir(self.checkpoint_dir / "latest") as tmp:
                state.write(tmp)


def seed_epoch(seed: int, rank: int, epoch: int) -> int:
    """Seed torch (CPU and CUDA), NumPy's global RNG and :mod:`random` for one epoch of one rank.

    The seed is a hash of ``(seed, rank, epoch)`` (``numpy.random.SeedSequence``), so ranks draw
    different augmentation, epochs different streams, and the same triple always the same one.
    DataLoader workers take their seeds from torch's global generator when an epoch's iterator
    starts, so they follow too. Returns the 63-bit seed given to torch.
    """
    import random

    import numpy as np
    import torch

    mask = (1 << 64) - 1  # SeedSequence takes non-negative entropy
    state = np.random.SeedSequence([seed & mask, rank & mask, epoch & mask, 0x5EED]).generate_state(2, np.uint64)
    value = int(state[0]) >> 1
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(int(state[1]) & 0xFFFFFFFF)
    return value


def sync_buffers(model: torch.nn.Module, ctx: Any) -> None:
    """Average ``model``'s buffers over the ranks of ``ctx`` (a :class:`LoopContext`), in place.

    In DDP every rank updates its BatchNorm running statistics from its own batches, so after an
    epoch the ranks hold different models; evaluating each rank's share with its own statistics
    scores no model that is saved. Floating buffers become their mean over the ranks; integer
    ones (``num_batches_tracked``, equal on all ranks that ran the same steps) the floor of their
    mean. One all-reduce per buffer dtype; a no-op for one worker.
    """
    if ctx.world_size == 1:
        return
    import torch

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in model.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    with torch.no_grad():
        for dtype, bufs in by_dtype.items():
            if dtype == torch.bool:
                continue
            flat = ctx.all_reduce(torch.cat([b.detach().reshape(-1) for b in bufs]))
            flat = flat / ctx.world_size if dtype.is_floating_point else flat // ctx.world_size
            offset = 0
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


def _all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum over the default process group (in place); a no-op for one worker."""
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


class GroupContext(LocalContext):
    """:class:`LoopContext` of one rank of a :class:`~raugment.runtime.worker_group.WorkerGroup`.

    The group's process group all-reduces; rank 0 writes the checkpoint to
    ``checkpoint_dir/latest`` (the stage's own directory, shared by the ranks) and every rank
    waits for it, so a rank that dies in the next epoch never loses a finished one.
    """

    def __init__(self, member: Any, checkpoint_dir: str | Path, state_type: type[CheckpointState]):
        super().__init__(checkpoint_dir, state_type, member.device)
        self.rank, self.world_size = member.rank, member.world_size

    def prepare_model(self, model):
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce(self, tensor):
        return _all_reduce(tensor, self.world_size)

    def report(self, metrics: dict[str, Any], state: CheckpointState | None) -> None:
        super().report(metrics, state)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


class RayContext:
    """:class:`LoopContext` of a Ray Train worker (DDP over gloo on CPU, NCCL on GPU).

    ``state_type``: what a checkpoint holds, as for :class:`LocalContext`.
    """

    def __init__(self, state_type: type[CheckpointState]):
        import ray.train
        import ray.train.torch

        from raugment.runtime.cluster import match_torch_threads

        match_torch_threads()  # a preloaded torch: the worker's CPUs, not the machine's
        tctx = ray.train.get_context()
        self.rank = tctx.get_world_rank()
        self.world_size = tctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.state_type = state_type

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def all_reduce(self, tensor):
        return _all_reduce(tensor, self.world_size)

    def load_checkpoint(self) -> Any:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return self.state_type.read(d)

    def report(self, metrics: dict[str, Any], state: CheckpointState | None) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if state is not None:
                state.write(d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
