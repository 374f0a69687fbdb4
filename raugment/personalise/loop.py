"""The Ray Train worker loop of the fine-tuning stage (DDP over all classes at once).

One :func:`train_loop_per_worker` runs on every worker of a ``TorchTrainer``:

1. load the diffusion components through :func:`raugment.models.diffusion.load_components`;
2. **cache VAE latents**: each rank encodes its share of the images not yet in ``latents/`` and
   stores the latent *distribution* (mean, std), so every step still draws a fresh latent sample
   as Stable Diffusion training does, without running the VAE encoder again;
3. restore the full training state from ``ray.train.get_checkpoint()`` when a worker failure (or
   a killed driver) restarted the run, and continue after the last finished epoch;
4. train epochs: shuffled, padded so all ranks take the same number of batches; validation loss
   on the held-out items with noise and timesteps fixed across epochs (comparable numbers);
5. rank 0 writes the generator-facing snapshots (:mod:`raugment.personalise.outputs`) for epochs
   the checkpoint policy keeps, then every rank reports; rank 0's report carries the resumable
   training state (learned tensors as safetensors, optimizer state, progress).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raugment import schema
from raugment.personalise.methods import build_personaliser, get_method, load_trainable_state, trainable_state
from raugment.personalise.outputs import CONDITIONINGS, ITEMS, write_snapshot, write_tags
from raugment.personalise.policy import EarlyStopper, EpochRecord, checkpoint_tags, epoch_order, scaled_lr

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


def pixels_batch(images: list[bytes], resolution: int) -> "Any":
    """Encoded images -> ``[n, 3, r, r]`` in [-1, 1]: shorter side to ``r``, centre crop."""
    import torch
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    from raugment.imageio import decode_image

    out = []
    for data in images:
        img = center_crop(resize(decode_image(bytes(data)), resolution, antialias=True), [resolution, resolution])
        out.append(pil_to_tensor(img))
    return torch.stack(out).float().div(127.5).sub(1.0)


def encode_latents_batch(vae: Any, pixels: "Any") -> tuple["Any", "Any"]:
    """VAE latent distribution of a pixel batch: (mean, std), unscaled, float32 on CPU."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def sample_latents(mean: "Any", std: "Any", scaling: float, generator: "Any") -> "Any":
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
                        batch_size: int, rank: int, world: int) -> tuple["Any", "Any"]:
    """Latent distributions of ``ids`` (in order), encoding only what ``latents/`` lacks.

    Each rank encodes every ``world``-th missing image and writes its own part file (a temporary
    name renamed into place), then all ranks meet at a barrier and read every part.
    """
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    cache = out / LATENTS
    cache.mkdir(parents=True, exist_ok=True)
    have = _read_latent_cache(cache)
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
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    have = _read_latent_cache(cache)
    return torch.stack([have[i][0] for i in ids]), torch.stack([have[i][1] for i in ids])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _all_mean(total: float, count: int, device: Any) -> float:
    """Mean over all ranks of per-rank sums."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _event(out: Path, rank: int, **fields: Any) -> None:
    if rank == 0:
        with open(out / EVENTS, "a") as f:
            f.write(json.dumps({"time": time.time(), **fields}) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config`` is built by :func:`raugment.finetune.run`.

    Keys: ``finetune`` (the section as a dict), ``out`` (stage directory), ``images`` (dataset
    shard files); optionally ``fail_after_epoch`` + ``fail_marker`` (fault injection for tests:
    the worker raises once after reporting that epoch).
    """
    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch
    import torch

    from raugment.config import FinetuneConfig, from_dict
    from raugment.models.diffusion import load_components

    fcfg: FinetuneConfig = from_dict(config["finetune"], FinetuneConfig)
    out = Path(config["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(fcfg.seed)
    method = get_method(fcfg.method)

    comps = load_components(fcfg.model, revision=fcfg.revision, device=str(device))
    items = pq.read_table(out / f"{ITEMS}.parquet").to_pydict()
    rows = pq.read_table(out / f"{CONDITIONINGS}.parquet").to_pylist()
    ids = items[schema.ID]
    is_val = np.array([s == "val" for s in items[schema.SPLIT]])
    train_pos, val_pos = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    cond_rows = torch.tensor(items[schema.COND_ROW], dtype=torch.long)
    scaling = float(getattr(comps["vae"].config, "scaling_factor", 0.18215))
    n_timesteps = comps["noise_scheduler"].config.num_train_timesteps

    if fcfg.cache_latents:
        mean, std = ensure_latent_cache(out, ids, config["images"], comps["vae"], fcfg.resolution,
                                        fcfg.encode_batch_size, rank, world)
    else:
        images = read_images(config["images"], ids)
        pixels = pixels_batch([images[i] for i in ids], fcfg.resolution)

    def latents_of(pos: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        if fcfg.cache_latents:
            return sample_latents(mean[pos], std[pos], scaling, gen)
        m, s = encode_latents_batch(comps["vae"], pixels[pos])
        return sample_latents(m, s, scaling, gen)

    # initial table: from the method, identical on every rank (deterministic text encoding)
    from raugment.personalise.methods import CondRow

    cond = [CondRow(r[schema.COND_ROW], r[schema.LABEL], r[schema.CLASS_NAME], r[schema.CLUSTER],
                    r[schema.N_IMAGES], r[schema.TOKEN]) for r in rows]
    model = build_personaliser(method, comps, method.init_table(comps, cond))

    global_batch = fcfg.batch_size * world
    lr = scaled_lr(fcfg.lr, global_batch, fcfg.base_batch_size)
    unet_lr = scaled_lr(fcfg.unet_lr, global_batch, fcfg.base_batch_size)
    groups = [{"params": [model.table], "lr": lr, "weight_decay": 0.0}]
    if method.trains_unet:
        groups.append({"params": [p for p in model.unet.parameters() if p.requires_grad],
                       "lr": unet_lr, "weight_decay": fcfg.weight_decay})
    optimizer = torch.optim.AdamW(groups)

    history: list[EpochRecord] = []
    stopper = EarlyStopper(fcfg.patience, fcfg.min_delta)
    done, stopped = 0, False
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        from safetensors.torch import load_file

        with resumed.as_directory() as d:
            load_trainable_state(model, method, load_file(str(Path(d) / STATE)))
            optimizer.load_state_dict(torch.load(Path(d) / OPTIMIZER, map_location=device, weights_only=True))
            progress = json.loads((Path(d) / PROGRESS).read_text())
        history = [EpochRecord(**h) for h in progress["history"]]
        stopper.load(progress["stopper"])
        done, stopped = progress["epoch"], progress["stopped"]
    _event(out, rank, event="start", resume_after_epoch=done, world_size=world, lr=lr, unet_lr=unet_lr)

    model = ray.train.torch.prepare_model(model)
    inner = getattr(model, "module", model)
    params = [p for g in groups for p in g["params"]]
    keep = method.keep_epochs(fcfg)
    autocast = (torch.autocast("cuda", dtype=getattr(torch, fcfg.dtype))
                if device.type == "cuda" and fcfg.dtype != "float32" else contextlib.nullcontext())

    def loss_on(pos: np.ndarray, gen: torch.Generator, rng: np.random.Generator, net: Any) -> torch.Tensor:
        lat = latents_of(pos, gen)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, n_timesteps, (len(pos),), generator=gen)
        prompt_ids = method.prompt_ids(comps, len(pos), rng)
        with autocast:
            return net(lat.to(device), noise.to(device), t.to(device), cond_rows[pos].to(device),
                       None if prompt_ids is None else prompt_ids.to(device))

    epoch = done
    while not stopped and epoch < fcfg.max_epochs:
        epoch += 1
        t0 = time.perf_counter()
        order = epoch_order(len(train_pos), world, fcfg.batch_size, epoch, fcfg.seed)
        gen = torch.Generator().manual_seed(fcfg.seed * 1_000_003 + epoch * 1009 + rank)
        rng = np.random.default_rng([fcfg.seed, epoch, rank])
        model.train()
        total = 0.0
        for step in range(order.shape[0]):
            loss = loss_on(train_pos[order[step, rank]], gen, rng, model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if fcfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, fcfg.max_grad_norm)
            optimizer.step()
            total += float(loss.detach())
        step_s = (time.perf_counter() - t0) / order.shape[0]
        train_loss = _all_mean(total, order.shape[0], device)
        val_loss = _validation_loss(val_pos, rank, world, fcfg.batch_size, inner, loss_on, fcfg.seed, device)
        if np.isnan(val_loss):  # no held-out images: fall back to the training loss
            val_loss = train_loss
        history.append(EpochRecord(epoch, train_loss, val_loss))
        stopped = stopper.update(val_loss)

        if rank == 0:
            tags = checkpoint_tags(history, keep)
            if epoch in tags:
                state = trainable_state(model, method)
                write_snapshot(out, epoch, {method.table_key: state[method.table_key]},
                               {"method": method.name, "train_loss": train_loss, "val_loss": val_loss,
                                "tags": tags[epoch]}, unet=inner.unet if method.trains_unet else None)
            write_tags(out, tags)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                   "unet_lr": unet_lr, "step_s": step_s, "steps": int(order.shape[0]), "stopped": stopped}
        _event(out, rank, event="epoch", **metrics)
        progress = {"epoch": epoch, "stopped": stopped, "stopper": stopper.state(),
                    "history": [h.__dict__ for h in history]}
        _report(metrics, progress, model, method, optimizer, rank)
        if config.get("fail_after_epoch") == epoch and not Path(config["fail_marker"]).exists():
            Path(config["fail_marker"]).write_text("failed once\n")
            raise RuntimeError(f"injected failure after epoch {epoch}")


def _validation_loss(val_pos: np.ndarray, rank: int, world: int, batch_size: int, net: Any,
                     loss_on: Any, seed: int, device: Any) -> float:
    import torch

    mine = val_pos[rank::world]
    gen = torch.Generator().manual_seed(seed + VAL_SEED + rank)
    rng = np.random.default_rng([seed, VAL_SEED, rank])
    net.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            pos = mine[start:start + batch_size]
            total += float(loss_on(pos, gen, rng, net)) * len(pos)
    return _all_mean(total, len(mine), device)


def _report(metrics: dict, progress: dict, model: Any, method: Any, optimizer: Any, rank: int) -> None:
    """Every rank reports; rank 0 attaches the resumable state."""
    import ray.train
    import torch
    from safetensors.torch import save_file

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_file(trainable_state(model, method), str(Path(d) / STATE))
        torch.save(optimizer.state_dict(), Path(d) / OPTIMIZER)
        (Path(d) / PROGRESS).write_text(json.dumps(progress))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

