"""The mini-world: a small, seeded visual world in which a study's numbers can be checked.

One world = the synthetic labelled dataset (``dataset.synthetic``: "<colour> <shape>" classes, its
train and held-out test splits) + a larger captioned pool of the same world (:func:`raugment.demo.corpus.
build_corpus`: class images, distractors of other colour/shape pairs, noisy captions, fault URLs)
that also holds slightly altered copies of some *test* images (so the leakage audit has real
leaks to find) + a second, held-out pool (another seed, no faults) on which the small CLIP's
precision@n is measured + a larger training-only pool (a third seed, no faults, never served) that
the CLIP trains on together with the served pool. Every image is drawn by
:mod:`raugment.stages.dataset.sources.synthetic`.

``raugment models train-mini OUT_DIR`` (:func:`train_mini`) builds the world and trains the small
models on its pool — a CLIP (open_clip format) and a text-conditioned diffusion model (diffusers
SD layout, ``raugment.demo.mini_diffusion``) — as one content-addressed artifact
``OUT_DIR/mini_models/<key>/``: the key hashes the ``mini`` section, the synthetic dataset section
and the seed, so a second call is a pure skip. ``mini_models.json`` there records precision@n and
the training times.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raugment.config import Config
from raugment.core import schema
from raugment.core.artifacts import MINI_MODELS_INFO
from raugment.core.config import to_dict
from raugment.demo.config import MiniConfig
from raugment.stages.dataset.sources.synthetic import Settings as SyntheticSettings
from raugment.stages.dataset.sources.synthetic import SyntheticConfig

log = logging.getLogger(__name__)

STAGE = "mini_models"
INFO_FILE = MINI_MODELS_INFO  # the report reads it
POOL_DIR, HELDOUT_DIR, CLIP_DIR, DIFFUSION_DIR = "pool", "heldout", "clip", "diffusion"
CLIP_TRAIN_DIR = "clip_train"
# Offsets of the pools' seeds from the world seed: the held-out pool never shares a draw with the
# training pool, and neither with the dataset (whose generators are seeded by (seed, split, class)).
_POOL_SEED, _HELDOUT_SEED, _CLIP_TRAIN_SEED = 1000, 2000, 3000


@dataclass(frozen=True)
class MiniModels:
    """A finished ``mini_models`` artifact: where its parts are, and what was measured."""

    path: Path

    @property
    def pool(self) -> Path:
        return self.path / POOL_DIR

    @property
    def heldout(self) -> Path:
        return self.path / HELDOUT_DIR

    @property
    def clip(self) -> Path:
        return self.path / CLIP_DIR

    @property
    def diffusion(self) -> Path | None:
        p = self.path / DIFFUSION_DIR
        return p if p.is_dir() else None

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.path / INFO_FILE).read_text())


def class_names(syn: SyntheticConfig) -> list[str]:
    """The world's labelled classes: the first ``num_classes`` synthetic classes."""
    from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES, check_config

    check_config(syn)
    return list(SYNTHETIC_CLASSES[: syn.num_classes])


def near_duplicates(syn: SyntheticConfig, per_class: int, seed: int) -> list[tuple[str, Any]]:
    """``(class name, image)``: the first ``per_class`` test images of each class, slightly altered.

    A brightness shift (and the pool's JPEG encoding) keeps the perceptual hash within a few bits of
    the test image (a leak the audit must find) while the bytes differ (no exact-match shortcut).
    """
    from PIL import Image

    from raugment.stages.dataset.sources.synthetic import split_images

    out: list[tuple[str, Any]] = []
    n = min(per_class, syn.test_per_class)
    for label, name in enumerate(class_names(syn)):
        for img in split_images(label, n, 1, syn.size, seed):
            arr = np.asarray(img, dtype=np.int16) + 6
            out.append((name, Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")))
    return out


def build_world(out: str | Path, mini: MiniConfig, syn: SyntheticConfig, seed: int = 0) -> dict[str, Path]:
    """Write the world's captioned pool, held-out pool and CLIP training pool under ``out``.

    Returns:
        ``{"pool": ..., "heldout": ...}`` directories, plus ``"clip_train"`` when the ``mini``
        section asks for a training-only pool.

    Args:
        out: directory to write (``pool/``, ``heldout/``, ``clip_train/``).
        mini: pool sizes (``mini`` section).
        syn: the labelled dataset's section; its test images are the ones near-duplicated.
        seed: the dataset's seed (``dataset.seed``); the pools' seeds are derived from it.
    """
    from raugment.demo.corpus import build_corpus

    out = Path(out)
    names = class_names(syn)
    pool = build_corpus(out / POOL_DIR, names, per_class=mini.pool_per_class, distractors=mini.distractors,
                      seed=seed + _POOL_SEED, size=syn.size,
                      extra=near_duplicates(syn, mini.near_duplicates, seed))
    # Held out: another seed, exact captions; only precision@n reads it (never served or indexed).
    heldout = build_corpus(out / HELDOUT_DIR, names, per_class=mini.heldout_per_class,
                         distractors=mini.distractors, seed=seed + _HELDOUT_SEED, size=syn.size,
                         fault_rate=0.0, noisy_caption_rate=0.0)
    paths = {"pool": pool, "heldout": heldout}
    if mini.clip_train_per_class:
        # Captions as noisy as the served pool's: it is the same world, only larger.
        paths["clip_train"] = build_corpus(out / CLIP_TRAIN_DIR, names, per_class=mini.clip_train_per_class,
                                         distractors=mini.clip_train_distractors,
                                         seed=seed + _CLIP_TRAIN_SEED, size=syn.size, fault_rate=0.0)
    return paths


def clip_precision(clip_dir: str | Path, pool_dir: str | Path, names: Sequence[str], n: int) -> dict[str, Any]:
    """precision@n of text->image kNN: for each class, the share of the ``n`` images nearest to
    ``"A photo of {w(name)}."`` (the retrieval stage's query) whose hidden label is that class.

    Returns:
        ``{"precision_at_n": mean over classes, "n": n, "per_class": {name: precision}}``.
    """
    from raugment.core.imageio import decode_image
    from raugment.demo.corpus import read_corpus
    from raugment.lib.prompts import simple_nows_prompt
    from raugment.models.clip import load_clip

    table = read_corpus(pool_dir)
    labels = np.array(table.column(schema.POOL_LABEL).to_pylist())
    enc = load_clip(str(clip_dir))
    img = enc.embed_images([decode_image(b) for b in table.column(schema.IMAGE).to_pylist()])
    txt = enc.embed_texts([simple_nows_prompt(c) for c in names])
    per_class = {}
    for c, t in zip(names, txt):
        top = np.argsort(-(img @ t), kind="stable")[:n]
        per_class[c] = float(np.mean(labels[top] == c))
    return {"precision_at_n": round(float(np.mean(list(per_class.values()))), 4), "n": n,
            "per_class": {k: round(v, 4) for k, v in per_class.items()}}


def section(cfg: Config) -> dict[str, Any]:
    """What the ``mini_models`` key hashes: the world, the training settings, the seed."""
    synthetic = SyntheticSettings.of(cfg.dataset).synthetic
    return {"mini": to_dict(cfg.mini), "synthetic": to_dict(synthetic), "seed": cfg.dataset.seed}


def train_mini(root: str | Path, cfg: Config) -> MiniModels:
    """Build the world and train its small models as the content-addressed stage ``mini_models``.

    Writes ``<root>/mini_models/<key>/`` with ``pool/``, ``heldout/``, ``clip/`` (open_clip
    local-dir), ``diffusion/`` (diffusers SD layout, when ``mini.diffusion``) and ``mini_models.json``.
    A complete key is skipped (nothing is trained again).
    """
    from raugment.core.storage import run_stage

    cfg.mini.validate("mini")
    synthetic = SyntheticSettings.of(cfg.dataset).synthetic
    names = class_names(synthetic)
    mini = cfg.mini

    def body(run) -> None:
        from raugment.demo.corpus import train_small_clip

        seed = cfg.dataset.seed
        paths = build_world(run.path, mini, synthetic, seed)
        t0 = time.process_time()
        w0 = time.perf_counter()
        train_small_clip([p for k, p in paths.items() if k != "heldout"], run.path / CLIP_DIR, seed=seed,
                         minutes=float("inf"), max_steps=mini.clip_steps, batch_size=mini.clip_batch_size,
                         lr=mini.clip_lr, num_threads=mini.num_threads, shift=mini.clip_shift,
                         warmup_steps=mini.clip_warmup_steps, cosine=mini.clip_cosine,
                         caption_positives=mini.clip_caption_positives)
        info: dict[str, Any] = {
            "classes": names,
            "clip": {"steps": mini.clip_steps, "train_cpu_s": round(time.process_time() - t0, 2),
                     "train_wall_s": round(time.perf_counter() - w0, 2),
                     "heldout": clip_precision(run.path / CLIP_DIR, paths["heldout"], names, mini.precision_n)},
            "pool": json.loads((paths["pool"] / "pool.json").read_text()),
        }
        log.info("mini-world CLIP: precision@%d on the held-out pool %.3f (%d steps, %.1f s CPU)",
                 mini.precision_n, info["clip"]["heldout"]["precision_at_n"], mini.clip_steps,
                 info["clip"]["train_cpu_s"])
        if mini.diffusion:
            from raugment.demo.mini_diffusion import train_mini_diffusion

            t0, w0 = time.process_time(), time.perf_counter()
            train_mini_diffusion(paths["pool"], run.path / DIFFUSION_DIR, seed=seed,
                                 max_steps=mini.diffusion_steps, size=synthetic.size,
                                 num_threads=mini.num_threads)
            info["diffusion"] = {"steps": mini.diffusion_steps,
                                 "train_cpu_s": round(time.process_time() - t0, 2),
                                 "train_wall_s": round(time.perf_counter() - w0, 2)}
        (run.path / INFO_FILE).write_text(json.dumps(info, indent=2))
        run.stats.add("pool_images", info["pool"]["rows"])
        run.stats.add("near_duplicates", len(info["pool"]["extra_ids"]))
        run.stats.extra.update(precision_at_n=info["clip"]["heldout"]["precision_at_n"],
                               clip_train_cpu_s=info["clip"]["train_cpu_s"])

    art = run_stage(root, STAGE, section(cfg), None, body)
    return MiniModels(art.path)


def cli(cfg: Config, args) -> int:
    """``raugment models train-mini OUT_DIR [--seed S]``: print where the models are and precision@n."""
    if getattr(args, "seed", None) is not None:
        cfg.dataset.seed = int(args.seed)
    models = train_mini(args.out, cfg)
    clip = models.info["clip"]
    print(f"mini models: {models.path}")
    print(f"  CLIP: {models.clip}  precision@{clip['heldout']['n']} (held-out pool) = "
          f"{clip['heldout']['precision_at_n']:.3f}")
    if models.diffusion:
        print(f"  diffusion: {models.diffusion}")
    return 0
