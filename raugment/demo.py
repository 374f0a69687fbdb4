"""``raugment demo`` (``make demo``): a small study that runs offline on 2 CPUs in a few minutes.

It runs the study of ``jobs/configs/demo.yaml`` — baseline, retrieval from a local captioned pool
through a local CLIP index and an HTTP server on 127.0.0.1, simple and CLIP-template prompts with
a tiny random-weight Stable Diffusion, FT conditioning, two ratios, two resampled sets — and
writes the full report. Before the study it prepares, once per run root, what a real study would
download: tiny model bundles (``raugment models tiny``), the captioned pool, and a small CLIP
trained briefly on that pool (a random CLIP embeds every image alike, so retrieval would be noise).

Everything lands under the run root (default ``runs/demo``); a second run skips every finished
stage and says so. The pool server keeps its port across runs (saved in the root), because the
server's address is part of the retrieval stage's config.

The accuracies are meaningless (random-weight generator, tiny CNN, a few epochs): the demo shows
that the machinery works, not what the paper found.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from raugment import pool as pool_module
from raugment.config import Config, load_config, read_yaml, with_overrides
from raugment.pool import PoolServer

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"
POOL_PER_CLASS = 100
POOL_DISTRACTORS = 60
CLIP_STEPS = 100
PORT_FILE = "pool_port"


def demo_config_path() -> Path:
    """``jobs/configs/demo.yaml`` of the source tree, or of the installed ``jobs`` package."""
    if DEMO_CONFIG.exists():
        return DEMO_CONFIG
    from importlib.resources import files

    return Path(str(files("jobs") / "configs" / "demo.yaml"))


# ----------------------------------------------------------------------------------------------
# What a real study would download: models, a captioned pool, a CLIP that knows the pool
# ----------------------------------------------------------------------------------------------


def prepare_assets(root: Path, class_names: list[str], seed: int = 0) -> dict[str, Path]:
    """Write (once) the tiny bundles, the pool and the pool-trained CLIP under ``root/assets``."""
    from raugment.models.tiny import write_tiny_bundles

    assets = root / "assets"
    paths = dict(write_tiny_bundles(assets / "models", seed=seed))
    pool_dir = assets / "pool"
    if not (pool_dir / pool_module.POOL_FILE).exists():
        pool_module.build_pool(pool_dir, class_names, per_class=POOL_PER_CLASS, distractors=POOL_DISTRACTORS,
                        seed=seed)
    clip_dir = assets / "pool_clip"
    if not (clip_dir / ".complete").exists():
        t0 = time.perf_counter()
        pool_module.train_small_clip(pool_dir, clip_dir, seed=seed, minutes=3.0, max_steps=CLIP_STEPS)
        (clip_dir / ".complete").write_text("ok\n")
        log.info("demo: trained the pool CLIP in %.1f s", time.perf_counter() - t0)
    paths.update(pool=pool_dir, pool_clip=clip_dir)
    return paths


def asset_overrides(paths: dict[str, Path], url: str) -> dict[str, Any]:
    """Dotted config keys pointing every stage at the demo's models, pool and server."""
    sd, clip = str(paths["sd"].resolve()), str(paths["pool_clip"].resolve())
    aesthetic = str(paths["aesthetic"].resolve())
    return {
        "generate.model": sd,
        "finetune.model": sd,
        "finetune.feature_weights": None,
        "index.path": str(paths["pool"].resolve()),
        "index.clip_model": clip,
        "index.clip_pretrained": None,
        "retrieve.url_base": url,
        "retrieve.aesthetic_model": aesthetic,
        "filter.safety_model": sd,
        "filter.aesthetic_model": aesthetic,
        "filter.clip_model": clip,
        "filter.clip_pretrained": None,
    }


@contextlib.contextmanager
def serve_pool(pool_dir: Path, port_file: Path) -> Iterator[str]:
    """Serve the pool on 127.0.0.1, on the port of the previous run when it is free.

    The server's address is part of the retrieval stage's config (``retrieve.url_base``), so the
    demo keeps the port of its previous run to keep that stage's key.
    """
    port = int(port_file.read_text()) if port_file.exists() else 0
    try:
        server = PoolServer(pool_dir, port=port, hang_s=5.0).start()
    except OSError:
        log.warning("demo: port %d is taken; the retrieval stage will run again on a new port", port)
        server = PoolServer(pool_dir, port=0, hang_s=5.0).start()
    port_file.write_text(str(server.port))
    try:
        yield server.url
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------


def build_config(config_path: str | None, overrides: list[str] | None, root: str | None) -> Config:
    """demo.yaml <- the user's ``--config`` <- ``--set`` overrides <- ``--out``."""
    extra = list(overrides or []) + ([f"run.root={root}"] if root else [])
    return load_config(config_path, extra, base=read_yaml(demo_config_path()))


def run(config_path: str | None = None, overrides: list[str] | None = None,
        root: str | None = None) -> tuple[Path, int]:
    """Run the demo study and its report; returns ``report.html`` and how many stage runs failed."""
    from raugment import study
    from raugment.synthetic import SYNTHETIC_CLASSES

    t0 = time.perf_counter()
    cfg = build_config(config_path, overrides, root)
    run_root = Path(cfg.run.root)
    run_root.mkdir(parents=True, exist_ok=True)
    names = list(SYNTHETIC_CLASSES[: cfg.dataset.synthetic.num_classes])
    paths = prepare_assets(run_root, names, seed=cfg.run.seed)
    with serve_pool(paths["pool"], run_root / "assets" / PORT_FILE) as url:
        result, rep = study.run(with_overrides(cfg, asset_overrides(paths, url)))
    html = rep.path / "report.html"
    log.info("demo: finished in %.1f s; report: %s", time.perf_counter() - t0, html)
    return html, len(study.failures(result))


def cli(cfg: Config, args) -> int:
    """``raugment demo [--out DIR] [--config X.yaml] [--set k=v]``; prints where the report is."""
    html, failed = run(getattr(args, "config", None), getattr(args, "overrides", None),
                       getattr(args, "out", None))
    print(f"demo report: {html}")
    print("(tiny random-weight models: the demo's accuracy numbers are meaningless; "
          "jobs/configs/imagenet10.yaml runs the real study)")
    if failed:
        print(f"{failed} stage runs failed; the report lists them", file=sys.stderr)
    return 1 if failed else 0
