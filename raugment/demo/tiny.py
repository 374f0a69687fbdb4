"""``raugment models tiny DIR``: tiny random-weight bundles in the real on-disk formats.

Layout written::

    DIR/sd/          a Stable Diffusion pipeline (model_index.json, unet/, vae/, text_encoder/,
                     tokenizer/ with CLIP's real BPE, scheduler/, safety_checker/, feature_extractor/)
    DIR/clip/        an open_clip model (open_clip_config.json + open_clip_model.safetensors)
    DIR/aesthetic/   the LAION aesthetic predictor head (safetensors + config)
    DIR/classifier/  a classifier bundle (config.json + model.safetensors)

Each part is written by the module that also loads it, so what is written is exactly what the real
loading path reads. Writing is idempotent: a part whose directory already has ``.complete`` is kept.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# part -> "module:function(out_dir: Path, seed: int) -> Path"
PARTS: dict[str, str] = {
    "sd": "raugment.models.diffusion:write_tiny_sd",
    "clip": "raugment.models.clip:write_tiny_clip",
    "aesthetic": "raugment.models.aesthetic:write_tiny_aesthetic",
    "classifier": "raugment.models.classifier:write_tiny_classifier",
}


def write_tiny_bundles(out: str | Path, parts: list[str] | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the tiny bundles (all parts by default) under ``out``; returns part -> directory."""
    out = Path(out)
    written: dict[str, Path] = {}
    for part in parts or list(PARTS):
        if part not in PARTS:
            raise ValueError(f"unknown tiny model part {part!r}; known: {', '.join(PARTS)}")
        target = out / part
        if (target / ".complete").exists():
            written[part] = target
            continue
        module, func = PARTS[part].split(":")
        getattr(importlib.import_module(module), func)(target, seed=seed)
        (target / ".complete").write_text("ok\n")
        written[part] = target
        log.info("wrote tiny %s bundle to %s", part, target)
    return written


def cli(cfg, args) -> int:
    """``raugment models tiny DIR`` / ``raugment models train-mini DIR`` (see :mod:`raugment.demo.miniworld`)."""
    if getattr(args, "what", "tiny") == "train-mini":
        from raugment.demo import miniworld

        return miniworld.cli(cfg, args)
    written = write_tiny_bundles(args.out, seed=cfg.run.seed)
    for part, path in written.items():
        log.info("%s: %s", part, path)
    return 0
