"""``raugment <command> ...``: one entry point for every stage, the study, the demo and tiny models.

The parser is built from a table and imports nothing heavy: ``raugment --help`` answers without
torch or ray. A command's module is imported only when that command runs; it exposes
``cli(cfg, args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from raugment.config import load_config
from raugment.core.config import ConfigError, InputError

log = logging.getLogger("raugment")

# command -> (module with ``cli``, help, extra-arguments adder)
ArgAdder = Callable[[argparse.ArgumentParser], None]


def _no_args(p: argparse.ArgumentParser) -> None:
    return None


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", help="study YAML (same as --config)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the cost estimate, run nothing")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["tiny", "train-mini"],
                   help="'tiny': write tiny random-weight bundles; 'train-mini': build the mini-world and "
                        "train its small CLIP and diffusion model (cached: a second call skips)")
    p.add_argument("out", help="directory to write the bundles (or the mini_models artifacts) into")
    p.add_argument("--seed", type=int, default=None,
                   help="train-mini: the world's seed (default dataset.seed)")


def _retrieve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo-pool", metavar="DIR",
                   help="retrieve from the offline demo pool in DIR (built, and its small CLIP trained, when "
                        "missing), served on 127.0.0.1 while the stage runs")


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "export-clip-back"],
                   help="'build': build a local CLIP kNN index; 'export-clip-back': write an index in the "
                        "layout clip-retrieval's `clip back` serves (indices.json + image.index + metadata/)")
    p.add_argument("--out", help="directory of the index (default: a stage directory under run.root), "
                                 "or of the clip back layout")
    p.add_argument("--index", help="export-clip-back: the index directory (default: retrieve.index)")
    p.add_argument("--name", help="export-clip-back: the index name clients send as indice_name "
                                  "(default: raugment)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="directory for report.html / report.md (default: under run.root)")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--added", action="append", default=[], metavar="DIR",
                   help="an added-image artifact (generate/retrieve output; repeatable; "
                        "default: the latest of each under run.root)")


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", metavar="DIR", help="dataset artifact (default: the latest under run.root)")
    p.add_argument("--added", action="append", default=[], metavar="DIR",
                   help="added-image artifact to audit (repeatable; default: the latest dedup output)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--added", action="append", default=[], metavar="METHOD=DIR",
                   help="an added-image artifact to assemble with (repeatable); none = baseline")
    p.add_argument("--audit", help="leakage audit artifact (for assemble.leakage=remove)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run root of the demo (default: runs/demo)")


COMMANDS: dict[str, tuple[str, str, ArgAdder]] = {
    "dataset": ("raugment.stages.dataset.stage", "read a dataset and write its splits", _no_args),
    "generate": ("raugment.stages.generate.stage", "generate images with a diffusion model", _no_args),
    "finetune": ("raugment.stages.finetune.stage", "personalise the diffusion model (methods 5-9)", _no_args),
    "index": ("raugment.stages.index.stage", "build a local CLIP kNN index", _index_args),
    "retrieve": ("raugment.stages.retrieve.stage", "retrieve and download CLIP nearest neighbours", _retrieve_args),
    "filter": ("raugment.stages.filter.stage", "filter and de-duplicate added images", _filter_args),
    "audit": ("raugment.stages.audit.stage", "audit added images for test-set leakage", _audit_args),
    "assemble": ("raugment.stages.assemble.stage", "assemble an augmented training set", _train_args),
    "train": ("raugment.stages.train.stage", "train and evaluate a classifier with Ray Train", _train_args),
    "tune": ("raugment.study.tune", "sweep config keys with Ray Tune", _train_args),
    "report": ("raugment.stages.report.stage", "write the study report", _report_args),
    "run": ("raugment.study.executor", "run a whole study (resumable)", _study_args),
    "demo": ("raugment.demo.command", "run the embedded offline demo study", _demo_args),
    "models": ("raugment.demo.tiny", "write tiny random-weight bundles or train the mini-world's models",
               _models_args),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raugment",
        description="Grow image-classification training sets with retrieved and generated images, on Ray.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_, add) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", "-c", help="YAML config; sections not given keep their defaults")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
        add(p)
    return parser


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from raugment import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    config_path = args.config or getattr(args, "study", None)
    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as exc:
        print(f"raugment {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.run.log_level)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        result = module.cli(cfg, args)
    except ConfigError as exc:
        print(f"raugment {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"raugment {args.command}: input error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
