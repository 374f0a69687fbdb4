"""``raugment rehearse``: the real study (``jobs/configs/imagenet10.yaml``) as shipped, on offline stand-ins.

The preset is loaded unchanged; only ``--set`` overrides are added, in three lists that say why:

* :func:`path_overrides`: paths and model ids a real user sets, pointed at stand-ins of the same
  shapes (:mod:`raugment.demo.standins`: an ImageFolder with real synset folders, a LAION-layout
  embeddings index and its images served on 127.0.0.1; :mod:`raugment.demo.tiny`: the SD, CLIP,
  aesthetic bundles, the safety checker inside the SD bundle; random Inception-v3 weights).
* :data:`BOX_OVERRIDES`: sizes a 2-core CPU box cannot take at the preset's values (epochs, image
  sizes, pool concurrency and GPUs -> CPU), each with its reason.
* :data:`TRAP_WORKAROUNDS`: the smallest ``--set`` that gets past a trap the code still has, each
  naming the trap (none today). The classes the stand-in index names rarely are not excluded by
  hand: ``study.shortfall=exclude`` (the preset's default) finds them and the report lists them.

Then: the dry-run's plan (:func:`raugment.study.executor.plan_study`, nothing run), the study with
its report, and a comparison of the planned stage runs (node ids and stages) with the executed
ones (the study's ``plan.json``). Everything lands under ``--out`` (default ``runs/rehearsal``):
``standins/`` (written once, kept), ``run/`` (the study's run root) and ``rehearsal.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raugment.config import Config, load_config

log = logging.getLogger(__name__)

PRESET = Path(__file__).resolve().parent.parent.parent / "jobs" / "configs" / "imagenet10.yaml"

# Sizes the 2-core, GPU-less box demands (the preset's values in the comments).
BOX_OVERRIDES: dict[str, Any] = {
    "index.index_type": "Flat",          # IVF65536,PQ64 needs >= 65536 x 39 training vectors
    "generate.height": 32,               # 512: a tiny UNet at 512 px is minutes per image on CPU
    "generate.width": 32,
    "generate.steps": 4,                 # 50
    "generate.dtype": "float32",         # float16: a GPU dtype
    "generate.pool": {"concurrency": 1, "num_cpus": 0.5, "num_gpus": 0, "batch_size": 16},  # 8 GPUs
    "finetune.resolution": 32,           # 512
    "finetune.max_epochs": 2,            # 40
    "finetune.dtype": "float32",         # bfloat16
    "finetune.batch_size": 8,
    "finetune.workers": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},  # 8 GPU workers
    "finetune.imagic_epochs": 1,         # 8
    "index.pool": {"concurrency": 1, "num_cpus": 0.5, "batch_size": 64},
    "retrieve.download.pool": {"concurrency": 1, "num_cpus": 0.25, "batch_size": 64},
    "retrieve.timeout_s": 5.0,
    "retrieve.download.timeout_s": 2.0,
    "retrieve.download.retries": 0,
    "filter.pool": {"concurrency": 1, "num_cpus": 0.5, "batch_size": 32},
    "train.image_size": 32,              # 224
    "train.max_epochs": 1,               # 270
    "train.batch_size": 32,              # 256
    "train.amp": "none",                 # bf16: a GPU feature
    "train.channels_last": False,
    "train.loader_workers": 0,           # 4
    "train.workers": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},  # 8 GPU workers
    "study.node_gpus": 1,                # the cost estimate's node: this box
    "study.node_cpus": 2,
}

# Traps of issue 18 that current code still has: the smallest --set past each (remove as fixes land).
TRAP_WORKAROUNDS: dict[str, tuple[Any, str]] = {}  # none left: the traps it met are fixed


@dataclass
class Standins:
    """Where the stand-ins are, and their shapes."""

    imagenet: Path
    laion: Path
    models: dict[str, Path]
    shape: Any
    index_shape: Any


def prepare(out: Path, num_classes: int, seed: int = 0) -> Standins:
    """Write (once) the stand-ins under ``out/standins``."""
    from raugment.demo.standins import write_imagenet_folder, write_inception_weights, write_laion_index
    from raugment.demo.tiny import write_tiny_bundles

    base = out / "standins"
    models = write_tiny_bundles(base / "models", parts=["sd", "clip", "aesthetic"], seed=seed)
    models["aesthetic"] = _lifted_aesthetic(models["aesthetic"], base / "models" / "aesthetic_laion")
    models["inception"] = write_inception_weights(base / "models" / "inception_v3.safetensors", seed=seed)
    shape = write_imagenet_folder(base / "imagenet", num_classes=num_classes, seed=seed)
    index_shape = write_laion_index(base / "laion", shape.class_ids, models["clip"], seed=seed)
    return Standins(base / "imagenet", base / "laion", models, shape, index_shape)


# The stand-in index's images were kept by LAION's aesthetic score (its ``aesthetic`` column is
# >= 4 and mostly >= 5), as a real index's are. The tiny random predictor scores ~ N(5, 1.5), so it
# would re-judge about half of them below the preset's threshold of 5 in the filter stage, which a
# real predictor, the one behind that column, would not. The stand-in predictor is the tiny one
# lifted by this much (scores ~ N(8, 1.5)): the filter still runs, and drops about 2 %.
AESTHETIC_LIFT = 3.0


def _lifted_aesthetic(tiny: Path, out: Path) -> Path:
    """The tiny aesthetic predictor with :data:`AESTHETIC_LIFT` added to its output (written once)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from raugment.models.aesthetic import WEIGHTS_FILE

    if (out / WEIGHTS_FILE).exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny, tmp)
    state = load_file(str(tmp / WEIGHTS_FILE))
    last = max((k for k in state if k.endswith(".bias")), key=lambda k: int(k.split(".")[-2]))
    state[last] = state[last] + AESTHETIC_LIFT
    save_file(state, str(tmp / WEIGHTS_FILE))
    tmp.rename(out)
    return out


def path_overrides(s: Standins, url: str, root: Path) -> dict[str, Any]:
    """The paths and model ids a real user sets, pointed at the stand-ins."""
    sd, clip, aesthetic = (str(s.models[k].resolve()) for k in ("sd", "clip", "aesthetic"))
    return {
        "run.root": str(root.resolve()),
        "dataset.path": str(s.imagenet.resolve()),
        "generate.model": sd,
        "finetune.model": sd,
        # torchvision's IMAGENET1K_V1 (FT cluster conditioning's features) as a local state dict
        "finetune.feature_weights": str(s.models["inception"].resolve()),
        "index.path": str(s.laion.resolve()),
        "index.clip_model": clip,
        "index.clip_pretrained": None,
        "retrieve.clip_model": clip,
        "retrieve.url_base": url,
        # the stand-in LAION images are served on 127.0.0.1 (a real index's URLs are public hosts)
        "retrieve.download.allow_loopback": True,
        "retrieve.aesthetic_model": aesthetic,
        "retrieve.safety_model": sd,
        "filter.aesthetic_model": aesthetic,
        "filter.safety_model": sd,
        "filter.clip_model": clip,
        "filter.clip_pretrained": None,
        "dedup.clip_model": clip,
        "dedup.clip_pretrained": None,
    }




def overrides(s: Standins, url: str, root: Path) -> list[str]:
    """Every ``--set`` of the rehearsal, as ``key=value`` strings (values in JSON, which is YAML)."""
    data = {**path_overrides(s, url, root), **BOX_OVERRIDES,
            **{k: v for k, (v, _) in TRAP_WORKAROUNDS.items()}}
    return [f"{k}={json.dumps(v)}" for k, v in data.items()]


@dataclass
class Rehearsal:
    """What a rehearsal found."""

    report: str | None
    wall_s: float
    planned: dict[str, str]          # node id -> stage, from the dry-run
    executed: dict[str, str]         # node id -> stage, from the study's plan.json, with a path
    failed: list[dict[str, Any]] = field(default_factory=list)
    shortfall: dict[str, Any] = field(default_factory=dict)
    rare: list[str] = field(default_factory=list)      # synsets the stand-in index names rarely
    excluded: list[str] = field(default_factory=list)  # dataset.exclude_classes of the run
    overrides: list[str] = field(default_factory=list)
    plan_text: str = ""

    @property
    def plan_matches(self) -> bool:
        return self.planned == self.executed


def run(out: str | Path = "runs/rehearsal", num_classes: int = 20, preset: str | Path | None = None,
        extra: list[str] | None = None) -> Rehearsal:
    """Write the stand-ins, dry-run the preset, run it, compare plans; returns what was found."""
    from raugment.demo.standins import serve_directory
    from raugment.study import executor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = prepare(out, num_classes)
    with serve_directory(s.laion) as url:
        sets = overrides(s, url, out / "run") + list(extra or [])
        cfg = load_config(preset or PRESET, sets)
        sets.append(f"study.expected={json.dumps(dataset_hint(cfg))}")  # the stand-in's sizes, for the dry-run
        cfg = load_config(preset or PRESET, sets)
        dry = executor.plan_study(cfg)
        plan_text = executor.format_plan(dry)
        log.info("rehearsal: dry-run plan\n%s", plan_text)
        study, rep = executor.run(cfg)
    plan = json.loads((study.path / "plan.json").read_text())
    result = Rehearsal(
        report=str(rep.path / "report.html") if rep is not None else None,
        wall_s=time.perf_counter() - t0,
        planned={nid: n.stage for nid, n in dry.nodes.items()},
        executed={n["id"]: n["stage"] for n in plan["nodes"] if n.get("path")},
        failed=plan.get("failed", []),
        shortfall=_shortfalls(plan, cfg),
        rare=list(s.index_shape.rare),
        excluded=list(cfg.dataset.exclude_classes),
        overrides=sets,
        plan_text=plan_text,
    )
    (out / "rehearsal.json").write_text(json.dumps(asdict(result) | {"plan_matches": result.plan_matches},
                                                   indent=1, default=str))
    return result


def dataset_hint(cfg: Config) -> dict[str, int]:
    """``study.expected`` from listing the stand-in folder as the dataset stage will (no stage run)."""
    from raugment.core.stats import round_half_up

    root = Path(str(cfg.dataset.path)) / "train"
    excluded = set(cfg.dataset.exclude_classes)
    counts = [sum(1 for _ in d.iterdir()) for d in sorted(root.iterdir())
              if d.is_dir() and d.name not in excluded]
    train = [max(1, round_half_up(c * cfg.dataset.fraction)) for c in counts]
    return {"classes": len(counts), "train_images": sum(train), "max_per_class": max(train)}


def _shortfalls(plan: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Retrieval's per-class shortfall, from the finished retrieve stage's stats."""
    root = Path(cfg.run.root)
    out: dict[str, Any] = {}
    for n in plan["nodes"]:
        if n["stage"] == "retrieve" and n.get("path"):
            stats = json.loads((root / n["path"] / "stats.json").read_text())
            out.update(stats.get("shortfall", {}) or stats.get("retrieval", {}).get("shortfall", {}))
    return out


def cli(cfg: Config, args: Any) -> int:
    """``raugment rehearse [--out DIR] [--classes N] [--set k=v]``: prints the plan comparison and
    where the report is; exit 1 when the plans differ or a stage run failed."""
    result = run(args.out, args.classes, extra=args.overrides)
    print(result.plan_text)
    print(f"rehearsal: {result.wall_s:.0f} s; report: {result.report}")
    print(f"planned {len(result.planned)} stage runs, executed {len(result.executed)}; "
          f"plans {'match' if result.plan_matches else 'DIFFER'}")
    if result.shortfall:
        print(f"retrieval shortfall by class: {result.shortfall}")
    for f in result.failed:
        print(f"failed: {f['stage']} {f['labels']}: {f['reason']}")
    return 0 if result.plan_matches and not result.failed else 1
