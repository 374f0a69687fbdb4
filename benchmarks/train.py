"""Training throughput: the Ray Train loop vs a plain single-process PyTorch loop, one run.

All variants read the same assembled training set from raugment's own Parquet shards through the
same DataLoader (decode + random-resized-crop + flip) and train the same model with SGD:

* ``plain``   — a hand-written loop in this process (DataLoader -> forward -> backward -> step);
* ``local``   — raugment's training loop (:func:`raugment.stages.train.stage.fit`) in this process, no Ray;
* ``ray``     — the same loop on Ray Train (``TorchTrainer``, 1 worker, checkpoint every epoch).

Images/s is measured over the training phase of each epoch (validation and checkpoints are
reported separately as end-to-end time). Like with like: one worker process with ``--cpus`` CPUs
against this process limited to the same number of torch threads. Prints one line of figures,
ratios taken within this run.

``--runners N``: instead, N classifiers back to back through the stage (``train.run``) with each
``train.runner`` — ``ray_train`` (a ``TorchTrainer`` per classifier) and ``worker_group`` (one
long-lived group for all, as in a study) — and their wall-time ratio, in one run.

``--gpu`` (on a machine with CUDA): ResNet-50 at 224 px with the GPU defaults that ``auto``
resolves to (bf16 autocast, channels_last, torch.compile; the plain loop uses the same), images
per second per GPU from raugment's shards (CPU decode, or ``--gpu-decode`` nvJPEG) and from
synthetic in-memory tensors, so the data path's cost is visible.

Usage: ``python benchmarks/train.py [--images 1024 --epochs 3 --model tiny_cnn --size 32] [--runners 6]``
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from raugment.runtime.contexts import LocalContext


def make_data(root: Path, images: int, size: int, gpu: bool):
    """Dataset + baseline manifest through the real stages (synthetic source)."""
    from raugment.config import load_config
    from raugment.stages.assemble import stage as assemble
    from raugment.stages.dataset import stage as dataset

    classes = 8
    per_class = max(2, images // classes) * 2  # half train, half val (subsample protocol, 50 %)
    cfg = load_config(overrides=[
        f"run.root={root}", "run.progress=false", "dataset.source=synthetic", "dataset.fraction=0.5",
        f"dataset.synthetic.num_classes={classes}", f"dataset.synthetic.train_per_class={per_class}",
        "dataset.synthetic.test_per_class=4", f"dataset.synthetic.size={size}",
        "dataset.image_format=JPEG" if gpu else "dataset.image_format=PNG", "assemble.ratio=0"])
    data = dataset.run(cfg)
    return cfg, data, assemble.run(cfg, data, {})


def train_cfg(cfg, args):
    from raugment.core.config import with_overrides

    return with_overrides(cfg, {
        "train.model": args.model, "train.image_size": args.size, "train.batch_size": args.batch,
        "train.max_epochs": args.epochs, "train.stop_patience": args.epochs + 1,
        "train.lr_patience": args.epochs + 1, "train.lr": 0.01, "train.loader_workers": args.loader_workers,
        # amp / channels_last / compile stay "auto": the defaults are what is measured
        "train.gpu_decode": args.gpu_decode, "train.workers.num_workers": 1,
        "train.workers.cpus_per_worker": float(args.cpus), "train.workers.use_gpu": args.gpu,
        "cluster.include_dashboard": False})


def train_phase_rate(history) -> float:
    """Images/s over the training phase of every epoch but the first (warm-up)."""
    rows = history[1:] or history
    return sum(r["train_images"] for r in rows) / sum(r["train_s"] for r in rows)


def plain_loop(spec, args, device: str) -> float:
    """The baseline: a minimal PyTorch loop over the same loader and model; images/s after epoch 1.

    It uses the same GPU options as raugment resolves for ``device`` (on a GPU: bf16 autocast,
    channels-last, torch.compile; on a CPU: none), so the ratio compares like with like.
    """
    import contextlib

    import torch

    from raugment.lib import loader
    from raugment.models.classifier import build_model

    opts = spec.train.resolved(device)
    mem = torch.channels_last if opts.channels_last else torch.contiguous_format
    autocast = ((lambda: torch.autocast(device, dtype=torch.bfloat16)) if opts.amp == "bf16"
                else contextlib.nullcontext)
    torch.manual_seed(0)
    model = build_model(args.model, spec.num_classes).to(device, memory_format=mem)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    step_model = torch.compile(model) if opts.compile else model
    ds = loader.build_dataset(spec.train_units, loader.build_transform(args.size, True), shuffle=True)
    dl = loader.make_loader(ds, args.batch, args.loader_workers, pin_memory=device == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss()
    seen, spent = 0, 0.0
    for epoch in range(args.epochs):
        ds.epoch = epoch
        model.train()
        t0, n = time.perf_counter(), 0
        for x, y in dl:
            x, y = x.to(device, non_blocking=True, memory_format=mem), y.to(device, non_blocking=True)
            with autocast():
                loss = loss_fn(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        if device == "cuda":
            torch.cuda.synchronize()
        if epoch > 0 or args.epochs == 1:
            seen, spent = seen + n, spent + time.perf_counter() - t0
    return seen / spent


def local_fit(spec, root: Path) -> tuple[float, float]:
    from raugment.stages.train import stage as train

    ctx = LocalContext(root / "local-ckpt", train.TrainState, device="cuda" if spec.train.workers.use_gpu else "cpu")
    t0 = time.perf_counter()
    train.fit(spec, ctx)
    wall = time.perf_counter() - t0
    return train_phase_rate(train.TrainState.read(root / "local-ckpt" / "latest").history), wall


def ray_fit(spec, cfg, root: Path) -> tuple[float, float]:
    from raugment.stages.train import stage as train

    t0 = time.perf_counter()
    state = train.fit_ray(spec, cfg, root / "ray", f"bench-{os.getpid()}-{time.time_ns()}")
    return train_phase_rate(state.history), time.perf_counter() - t0


def runners_line(cfg, data, manifest, args, root: Path) -> str:
    """N classifiers (seeds 0..N-1) per runner through the train stage; wall time and ratio.

    The runners alternate classifier by classifier (the machine's load drifts); the worker group
    lives for the whole benchmark, as in a study, so its start-up is counted once.
    """
    from raugment.core.config import with_overrides
    from raugment.runtime.worker_group import keep_groups
    from raugment.stages.train import stage as train

    def one(runner: str, seed: int) -> None:
        train.run(with_overrides(cfg, {"train.runner": runner, "train.seed": seed,
                                       "run.root": str(root / runner)}), data, manifest)

    with keep_groups():
        walls = time_runners(one, args.runners)
    return (f"train runners: {args.runners} classifiers model={args.model} size={args.size} epochs={args.epochs} "
            f"workers=1x{args.cpus} CPU | {runners_figures(walls, args.runners)}")


def time_runners(run_one, n: int) -> dict[str, float]:
    """Wall seconds of ``run_one(runner, seed)`` per runner over seeds 0..n-1, alternating runner
    by runner (the machine's load drifts). Also used by ``benchmarks/finetune.py``."""
    walls = {"ray_train": 0.0, "worker_group": 0.0}
    for seed in range(n):
        for runner in walls:
            t0 = time.perf_counter()
            run_one(runner, seed)
            walls[runner] += time.perf_counter() - t0
    return walls


def runners_figures(walls: dict[str, float], n: int) -> str:
    """The figures of :func:`time_runners`: totals, per run, and the ray_train / worker_group ratio."""
    return (f"ray_train {walls['ray_train']:.1f} s ({walls['ray_train'] / n:.1f} s each) | "
            f"worker_group {walls['worker_group']:.1f} s ({walls['worker_group'] / n:.1f} s each) | "
            f"ray_train/worker_group {walls['ray_train'] / walls['worker_group']:.2f}x")


def worker_threads(cpus: int) -> int:
    """torch threads a Ray worker with ``cpus`` CPUs gets (Ray sets OMP_NUM_THREADS from them)."""
    import ray

    @ray.remote(num_cpus=cpus)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def synthetic_gpu_rate(args, num_classes: int) -> float:
    """ResNet forward/backward on in-memory random tensors (no data path), images/s."""
    import torch

    from raugment.models.classifier import build_model

    model = build_model(args.model, num_classes).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model = torch.compile(model)  # the training defaults on a GPU: bf16, channels-last, compiled
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (args.batch,), device="cuda")
    steps, warm = 30, 5
    for i in range(steps + warm):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * args.batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="tiny_cnn")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cpus", type=int, default=1, help="CPUs of the Ray worker = torch threads of the plain loop")
    p.add_argument("--loader-workers", type=int, default=0)
    p.add_argument("--gpu", action="store_true",
                   help="CUDA: ResNet-50 224 px; bf16, channels_last, torch.compile (the GPU defaults)")
    p.add_argument("--gpu-decode", action="store_true", help="decode JPEG on the GPU (nvJPEG)")
    p.add_argument("--runners", type=int, default=0,
                   help="compare train.runner ray_train vs worker_group over this many classifiers")
    p.add_argument("--root", help="work directory (default: a temporary one)")
    args = p.parse_args()
    if args.gpu and args.model == "tiny_cnn":
        args.model, args.size, args.batch, args.loader_workers = "resnet50", 224, 256, max(args.loader_workers, 8)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    from raugment.lib.loader import count
    from raugment.stages.train import stage as train

    torch.set_num_threads(args.cpus)  # the Ray worker gets OMP_NUM_THREADS = its CPUs
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-train-"))
    cfg, data, manifest = make_data(root, args.images, args.size, args.gpu)
    cfg = train_cfg(cfg, args)
    if args.runners:
        print(runners_line(cfg, data, manifest, args, root))
        return
    spec = train.build_spec(cfg, data, manifest)
    device = "cuda" if args.gpu else "cpu"
    # The machine's load drifts: measure the baseline before and after the others, use the mean.
    plain_before = plain_loop(spec, args, device)
    local, local_wall = local_fit(spec, root)
    ray_rate, ray_wall = ray_fit(spec, cfg, root)
    plain_after = plain_loop(spec, args, device)
    plain = (plain_before + plain_after) / 2
    ray_threads = worker_threads(args.cpus)
    line = (f"train bench: model={args.model} size={args.size} images={count(spec.train_units)} "
            f"epochs={args.epochs} threads={torch.get_num_threads()} (ray worker {ray_threads}) device={device} | "
            f"plain {plain:.0f} img/s (before {plain_before:.0f}, after {plain_after:.0f}) | "
            f"raugment local {local:.0f} img/s ({local_wall:.1f} s end-to-end) | "
            f"ray train 1 worker {ray_rate:.0f} img/s ({ray_wall:.1f} s end-to-end) | "
            f"ray/plain {ray_rate / plain:.3f} (overhead {100 * (1 - ray_rate / plain):+.1f} %), "
            f"local/plain {local / plain:.3f}")
    if args.gpu:
        line += f" | synthetic in-memory {synthetic_gpu_rate(args, spec.num_classes):.0f} img/s"
    print(line)


if __name__ == "__main__":
    main()
