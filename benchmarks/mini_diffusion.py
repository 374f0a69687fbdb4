"""The mini diffusion model: does prompted generation show the class, and what does training cost?

For each text-encoder initialisation (``--text-init``, default ``random`` then ``bag``) the mini
model is trained on the mini-world's pool (the test's: 4 demo classes, 100 images per class, 60
distractors, seed 0) and measured: the class prompts' mean pairwise cosine in the text encoder
(``mini_diffusion.prompt_similarity``, near 1 = the UNet cannot tell the classes apart), and
recognisability per prompt builder (a ``tiny_cnn`` trained on real draws classifies ``--n``
generated images per class; chance 0.25). Training cost is CPU seconds of one thread
(``time.process_time``) and, to compare runs on a shared machine, the same figure in units of a
fixed reference workload (a 256x256 matmul loop) timed in the same process: on a loaded box both
grow, their ratio much less.

Usage: ``python benchmarks/mini_diffusion.py [--steps 150] [--text-init random bag] [--n 16]``
Prints one line per variant.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def reference_cpu_s() -> float:
    """CPU seconds of a fixed single-thread workload (the unit that makes runs comparable)."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    t = time.process_time()
    for _ in range(200):
        a = torch.tanh(a @ a.T / 16)
    return time.process_time() - t


def main() -> None:
    from raugment.demo import mini_diffusion as md
    from raugment.demo.corpus import build_corpus
    from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=md.DEFAULT_STEPS, help="UNet training steps")
    ap.add_argument("--text-init", nargs="+", default=["random", "bag"], choices=md.TEXT_INITS)
    ap.add_argument("--n", type=int, default=16, help="generated images per class and prompt builder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    classes = SYNTHETIC_CLASSES[:4]
    root = Path(tempfile.mkdtemp(prefix="bench-mini-diffusion-"))
    pool = build_corpus(root / "pool", classes, per_class=100, distractors=60, seed=args.seed)
    judge = md.train_reference_classifier(classes, seed=args.seed)
    for init in args.text_init:
        ref = reference_cpu_s()
        out = md.train_mini_diffusion(pool, root / init, seed=args.seed, max_steps=args.steps, text_init=init)
        info = md.read_info(out)
        ref = (ref + reference_cpu_s()) / 2
        res = md.recognisability(out, judge, classes, ("simple_nows", "clip_templates"), n=args.n, seed=args.seed)
        acc = {b: r["accuracy"] for b, r in res["prompts"].items()}
        print(f"text_init={init} steps={args.steps} vae_steps={info['vae_steps']} "
              f"class_prompt_cosine={info['class_prompt_cosine']:.3f} "
              f"recognisability simple_nows={acc['simple_nows']:.3f} clip_templates={acc['clip_templates']:.3f} "
              f"(chance {res['chance']:.2f}, n={args.n}/class) train_cpu_s={info['cpu_s']:.1f} "
              f"(vae {info['cpu_s_vae']:.1f}) = {info['cpu_s'] / ref:.1f} reference units of {ref:.2f} s",
              flush=True)


if __name__ == "__main__":
    main()
