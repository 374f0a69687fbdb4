"""Generation stage on its actor pool vs. a plain diffusers loop (ratios in one run).

Both sides generate the same prompts (the stage's own plan: same seeds, same order within a
class) with the same model, options and diffusion batch size, and encode each image as the stage
does. The plain loop is what one writes by hand: load the pipeline, loop over batches.

Figures, one line:

* ``stage`` img/s: end to end, ``generate.run`` wall time (planning, a fresh actor with its model
  load, generation, shard writes, stats). The actor's torch/diffusers imports are in it too,
  unless the workers preloaded them (``--preload raugment.models.preload`` =
  ``cluster.preload_modules``: Ray's workers import them when the cluster starts them, here
  while the first plain loop runs);
* ``plain`` img/s: pipeline load + loop (run before and after each stage run; the mean of the two
  around it is used), and the same with the loop's own imports (torch +
  ``raugment.models.preload``, the set a worker can preload; what a hand-written script pays too);
* start-up: stage wall time outside its generation loop vs. the plain loop's load (+ imports);
* warm pool: the same stage again (other seeds) in the actors of the first run kept in a study
  scope (``cluster.keep_pools``), as a study's later generation runs get them;
* generation only: time inside the actor's generation loop (the stage's ``actor_s``) vs. the
  plain loop without its pipeline load, i.e. both without one-off start-up; that ratio shows
  what the stage costs per image (shard writes, bookkeeping), the end-to-end one what it costs
  to start (an actor process importing torch/diffusers, model load), which a long run, a
  study's warm pool or preloading workers amortises.

On this CPU-only box both sides use one torch thread: an actor with ``num_cpus=0.5`` gets
``OMP_NUM_THREADS=1`` from Ray, and the plain loop runs in a fresh interpreter started the same
way. With ``--model`` and ``--num-gpus 1`` on a GPU machine it measures the real thing
(``--arch sd14``: the full-size SD v1.4 architecture with random weights, at 512 px and 50
steps), adding the TFLOP/s reached and the fraction of the GPU's ceiling.

Usage: ``python benchmarks/generate.py [--classes 4 --per-class 16 --steps 10 --size 64 --batch-size 8]
[--preload raugment.models.preload]``;
on a GPU: ``--arch sd14 --size 512 --steps 50 --batch-size 32 --dtype float16 --num-gpus 1 --num-cpus 4``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def fake_dataset(root: Path, classes: int):
    """A dataset artifact with only a classes table (prompt methods need nothing else)."""
    from raugment.core import schema
    from raugment.core.storage import run_stage

    def body(run):
        run.write_single(schema.to_table(
            [{"label": i, "class_id": f"class{i}", "class_name": f"object number {i}", "n_train": 1}
             for i in range(classes)], schema.CLASSES), "classes")

    return run_stage(root, "dataset", {"bench": classes}, {}, body)


def plain_loop(cfg, rows, device: str) -> tuple[float, float, float]:
    """Seconds of a plain loop: (load + generate + encode, generate + encode, imports + load + generate + encode).

    The imports are torch and diffusers (with transformers), which a hand-written script pays too.
    """
    t_imports = time.perf_counter()
    import torch

    import raugment.models.preload  # noqa: F401  (what cluster.preload_modules can import in workers:

    # torch, diffusers' SD pipelines, transformers' CLIP; diffusers would import them lazily inside the load)
    from raugment.core.imageio import encode_image
    from raugment.models.diffusion import load_pipeline

    g = cfg.generate.resolved(device)  # the "auto" GPU options, as the stage's actors resolve them
    imports_s = time.perf_counter() - t_imports
    t0 = time.perf_counter()
    pipe = load_pipeline(g.model, dtype=g.dtype, device=device, scheduler=g.scheduler, sdpa=g.sdpa,
                         channels_last=g.channels_last, compile=g.compile, vae_slicing=g.vae_slicing)
    t1 = time.perf_counter()
    by_class: dict[int, list] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    for class_rows in by_class.values():
        for i in range(0, len(class_rows), g.pool.batch_size):
            batch = class_rows[i:i + g.pool.batch_size]
            out = pipe([r["prompt"] for r in batch], height=g.height, width=g.width,
                       num_inference_steps=g.steps, guidance_scale=g.guidance_scale,
                       generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in batch])
            for img in out.images:
                encode_image(img, g.image_format, g.quality)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, t2 - t0 + imports_s


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", default=None, help="SD bundle or hub id (default: a random one of --arch)")
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd14"],
                   help="random-weight architecture written when --model is not given (sd14 = full size)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense half-precision peak, for the fraction of the ceiling (H100 SXM)")
    p.add_argument("--dtype", default="auto", help="auto = float16 on a GPU, float32 on a CPU")
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--num-cpus", type=float, default=0.5)
    p.add_argument("--preload", default=None,
                   help="cluster.preload_modules, comma-separated ('' = none; default: the config's default)")
    p.add_argument("--plain-in", default=None, help=argparse.SUPPRESS)  # child: run the plain loop only
    return p.parse_args()


def setup(args: argparse.Namespace, work: Path, model: str):
    """(config, dataset artifact, planned rows) — the same in the parent and the plain-loop child."""
    from raugment.config import load_config
    from raugment.stages.generate import stage as generate

    cfg = load_config(None, [
        f"run.root={work / 'runs'}", "run.progress=false", f"generate.model={model}",
        f"generate.height={args.size}", f"generate.width={args.size}", f"generate.steps={args.steps}",
        f"generate.images_per_class={args.per_class}", f"generate.dtype={args.dtype}",
        f"generate.pool.batch_size={args.batch_size}", f"generate.pool.num_gpus={args.num_gpus}",
        f"generate.pool.num_cpus={args.num_cpus}", "generate.safety_checker=true"])
    dataset = fake_dataset(work / "runs", args.classes)
    method = generate.check_config(cfg)
    return cfg, dataset, method.plan(generate.read_classes(dataset), cfg.generate, dataset=dataset, finetune=None)


def run_plain(args: argparse.Namespace, work: Path, model: str, device: str) -> tuple[float, float, float]:
    """The plain loop in a fresh interpreter with the thread count Ray gives the actor (a process
    that starts single-threaded, not the driver with Ray's threads beside it)."""
    env = dict(os.environ)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, int(args.num_cpus)))
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--model", model, "--plain-in", str(work)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)

    from raugment.core.config import ClusterConfig, with_overrides
    from raugment.models.diffusion import write_random_sd
    from raugment.runtime.cluster import init_ray, keep_pools, pick_device
    from raugment.stages.generate import stage as generate

    device = pick_device("cuda" if args.num_gpus > 0 else "cpu")
    if args.plain_in:
        cfg, _, rows = setup(args, Path(args.plain_in), args.model)
        print(json.dumps(plain_loop(cfg, rows, device)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    model = args.model or str(write_random_sd(work / "sd", args.arch))
    cfg, dataset, rows = setup(args, work, model)
    n = len(rows)
    cluster = ClusterConfig(temp_dir=tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    if args.preload is not None:
        cluster.preload_modules = [m for m in args.preload.split(",") if m]
    init_ray(cluster, progress=False)

    # plain, stage, plain, warm stage, plain: each stage run is compared with the mean of the plain
    # runs on either side of it, which cancels slow drift of the box (its speed moves by ~10 %
    # between minutes here). The warm run is the stage again in the actors that a study's later
    # generation runs get (the first run's pool kept in a study scope; other seeds, same model).
    with keep_pools():
        plain = [run_plain(args, work, model, device)]
        t0 = time.perf_counter()
        art = generate.run(cfg, dataset)
        stage_s = time.perf_counter() - t0
        plain.append(run_plain(args, work, model, device))
        t1 = time.perf_counter()
        warm = generate.run(with_overrides(cfg, {"generate.seed": cfg.generate.seed + 1}), dataset)
        warm_s = time.perf_counter() - t1
        plain.append(run_plain(args, work, model, device))
    plain_s, plain_gen_s, plain_all_s = ((a + b) / 2 for a, b in zip(plain[0], plain[1]))
    plain_warm_s = (plain[1][0] + plain[2][0]) / 2
    actor_s = art.stats["actor_s"]
    assert art.stats["counts"]["images"] == n == warm.stats["counts"]["images"], art.stats
    assert warm.stats["actors_reused"] and warm.stats["pipeline_loads"] == 0, warm.stats
    print(f"generate: {n} images ({args.classes} classes), {args.size} px, {args.steps} steps, batch "
          f"{args.batch_size}, {device}, workers preload {cluster.preload_modules or 'nothing'}: stage "
          f"{n / stage_s:.2f} img/s end to end, plain loop {n / plain_s:.2f} img/s with load (ratio "
          f"{plain_s / stage_s:.3f}), {n / plain_all_s:.2f} img/s with its torch/diffusers imports too (ratio "
          f"{plain_all_s / stage_s:.3f}); start-up: stage {stage_s - actor_s:.1f} s (actor build "
          f"{art.stats['actor_start_s']:.1f} s, plan {art.stats['plan_s']:.2f} s), plain "
          f"{plain_s - plain_gen_s:.1f} s load + {plain_all_s - plain_s:.1f} s imports; warm pool (a study's "
          f"next run): {n / warm_s:.2f} img/s vs plain {n / plain_warm_s:.2f} (ratio {plain_warm_s / warm_s:.3f}); "
          f"generation only: actor {n / actor_s:.2f} img/s, plain {n / plain_gen_s:.2f} img/s (ratio "
          f"{plain_gen_s / actor_s:.3f}; plain runs {', '.join(f'{n / p[1]:.2f}' for p in plain)} img/s)"
          + ceiling(args, n / actor_s, device))


def ceiling(args, img_s: float, device: str) -> str:
    """On a GPU with the full-size UNet: TFLOP/s reached and the fraction of the ceiling.

    SD v1 costs ~0.83 TFLOP per UNet call per 512 px image, two calls per step with guidance
    (~83 TFLOP per 50-step image), scaling with the latent area.
    """
    if device == "cpu" or (args.arch != "sd14" and not args.model):
        return ""
    tflop = 0.83 * args.steps * 2 * (args.size / 512) ** 2
    return (f"; {img_s * tflop:.0f} TFLOP/s = {img_s * tflop / args.peak_tflops:.1%} of a "
            f"{args.peak_tflops:.0f} TFLOP/s peak ({args.peak_tflops / tflop:.1f} img/s ceiling)")


if __name__ == "__main__":
    main()
