"""Fine-tuning step time per method vs. a plain diffusers-style step (ratios in one run, one line).

Workload: one batch of ``--batch`` images at ``--resolution`` px, two classes, the same batch every
step. Timed per method (5-9): raugment's training step (sample from the cached latent
distribution, build the conditioning from the learned table / pseudo-word, UNet forward +
backward, AdamW). The reference is the step a hand-written fine-tuning loop runs (as in
diffusers' text-to-image example): VAE-encode the pixels every step, text-encode the prompt, UNet
forward + backward, AdamW on the UNet. Ratios < 1 mean raugment's step is cheaper; the latent cache
and frozen-UNet methods are why.

``--full-size`` builds Stable Diffusion v1.4's architecture (UNet 860 M, VAE, CLIP ViT-L/14 text
encoder) with random weights for GPU figures; the default is the tiny bundle.

``--runners N``: instead, N fine-tuning stage runs (``finetune.run``, ft_conditioning, seeds
0..N-1) with each ``finetune.runner`` -- ``ray_train`` (a ``TorchTrainer`` per run) and
``worker_group`` (a group leased per run and shut down after it, as between the stages of a
study) -- alternating run by run, and their wall-time ratio, in one run.

Usage: ``python benchmarks/finetune.py [--model runs/models/sd] [--device cpu] [--rounds 10]``
       ``python benchmarks/finetune.py --runners 3 [--epochs 2]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raugment.lib.finetuned.families import CondRow, build_trainable, denoising_loss, encode_prompts
from raugment.stages.finetune.methods import get_method

METHODS = ["ft_conditioning", "ft_cluster_conditioning", "imagic", "textual_inversion", "pseudoword_dm"]
ROWS = [CondRow(0, 0, "tiger shark, Galeocerdo cuvieri"), CondRow(1, 1, "axolotl")]


def full_size_components(device: str) -> dict:
    """SD v1.4's architecture with random weights (configs as in the released model)."""
    import diffusers
    import transformers

    from raugment.models.diffusion import SD14_SCHEDULER, write_clip_tokenizer

    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    sched = diffusers.DDPMScheduler.from_config({k: v for k, v in SD14_SCHEDULER.items() if k != "skip_prk_steps"})
    return {"unet": unet.to(device), "vae": vae.to(device), "text_encoder": te.to(device), "tokenizer": tok,
            "noise_scheduler": sched}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rounds(steps: dict, rounds: int, per_round: int, device: str) -> dict[str, float]:
    """Median seconds per step of each step function, timed in interleaved rounds so that load
    drift on a shared machine hits every method alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t0) / per_round)
    return {name: float(np.median(t)) for name, t in times.items()}


def method_step(name: str, comps: dict, mean, std, t, rows, args):
    """One raugment training step of method ``name`` (cached latent distribution)."""
    method = get_method(name)
    net = build_trainable(method, comps, method.init_table(comps, ROWS)).to(args.device)
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-3)
    rng = np.random.default_rng(0)

    def step() -> None:
        lat = (mean + std * torch.randn_like(std)) * comps["vae"].config.scaling_factor
        ids = method.prompt_ids(comps, args.batch, rng)
        loss = net(lat, torch.randn_like(lat), t, rows, None if ids is None else ids.to(args.device))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def runners_line(args) -> str:
    """N fine-tunings per runner through the stage on a synthetic dataset; wall time and ratio.

    The runners alternate run by run (the machine's load drifts). The tiny SD bundle is written
    when ``--model`` does not exist. Every run is a fresh stage key (its own root).
    """
    import logging
    import os

    from train import runners_figures, time_runners  # benchmarks/train.py (this script's directory)

    from raugment.config import load_config
    from raugment.core.config import with_overrides
    from raugment.demo.tiny import write_tiny_bundles
    from raugment.stages.dataset import stage as dataset
    from raugment.stages.finetune import stage as finetune

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    model = Path(args.model)
    if not (model / "model_index.json").exists():
        model = write_tiny_bundles(root / "models", parts=["sd"])["sd"]
    cfg = load_config(None, [
        f"run.root={root}", "run.progress=false", "cluster.include_dashboard=false",
        "dataset.synthetic.num_classes=4", "dataset.synthetic.train_per_class=40", "dataset.fraction=0.5",
        "dataset.synthetic.test_per_class=2", f"finetune.model={model}", f"finetune.resolution={args.resolution}",
        f"finetune.batch_size={args.batch}", f"finetune.max_epochs={args.epochs}",
        f"finetune.patience={args.epochs}", "finetune.workers.num_workers=1",
        f"finetune.workers.cpus_per_worker={args.cpus}", "finetune.feature_weights=null"])
    data = dataset.run(cfg)

    def one(runner: str, seed: int) -> None:
        finetune.run(with_overrides(cfg, {"finetune.runner": runner, "finetune.seed": seed,
                                          "run.root": str(root / runner)}), data)

    walls = time_runners(one, args.runners)  # no keep_groups: a study releases the group after the stage
    return (f"finetune runners: {args.runners} runs ft_conditioning tiny SD {args.resolution}px "
            f"epochs={args.epochs} workers=1x{args.cpus} CPU | {runners_figures(walls, args.runners)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/models/sd",
                   help="diffusers bundle (tiny: raugment models tiny runs/models)")
    p.add_argument("--full-size", action="store_true", help="SD v1.4 architecture, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--runners", type=int, default=0,
                   help="compare finetune.runner ray_train vs worker_group over this many stage runs")
    p.add_argument("--epochs", type=int, default=2, help="--runners: epochs per run")
    p.add_argument("--cpus", type=float, default=0.5, help="--runners: CPUs of the one worker")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.runners:
        print(runners_line(args))
        return
    from raugment.models.diffusion import load_components

    def fresh() -> dict:
        torch.manual_seed(0)
        return full_size_components(args.device) if args.full_size else load_components(args.model, device=args.device)

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g).mul(2).sub(1).to(args.device)
    rows = torch.arange(args.batch, device=args.device) % 2
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)

    # reference: a plain step that encodes pixels and text every step and trains the UNet
    comps = fresh()
    opt = torch.optim.AdamW(comps["unet"].parameters(), lr=1e-6)
    prompts = ["A photo of tigershark.", "A photo of axolotl."] * (args.batch // 2)

    def plain_step() -> None:
        with torch.no_grad():
            lat = comps["vae"].encode(pixels).latent_dist.sample() * comps["vae"].config.scaling_factor
        cond = encode_prompts(comps["text_encoder"], comps["tokenizer"], prompts)
        loss = denoising_loss(comps["unet"], comps["noise_scheduler"], lat, torch.randn_like(lat), t, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        dist = comps["vae"].encode(pixels).latent_dist
    mean, std = dist.mean, dist.std
    steps = {"plain": plain_step}
    for name in METHODS:
        steps[name] = method_step(name, fresh(), mean, std, t, rows, args)
    figures = timed_rounds(steps, args.rounds, args.steps, args.device)
    plain = figures.pop("plain")
    what = "SD v1.4 arch (random)" if args.full_size else "tiny SD"
    parts = ", ".join(f"{n} {1000 * s:.1f} ms ({s / plain:.2f}x, {1 / s:.1f} steps/s)" for n, s in figures.items())
    print(f"finetune step, {what}, {args.device}, batch {args.batch} @ {args.resolution}px: "
          f"plain UNet step {1000 * plain:.1f} ms; {parts}")


if __name__ == "__main__":
    main()
