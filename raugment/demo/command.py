"""``raugment demo`` (``make demo``): a small study that runs offline on 2 CPUs in a few minutes.

It runs the study of ``jobs/configs/demo.yaml`` on the mini-world (:mod:`raugment.demo.miniworld`) —
baseline, retrieval from the world's captioned pool through a local CLIP index and an HTTP server
on 127.0.0.1, simple and CLIP-template prompts and FT conditioning with the world's small
diffusion model, two ratios, three resampled sets — and writes the full report. Before the study
it prepares, once per run root, what a real study would download: tiny model bundles (``raugment
models tiny``: aesthetic head, safety checker) and the mini-world with its trained small CLIP and
diffusion model (``raugment models train-mini``, a content-addressed artifact under
``<root>/assets``).

``raugment demo --target STAGE`` (options of the stage commands too: ``--method``, ``--added``,
...) runs that stage command's one-target study (:mod:`raugment.study.target`) in the same world
instead of the whole study: the assets prepared and the corpus served as above, e.g. ``--target
retrieve`` retrieves from the served corpus through the world's index.

Everything lands under the run root (default ``runs/demo``); a second run skips every finished
stage and says so. The pool server keeps its port across runs (saved in the root), because the
server's address is part of the retrieval stage's config.

The accuracies are those of a toy world with tiny models: they show how the methods compare on
this world (the report says how well the small CLIP retrieves and how recognisable the generated
images are), not what the paper found on ImageNet.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from raugment.config import Config, load_config
from raugment.core.config import read_yaml, with_overrides
from raugment.demo.corpus import CorpusServer

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"


def demo_config_path() -> Path:
    """``jobs/configs/demo.yaml`` of the source tree, or of the installed ``jobs`` package."""
    if DEMO_CONFIG.exists():
        return DEMO_CONFIG
    from importlib.resources import files

    return Path(str(files("jobs") / "configs" / "demo.yaml"))


# ----------------------------------------------------------------------------------------------
# What a real study would download: models, a captioned pool, a CLIP that knows the pool
# ----------------------------------------------------------------------------------------------


def prepare_assets(root: Path, cfg: Config) -> dict[str, Path]:
    """Write (once) the tiny bundles and the mini-world with its trained models under ``root/assets``.

    The mini-world (``raugment models train-mini``: captioned pool, small CLIP, small diffusion
    model) is a content-addressed artifact under ``root/assets/mini_models/<key>``, so a changed
    ``mini`` or ``dataset.synthetic`` section trains again and an unchanged one is skipped. The tiny
    random bundles are still what the aesthetic filters and the safety checker load.
    """
    from raugment.demo.miniworld import train_mini
    from raugment.demo.tiny import write_tiny_bundles

    assets = root / "assets"
    paths = dict(write_tiny_bundles(assets / "models", seed=cfg.run.seed))
    t0 = time.perf_counter()
    mini = train_mini(assets, cfg)
    log.info("demo: mini-world models ready in %.1f s (%s)", time.perf_counter() - t0, mini.path)
    paths.update(mini=mini.path, pool=mini.pool, pool_clip=mini.clip)
    if mini.diffusion is not None:
        paths["mini_sd"] = mini.diffusion
    return paths


def asset_overrides(paths: dict[str, Path], url: str) -> dict[str, Any]:
    """Dotted config keys pointing every stage at the demo's models, pool and server."""
    sd, clip = str(paths["sd"].resolve()), str(paths["pool_clip"].resolve())
    # The generator is the mini-world's trained diffusion model when there is one.
    gen = str(paths.get("mini_sd", paths["sd"]).resolve())
    aesthetic = str(paths["aesthetic"].resolve())
    out = {
        "generate.model": gen,
        "finetune.model": gen,
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
    if "mini" in paths:
        out["report.mini_models"] = str(paths["mini"].resolve())
    return out


@contextlib.contextmanager
def serve_corpus(pool_dir: Path) -> Iterator[str]:
    """Serve the pool on 127.0.0.1 on a free port; yields its base URL.

    The port changes from run to run; the retrieval stage's key does not depend on it (its tables
    keep the pool's relative URLs, ``retrieve.url_base`` is joined only to fetch them).
    """
    server = CorpusServer(pool_dir, port=0, hang_s=5.0).start()
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


@contextlib.contextmanager
def world(config_path: str | None = None, overrides: list[str] | None = None,
          root: str | None = None) -> Iterator[Config]:
    """The demo world's config, with its assets prepared and its captioned corpus served while open."""
    cfg = build_config(config_path, overrides, root)
    run_root = Path(cfg.run.root)
    run_root.mkdir(parents=True, exist_ok=True)
    paths = prepare_assets(run_root, cfg)
    with serve_corpus(paths["pool"]) as url:
        yield with_overrides(cfg, asset_overrides(paths, url))


def run(config_path: str | None = None, overrides: list[str] | None = None,
        root: str | None = None) -> tuple[Path, int]:
    """Run the demo study and its report; returns ``report.html`` and how many stage runs failed."""
    from raugment.study import executor as study

    t0 = time.perf_counter()
    with world(config_path, overrides, root) as cfg:
        result, rep = study.run(cfg)  # report=True (the default): a report artifact
    if rep is None:
        raise RuntimeError("the demo study ran without its report")
    html = rep.path / "report.html"
    log.info("demo: finished in %.1f s; report: %s", time.perf_counter() - t0, html)
    return html, len(study.failures(result))


def run_target(stage: str, config_path: str | None = None, overrides: list[str] | None = None,
               root: str | None = None, pins: Any = None, methods: Sequence[str] = ()) -> list[Any]:
    """``raugment demo --target STAGE``: the demo world's one-target study of ``stage``
    (:func:`raugment.study.target.run_target`), e.g. retrieval from its served corpus."""
    from raugment.study import target

    with world(config_path, overrides, root) as cfg:
        return target.run_target(cfg, stage, pins, methods)


def cli(cfg: Config, args) -> int:
    """``raugment demo [--out DIR] [--config X.yaml] [--set k=v] [--target STAGE ...]``; prints where
    the report is (with ``--target``: logs the stage's artifacts)."""
    if getattr(args, "target", None):
        from raugment.study.target import Pins

        run_target(args.target, args.config, args.overrides, args.out, Pins.of(args), args.method or [])
        return 0
    html, failed = run(getattr(args, "config", None), getattr(args, "overrides", None),
                       getattr(args, "out", None))
    print(f"demo report: {html}")
    print("(a toy world with small models trained on it: the numbers compare the methods on this world, "
          "not on ImageNet; jobs/configs/imagenet10.yaml runs the real study)")
    if failed:
        print(f"{failed} stage runs failed; the report lists them", file=sys.stderr)
    return 1 if failed else 0
