"""The worker loop of the fine-tuning stage (DDP over all classes at once), written once.

:class:`WorkerLoop` runs on every rank against a :class:`raugment.runtime.contexts.LoopContext` (rank, world
size, device, DDP wrapping, all-reduce, checkpoint load/report), so both runners of
``finetune.runner`` run the same code: :func:`finetune_member` on a leased
:class:`~raugment.runtime.worker_group.WorkerGroup` (:class:`raugment.runtime.contexts.GroupContext`: checkpoints in
``<stage dir>/checkpoint/latest``) and :func:`train_loop_per_worker` on a Ray Train
``TorchTrainer`` (:class:`raugment.runtime.contexts.RayContext`). Each rank:

1. loads the diffusion components through :func:`raugment.models.diffusion.load_components`;
2. **caches VAE latents**: each rank encodes its share of the images not yet in ``latents/`` and
   stores the latent *distribution* (mean, std), so every step still draws a fresh latent sample
   as Stable Diffusion training does, without running the VAE encoder again;
3. restores the full training state (:class:`FinetuneState`) from the context's last checkpoint
   when a worker failure (or a killed driver) restarted the run, and continues after the last
   finished epoch, exactly: every epoch's randomness (latent samples, noise, timesteps, prompts,
   and the global RNGs through :func:`raugment.runtime.contexts.seed_epoch`) comes from
   ``(seed, epoch, rank)``, so a resumed run ends bit for bit as an uninterrupted one on CPU;
4. trains epochs: shuffled, padded so all ranks take the same number of batches; validation loss
   on the held-out items with noise and timesteps fixed across epochs (comparable numbers);
5. rank 0 writes the generator-facing snapshots (:mod:`raugment.lib.finetuned.artifact`) for epochs
   the checkpoint policy keeps (atomically, so a repeated epoch replaces its snapshot), then
   every rank reports; rank 0's report carries the resumable training state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from raugment.core import schema
from raugment.lib.finetuned.artifact import CONDITIONINGS, ITEMS, write_snapshot, write_tags
from raugment.lib.finetuned.families import CondRow, build_trainable, load_trainable_state, trainable_state
from raugment.stages.finetune.methods import get_method
from raugment.stages.finetune.policy import EarlyStopper, EpochRecord, checkpoint_tags, epoch_order, scaled_lr

log = logging.getLogger(__name__)

STATE = "state.safetensors"
OPTIMIZER = "optimizer.pt"
PROGRESS = "progress.json"
LATENTS = "latents"
EVENTS = "events.jsonl"
VAL_SEED = 7919  # fixed noise for the validation loss, the same every epoch


# --------------------------------------------------------------------------------------------
# Images and latents
# --------------------------------------------------------------------------------------------


def pixels_batch(images: list[bytes], resolution: int) -> Any:
    """Encoded images -> ``[n, 3, r, r]`` in [-1, 1]: shorter side to ``r``, centre crop."""
    import torch
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    from raugment.core.imageio import decode_image

    out = []
    for data in images:
        img = center_crop(resize(decode_image(bytes(data)), resolution, antialias=True), [resolution, resolution])
        out.append(pil_to_tensor(img))
    return torch.stack(out).float().div(127.5).sub(1.0)


def encode_latents_batch(vae: Any, pixels: Any) -> tuple[Any, Any]:
    """VAE latent distribution of a pixel batch: (mean, std), unscaled, float32 on CPU."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def sample_latents(mean: Any, std: Any, scaling: float, generator: Any) -> Any:
    """One latent sample per item, scaled like Stable Diffusion's training."""
    import torch

    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling


def read_images(files: list[str], ids: list[str]) -> dict[str, bytes]:
    """Image bytes of ``ids`` from the dataset artifact's Parquet shards."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(set(ids)), type=pa.string())
    out: dict[str, bytes] = {}
    for f in files:
        t = pq.read_table(f, columns=[schema.ID, schema.IMAGE])
        t = t.filter(pc.is_in(t.column(schema.ID), value_set=wanted))
        out.update(zip(t.column(schema.ID).to_pylist(), t.column(schema.IMAGE).to_pylist()))
    return out


def _read_latent_cache(cache: Path) -> dict[str, tuple[Any, Any]]:
    from safetensors import safe_open

    out: dict[str, tuple[Any, Any]] = {}
    for part in sorted(cache.glob("part-*.safetensors")):
        with safe_open(str(part), framework="pt") as f:
            ids = json.loads(f.metadata()["ids"])
            mean, std = f.get_tensor("mean"), f.get_tensor("std")
        out.update({i: (mean[n], std[n]) for n, i in enumerate(ids)})
    return out


def ensure_latent_cache(out: Path, ids: list[str], files: list[str], vae: Any, resolution: int,
                        batch_size: int, rank: int, world: int) -> tuple[Any, Any]:
    """Latent distributions of ``ids`` (in order), encoding only what ``latents/`` lacks.

    Each rank encodes every ``world``-th missing image and writes its own part file (a temporary
    name renamed into place), then all ranks meet at a barrier and read every part.
    """
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    def barrier() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    cache = out / LATENTS
    cache.mkdir(parents=True, exist_ok=True)
    have = _read_latent_cache(cache)
    barrier()  # every rank has read the same cache before any rank adds to it: same split of the work
    mine = [i for i in ids if i not in have][rank::world]
    if mine:
        images = read_images(files, mine)
        means, stds = [], []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            m, s = encode_latents_batch(vae, pixels_batch([images[i] for i in chunk], resolution))
            means.append(m)
            stds.append(s)
        tmp = cache / f".tmp-{rank}-{time.time_ns()}.safetensors"
        save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, str(tmp),
                  metadata={"ids": json.dumps(mine)})
        tmp.rename(cache / f"part-{time.time_ns()}-{rank:04d}.safetensors")
    barrier()
    have = _read_latent_cache(cache)
    return torch.stack([have[i][0] for i in ids]), torch.stack([have[i][1] for i in ids])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _all_mean(total: float, count: int, ctx: Any) -> float:
    """Mean over all ranks of per-rank sums (``ctx.all_reduce`` sums over the group)."""
    import torch

    t = ctx.all_reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=ctx.device))
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _event(out: Path, rank: int, **fields: Any) -> None:
    if rank == 0:
        with open(out / EVENTS, "a") as f:
            f.write(json.dumps({"time": time.time(), **fields}) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (runner ``ray_train``). ``config`` is built by
    :func:`raugment.stages.finetune.stage.loop_config`.

    Keys: ``finetune`` (the section as a dict), ``out`` (stage directory), ``images`` (dataset
    shard files); optionally ``fail_after_epoch`` + ``fail_marker`` (fault injection: the worker
    raises once, right after reporting that epoch).
    """
    from raugment.runtime.contexts import RayContext

    WorkerLoop(config, RayContext(FinetuneState)).run()


def finetune_member(member: Any, config: dict[str, Any], checkpoint_dir: str) -> None:
    """Worker-group entry point (runner ``worker_group``): the same loop on one rank of a leased
    group; checkpoints under ``checkpoint_dir/latest`` (the stage directory), so a retried or
    re-run stage resumes after the last finished epoch."""
    from raugment.runtime.contexts import GroupContext

    WorkerLoop(config, GroupContext(member, checkpoint_dir, FinetuneState)).run()


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (``progress.json``)."""

    epoch: int = 0
    stopped: bool = False
    history: list[EpochRecord] = field(default_factory=list)
    stopper: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"epoch": self.epoch, "stopped": self.stopped, "stopper": self.stopper,
                           "history": [h.__dict__ for h in self.history]})

    @classmethod
    def from_json(cls, text: str) -> Progress:
        data = json.loads(text)
        return cls(data["epoch"], data["stopped"], [EpochRecord(**h) for h in data["history"]], data["stopper"])


@dataclass
class FinetuneState:
    """What a fine-tuning checkpoint holds: enough to resume after the last finished epoch.

    The trainable tensors as safetensors, the optimizer state as a tensors-only torch file (read
    with ``weights_only``), the progress as JSON, written last (:attr:`MARKER`).
    """

    MARKER: ClassVar[str] = PROGRESS

    learned: dict[str, Any]
    optimizer: dict[str, Any]
    progress: Progress

    def write(self, directory: str | Path) -> None:
        import torch
        from safetensors.torch import save_file

        d = Path(directory)
        save_file(self.learned, str(d / STATE))
        torch.save(self.optimizer, d / OPTIMIZER)
        (d / PROGRESS).write_text(self.progress.to_json())

    @classmethod
    def read(cls, directory: str | Path) -> FinetuneState:
        import torch
        from safetensors.torch import load_file

        d = Path(directory)
        return cls(load_file(str(d / STATE)), torch.load(d / OPTIMIZER, map_location="cpu", weights_only=True),
                   Progress.from_json((d / PROGRESS).read_text()))


class WorkerLoop:
    """One rank's fine-tuning run (built once, then :meth:`run`) on a ``LoopContext``."""

    def __init__(self, config: dict[str, Any], ctx: Any):
        import pyarrow.parquet as pq
        import torch

        from raugment.config import from_dict
        from raugment.models.diffusion import load_components
        from raugment.stages.finetune.config import FinetuneConfig

        self.config = config
        self.ctx = ctx
        self.cfg: FinetuneConfig = from_dict(config["finetune"], FinetuneConfig)
        self.out = Path(config["out"])
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        torch.manual_seed(self.cfg.seed)
        self.method = get_method(self.cfg.method)
        self.comps = load_components(self.cfg.model, revision=self.cfg.revision, device=str(self.device))

        items = pq.read_table(self.out / f"{ITEMS}.parquet").to_pydict()
        is_val = np.array([s == "val" for s in items[schema.SPLIT]])
        self.train_pos, self.val_pos = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        self.cond_rows = torch.tensor(items[schema.COND_ROW], dtype=torch.long)
        self.scaling = float(getattr(self.comps["vae"].config, "scaling_factor", 0.18215))
        self.n_timesteps = self.comps["noise_scheduler"].config.num_train_timesteps
        self._load_images(items[schema.ID])

        # the initial table is the same on every rank (deterministic text encoding)
        rows = [CondRow(r[schema.COND_ROW], r[schema.LABEL], r[schema.CLASS_NAME], r[schema.CLUSTER],
                        r[schema.N_IMAGES], r[schema.TOKEN])
                for r in pq.read_table(self.out / f"{CONDITIONINGS}.parquet").to_pylist()]
        self.model = build_trainable(self.method, self.comps, self.method.init_table(self.comps, rows))
        self.optimizer = self._build_optimizer()
        self.progress = self._restore()
        self.model = ctx.prepare_model(self.model)  # DDP when world > 1 (the model is on its device)
        self.inner = getattr(self.model, "module", self.model)
        self.autocast = (torch.autocast("cuda", dtype=getattr(torch, self.cfg.dtype))
                         if self.device.type == "cuda" and self.cfg.dtype != "float32" else contextlib.nullcontext())

    def _load_images(self, ids: list[str]) -> None:
        if self.cfg.cache_latents:
            self.mean, self.std = ensure_latent_cache(self.out, ids, self.config["images"], self.comps["vae"],
                                                      self.cfg.resolution, self.cfg.encode_batch_size,
                                                      self.rank, self.world)
        else:
            images = read_images(self.config["images"], ids)
            self.pixels = pixels_batch([images[i] for i in ids], self.cfg.resolution)

    def _build_optimizer(self) -> Any:
        import torch

        batch = self.cfg.batch_size * self.world
        self.lr = scaled_lr(self.cfg.lr, batch, self.cfg.base_batch_size)
        self.unet_lr = scaled_lr(self.cfg.unet_lr, batch, self.cfg.base_batch_size)
        groups: list[dict[str, Any]] = [{"params": [self.model.table], "lr": self.lr, "weight_decay": 0.0}]
        if self.method.trains_unet:
            groups.append({"params": [p for p in self.model.unet.parameters() if p.requires_grad],
                           "lr": self.unet_lr, "weight_decay": self.cfg.weight_decay})
        self.params = [p for g in groups for p in g["params"]]
        return torch.optim.AdamW(groups)

    def _restore(self) -> Progress:
        """Learned tensors, optimizer and progress from the last reported checkpoint, if any."""
        progress = Progress(stopper=EarlyStopper(self.cfg.patience, self.cfg.min_delta).state())
        resumed: FinetuneState | None = self.ctx.load_checkpoint()
        if resumed is not None:
            load_trainable_state(self.model, self.method, resumed.learned)
            self.optimizer.load_state_dict(resumed.optimizer)  # moves the state to the parameters' device
            progress = resumed.progress
        _event(self.out, self.rank, event="start", resume_after_epoch=progress.epoch, world_size=self.world,
               lr=self.lr, unet_lr=self.unet_lr)
        return progress

    def loss_on(self, pos: np.ndarray, gen: Any, rng: np.random.Generator, net: Any) -> Any:
        """The denoising loss of the items at ``pos`` (fresh latent sample, noise, timesteps)."""
        import torch

        if self.cfg.cache_latents:
            lat = sample_latents(self.mean[pos], self.std[pos], self.scaling, gen)
        else:
            lat = sample_latents(*encode_latents_batch(self.comps["vae"], self.pixels[pos]), self.scaling, gen)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, self.n_timesteps, (len(pos),), generator=gen)
        ids = self.method.prompt_ids(self.comps, len(pos), rng)
        with self.autocast:
            return net(lat.to(self.device), noise.to(self.device), t.to(self.device),
                       self.cond_rows[pos].to(self.device), None if ids is None else ids.to(self.device))

    def train_epoch(self, epoch: int) -> tuple[float, float, int]:
        """One epoch; returns (mean train loss over all ranks, seconds per step, steps)."""
        import torch

        from raugment.runtime.contexts import seed_epoch

        t0 = time.perf_counter()
        # the global RNGs (dropout, anything a method draws without a generator) per (seed, rank,
        # epoch), like the generators below: a run resumed at this epoch continues exactly
        seed_epoch(self.cfg.seed, self.rank, epoch)
        order = epoch_order(len(self.train_pos), self.world, self.cfg.batch_size, epoch, self.cfg.seed)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch * 1009 + self.rank)
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
        self.model.train()
        total = 0.0
        for step in range(order.shape[0]):
            loss = self.loss_on(self.train_pos[order[step, self.rank]], gen, rng, self.model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
            total += float(loss.detach())
        step_s = (time.perf_counter() - t0) / order.shape[0]
        return _all_mean(total, order.shape[0], self.ctx), step_s, int(order.shape[0])

    def validation_loss(self) -> float:
        """Mean loss on the held-out items with the same noise and timesteps every epoch."""
        import torch

        mine = self.val_pos[self.rank::self.world]
        gen = torch.Generator().manual_seed(self.cfg.seed + VAL_SEED + self.rank)
        rng = np.random.default_rng([self.cfg.seed, VAL_SEED, self.rank])
        self.inner.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(mine), self.cfg.batch_size):
                pos = mine[start:start + self.cfg.batch_size]
                total += float(self.loss_on(pos, gen, rng, self.inner)) * len(pos)
        return _all_mean(total, len(mine), self.ctx)

    def save_snapshot(self, record: EpochRecord) -> None:
        """Rank 0: the generator-facing snapshot when the policy keeps this epoch; prune the rest."""
        if self.rank != 0:
            return
        tags = checkpoint_tags(self.progress.history, self.method.keep_epochs(self.cfg))
        if record.epoch in tags:
            table = self.inner.table.detach().cpu().contiguous()
            write_snapshot(self.out, record.epoch, {self.method.table_key: table},
                           {"method": self.method.name, "train_loss": record.train_loss,
                            "val_loss": record.val_loss, "tags": tags[record.epoch]},
                           unet=self.inner.unet if self.method.trains_unet else None)
        write_tags(self.out, tags)

    def run(self) -> None:
        stopper = EarlyStopper(self.cfg.patience, self.cfg.min_delta)
        stopper.load(self.progress.stopper)
        while not self.progress.stopped and self.progress.epoch < self.cfg.max_epochs:
            epoch = self.progress.epoch + 1
            train_loss, step_s, steps = self.train_epoch(epoch)
            val_loss = self.validation_loss()
            if np.isnan(val_loss):  # no held-out images: fall back to the training loss
                val_loss = train_loss
            record = EpochRecord(epoch, train_loss, val_loss)
            stopped = stopper.update(val_loss)
            self.progress = Progress(epoch, stopped, [*self.progress.history, record], stopper.state())
            self.save_snapshot(record)
            metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": self.lr,
                       "unet_lr": self.unet_lr, "step_s": step_s, "steps": steps, "stopped": stopped}
            _event(self.out, self.rank, event="epoch", **metrics)
            # every rank reports; rank 0's report carries the resumable state
            state = (FinetuneState(trainable_state(self.model, self.method), self.optimizer.state_dict(),
                                   self.progress) if self.rank == 0 else None)
            self.ctx.report(metrics, state)
            if self.config.get("fail_after_epoch") == epoch:
                marker = Path(self.config["fail_marker"])  # the stage sets both keys together
                if not marker.exists():
                    marker.write_text("failed once\n")
                    raise RuntimeError(f"injected failure after epoch {epoch}")

