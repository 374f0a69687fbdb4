"""``raugment <command> ...``: one entry point for every stage, the study, the demo and tiny models.

Stage commands (one per entry of :data:`raugment.study.target.TARGETS`: dataset, index, retrieve,
finetune, select, generate, filter, dedup, audit, assemble, train, tune) are one-target studies
(:func:`raugment.study.target.run_target`): the planner plans the stage and whatever it needs,
and each stage run is run or skipped as in a study. Other commands: ``index build --out DIR`` and
``index export-clip-back`` (an index outside the run root), ``report``, ``run`` (a whole study),
``demo`` (the offline demo study, or with ``--target STAGE`` one target in the demo world),
``rehearse`` (the ImageNet preset on offline stand-ins),
``models`` and ``config`` (every key with its value).

The parser is built from tables and imports nothing heavy: ``raugment --help`` answers without
torch or ray. A command's code is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from raugment.config import Config, load_config
from raugment.core.config import ConfigError, InputError
from raugment.study.target import TARGETS

log = logging.getLogger("raugment")

ArgAdder = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[Config, argparse.Namespace], int | None]


# ---- arguments ---------------------------------------------------------------------------------

def _no_args(p: argparse.ArgumentParser) -> None:
    return None


# option of a stage command (raugment.study.target.OPTIONS) -> its argument
TARGET_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "method": ("--method", dict(action="append", default=[], metavar="NAME",
                                help="a method to plan (repeatable; a name of study.variants too); default: "
                                     "study.methods for filter/dedup/audit, the baseline for assemble/train/tune")),
    "added": ("--added", dict(action="append", default=[], metavar="[METHOD=]DIR",
                              help="a finished added-image artifact that the stage reads instead of planning "
                                   "its producer (repeatable; a bare DIR is named after its stage)")),
    "dataset": ("--dataset", dict(metavar="DIR", help="a finished dataset artifact instead of the dataset stage")),
    "audit": ("--audit", dict(metavar="DIR", help="a finished leakage audit (for assemble.leakage=remove) "
                                                  "instead of the planned one")),
}


def _target_args(options: Sequence[str]) -> ArgAdder:
    def add(p: argparse.ArgumentParser) -> None:
        for option in options:
            flag, kwargs = TARGET_OPTIONS[option]
            p.add_argument(flag, **kwargs)
    return add


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "export-clip-back"],
                   help="'build': build the local CLIP kNN index retrieval reads (a stage under run.root), "
                        "or with --out one anywhere; 'export-clip-back': write an index in the layout "
                        "clip-retrieval's `clip back` serves (indices.json + image.index + metadata/)")
    p.add_argument("--out", help="build: write the index here instead of a stage directory under run.root "
                                 "(not a study artifact); export-clip-back: the clip back layout")
    p.add_argument("--index", help="export-clip-back: the index directory (default: retrieve.index)")
    p.add_argument("--name", help="export-clip-back: the index name clients send as indice_name "
                                  "(default: raugment)")


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


def _rehearse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/rehearsal",
                   help="where the stand-ins (written once) and the study's run root go (default: runs/rehearsal)")
    p.add_argument("--classes", type=int, default=20,
                   help="ImageNet classes of the stand-in ImageFolder (real synset ids; default 20)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="directory for report.html / report.md (default: under run.root)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run root of the demo (default: runs/demo)")
    p.add_argument("--target", choices=list(TARGETS), metavar="STAGE",
                   help="run this stage command in the demo world (its models, captioned corpus and "
                        "server) instead of the whole demo study; e.g. --target retrieve")
    _target_args([o for o in TARGET_OPTIONS])(p)


# ---- handlers ----------------------------------------------------------------------------------

def run_stage_command(cfg: Config, args: argparse.Namespace) -> int:
    """``raugment <stage> [--method NAME] [--added [METHOD=]DIR] [--dataset DIR] [--audit DIR]``."""
    from raugment.study.target import Pins, run_target

    run_target(cfg, args.command, Pins.of(args), getattr(args, "method", None) or [])
    return 0


def _index(cfg: Config, args: argparse.Namespace) -> int:
    """``raugment index build [--out DIR]`` / ``raugment index export-clip-back --index DIR --out DIR``."""
    if args.action == "export-clip-back":
        from raugment.stages.index.stage import export_clip_back

        index_dir = args.index or cfg.retrieve.index
        if not index_dir or not args.out:
            raise ConfigError("raugment index export-clip-back needs --index DIR (or retrieve.index) and --out DIR")
        export_clip_back(index_dir, args.out, args.name or "raugment")
        return 0
    if args.out:
        from raugment.stages.index.stage import build_outside

        build_outside(cfg, args.out)
        return 0
    return run_stage_command(cfg, args)


def _report(cfg: Config, args: argparse.Namespace) -> int:
    """``raugment report [--out DIR]``: report of the latest study under ``run.root``."""
    from raugment.core.storage import latest
    from raugment.stages.report import stage as report

    study = latest(cfg.run.root, "study")
    if study is None:
        raise ConfigError(f"run.root: no finished study under {cfg.run.root!r}; run "
                          "`raugment run STUDY.yaml` first or point run.root at a study's root")
    if args.out:
        path = report.write_report(cfg.run.root, study, cfg.report, args.out)
    else:
        path = report.run(cfg, study).path / "report.html"
    print(f"report: {path}")
    return 0


def _config(cfg: Config, args: argparse.Namespace) -> int:
    """``raugment config [--config X.yaml] [--set k=v] [SECTION ...]``: every key with its value, as YAML."""
    from raugment.core.config import dump_yaml, to_dict

    data = to_dict(cfg)
    unknown = [s for s in args.sections if s not in data]
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; sections: {', '.join(data)}")
    print(dump_yaml({s: data[s] for s in args.sections} if args.sections else data), end="")
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sections", nargs="*", metavar="SECTION", help="only these sections (default: all)")


def _module_cli(module: str) -> Handler:
    """The ``cli(cfg, args)`` of ``module``, imported when the command runs."""
    def handler(cfg: Config, args: argparse.Namespace) -> int | None:
        return importlib.import_module(module).cli(cfg, args)
    return handler


# ---- the command table -------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    help: str
    add_args: ArgAdder
    handler: Handler


COMMANDS: dict[str, Command] = {stage: Command(t.help, _target_args(t.options), run_stage_command)
                                  for stage, t in TARGETS.items()}
COMMANDS.update({
    # a stage command with two actions outside the run root besides its one-target study
    "index": Command("build a local CLIP kNN index (the one retrieval reads, or one anywhere with --out), "
                     "or export one for clip back", _index_args, _index),
    "report": Command("write the study report", _report_args, _report),
    "config": Command("print every config key with its value (defaults <- --config <- --set) as YAML",
                      _config_args, _config),
    "run": Command("run a whole study (resumable)", _study_args, _module_cli("raugment.study.executor")),
    "demo": Command("run the embedded offline demo study (or one stage command in its world)", _demo_args,
                    _module_cli("raugment.demo.command")),
    "rehearse": Command("run jobs/configs/imagenet10.yaml as shipped on offline stand-ins (ImageNet layout, "
                        "LAION-layout index, tiny models) and check the dry-run's plan is what ran",
                        _rehearse_args, _module_cli("raugment.demo.rehearse")),
    "models": Command("write tiny random-weight bundles or train the mini-world's models", _models_args,
                      _module_cli("raugment.demo.tiny")),
})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raugment",
        description="Grow image-classification training sets with retrieved and generated images, on Ray. "
                    "A stage command runs that stage and whatever it needs, skipping what is finished.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", "-c", help="YAML config; sections not given keep their defaults")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
        command.add_args(p)
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
    except InputError as exc:  # a config file that cannot be read as text
        print(f"raugment {args.command}: input error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.run.log_level)
    try:
        result = COMMANDS[args.command].handler(cfg, args)
    except ConfigError as exc:
        print(f"raugment {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"raugment {args.command}: input error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
