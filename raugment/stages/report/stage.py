"""``raugment report``: the study report as one offline folder (HTML + Markdown + JSON + PNGs).

Sections, per dataset of the study:

* Table 1 style accuracy: test top-1 mean ± standard error over sets per method and ratio, with
  the baseline row and configured upper-bound rows (``report.upper_bound``);
* per-class improvement over the baseline (Figure 5A) and accuracy vs. augmentation ratio
  (Figure 5B), matplotlib PNGs;
* sample grids, class x method;
* retrieval success and filter / dedup drops from the stages' ``stats.json``;
* the leakage audit summary with a link to its gallery (copied into the folder);
* checkpoint selection of the fine-tuned methods (5-9): which checkpoint generated their images,
  and the validation top-1 of each candidate's scoring classifier (or "selection off");
* measured cost per method and stage (wall, CPU- and GPU-hours from ``stats.json``: the driver's
  and every Ray actor's and DDP rank's own), and per 1000 added images per method beside the
  paper's cost comparison (:func:`paper_cost`).

:func:`collect` gathers every number into plain data (also written as ``report.json``, which is
what tests and resumed runs compare); :func:`render` writes the files from it.
"""

from __future__ import annotations

import html
import json
import logging
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.artifacts import GALLERY, GALLERY_DIR, MINI_MODELS_INFO, RESULTS_FILE
from raugment.core.artifacts import SUMMARY as AUDIT_SUMMARY
from raugment.core.stats import format_mean_se, mean_se
from raugment.core.storage import Artifact, StageRun, run_stage, write_text_atomic
from raugment.stages.report.config import ReportConfig

log = logging.getLogger(__name__)

BASELINE = "baseline"
ORIGINAL = "original"


# ----------------------------------------------------------------------------------------------
# Collecting numbers
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _read_runs(study: Artifact) -> list[dict[str, Any]]:
    rows = study.read("runs").to_pylist()
    for r in rows:
        r[S.ARTIFACTS] = json.loads(r[S.ARTIFACTS])
    return sorted(rows, key=lambda r: (r[S.DATASET], r[S.METHOD], r[S.RATIO], r[S.SET_INDEX], r[S.SEED] or 0))


def _cell(values: list[float]) -> dict[str, Any]:
    mean, se = mean_se(values)
    return {"mean": mean, "se": None if math.isnan(se) else se, "n": len(values),
            "text": format_mean_se(mean, None if math.isnan(se) else se)}


def _table(runs: list[dict], root: Path) -> dict[str, Any]:
    """Accuracy cells: method -> ratio -> mean/se/n of test top-1 (and best validation top-1)."""
    values: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
        res = _read_json(root / r[S.ARTIFACTS]["train"] / RESULTS_FILE)
        for key in (S.TEST_TOP1, S.TEST_TOP5, S.VAL_TOP1_BEST):
            if res.get(key) is not None:
                values[r[S.METHOD]][r[S.RATIO]][key].append(float(res[key]))
    out: dict[str, Any] = {}
    for method, by_ratio in values.items():
        out[method] = {}
        for ratio, metrics in sorted(by_ratio.items()):
            out[method][_ratio_key(ratio)] = {k: _cell(v) for k, v in metrics.items() if v}
    return out


def _ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def _per_class(runs: list[dict], root: Path, ratio: float) -> dict[str, Any]:
    """Figure 5A data: per-class top-1 change of each method against the baseline at ``ratio``."""
    from raugment.lib.evaluate import per_class_improvement

    def results(method: str, r: float | None) -> list[Artifact]:
        return [Artifact.open(root / x[S.ARTIFACTS]["train"]) for x in runs
                if x[S.METHOD] == method and (r is None or x[S.RATIO] == r)]

    base = results(BASELINE, None)
    if not base:
        return {}
    out = {}
    for method in sorted({x[S.METHOD] for x in runs} - {BASELINE}):
        arts = results(method, ratio)
        if not arts:
            continue
        table = per_class_improvement(arts, base)
        imp = table.column(S.IMPROVEMENT).to_pylist()
        names = table.column(S.CLASS_NAME).to_pylist()
        order = sorted(range(len(imp)), key=lambda i: imp[i])
        out[method] = {"ratio": ratio, "improvement": imp, "classes_improved": sum(v > 0 for v in imp),
                       "classes_worse": sum(v < 0 for v in imp), "mean": sum(imp) / len(imp),
                       "worst": [names[i] for i in order[:3] if imp[i] < 0],
                       "best": [names[i] for i in order[::-1][:3] if imp[i] > 0]}
    return out


def _added_artifact(runs: list[dict], method: str) -> str | None:
    for r in runs:
        if r[S.METHOD] == method:
            return r[S.ARTIFACTS].get("added")
    return None


def _samples(runs: list[dict], root: Path, cfg: ReportConfig) -> dict[str, Any]:
    """Ids of the grid's images: the first ``samples_per_cell`` ids (sorted) per class and column."""
    from raugment.core.artifacts import read_split

    dataset_dir = runs[0][S.ARTIFACTS]["dataset"]
    cols = [S.ID, S.LABEL, S.CLASS_NAME]
    original = read_split(Artifact.open(root / dataset_dir), "train", columns=cols)
    names = dict(zip(original.column(S.LABEL).to_pylist(), original.column(S.CLASS_NAME).to_pylist()))
    labels = sorted(names)[: cfg.grid_classes]
    columns: dict[str, tuple[str, Any]] = {ORIGINAL: (dataset_dir, original)}
    for method in sorted({r[S.METHOD] for r in runs} - {BASELINE}):
        added = _added_artifact(runs, method)
        if added:
            columns[method] = (added, Artifact.open(root / added).read("images", columns=cols))
    grid: dict[str, Any] = {"classes": [{"label": k, "name": names[k]} for k in labels], "columns": {}}
    for col, (artifact_dir, table) in columns.items():
        ids_by_label: dict[int, list[str]] = defaultdict(list)
        for i, label in zip(table.column(S.ID).to_pylist(), table.column(S.LABEL).to_pylist()):
            ids_by_label[label].append(i)
        grid["columns"][col] = {"artifact": artifact_dir,
                                "ids": {str(k): sorted(ids_by_label.get(k, []))[: cfg.samples_per_cell]
                                        for k in labels}}
    return grid


def _stage_stats(root: Path, rel: str | None) -> dict[str, Any]:
    if not rel:
        return {}
    stats = _read_json(root / rel / "stats.json")
    out = {"counts": stats.get("counts", {}), "failures": stats.get("failures", {})}
    if isinstance(stats.get("shortfall"), dict):  # retrieval: classes that missed their quota
        out["shortfall"] = stats["shortfall"]
    if stats.get("precision_at_n") is not None:  # retrieval: share of selected images of the class
        out["precision_at_n"] = stats["precision_at_n"]
    return out


def _drops(runs: list[dict], root: Path) -> dict[str, Any]:
    """Per method: counts and failure reasons of its source, filter and dedup stages."""
    out: dict[str, Any] = {}
    for method in sorted({r[S.METHOD] for r in runs} - {BASELINE}):
        arts = next(r[S.ARTIFACTS] for r in runs if r[S.METHOD] == method)
        stages = {}
        for role in ("source", "filter", "dedup"):
            if arts.get(role):
                stage = Path(arts[role]).parts[0]
                stages[stage if role == "source" else role] = _stage_stats(root, arts[role])
        out[method] = stages
    return out


def _shortfalls(runs: list[dict], root: Path) -> dict[str, Any]:
    """What the shortfall policy did (``study.shortfall``), from the assemble runs' ``shortfalls``
    tables: the classes left out of every comparison (``excluded``: name -> the pools that could
    not fill it) and one row per (class, method, ratio, action)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        rel = r[S.ARTIFACTS].get("assemble")
        art = Artifact.open(root / rel) if rel and (root / rel).is_dir() else None
        if art is None or not art.has("shortfalls"):
            continue
        for row in art.read("shortfalls").to_pylist():
            key = (row[S.LABEL], row[S.METHOD], row[S.RATIO], row[S.ACTION])
            rows.setdefault(key, {k: row[k] for k in (S.LABEL, S.CLASS_NAME, S.METHOD, S.RATIO, S.NEED,
                                                       S.AVAILABLE, S.ACTION)})
    table = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] or "", k[2] or 0.0, k[3] or ""))]
    excluded: dict[str, list[str]] = {}
    for row in table:
        if row[S.ACTION] == "excluded":
            name = row[S.CLASS_NAME] or str(row[S.LABEL])
            excluded.setdefault(name, []).append(
                f"{row[S.METHOD]}: {row[S.AVAILABLE]} of {row[S.NEED]} images at {row[S.RATIO]:g} %")
    return {"excluded": excluded, "rows": table}


def _audit(runs: list[dict], root: Path) -> dict[str, Any]:
    """Per method: the audit's ``summary.json`` and where its gallery is."""
    out: dict[str, Any] = {}
    for method in sorted({r[S.METHOD] for r in runs} - {BASELINE}):
        arts = next(r[S.ARTIFACTS] for r in runs if r[S.METHOD] == method)
        if arts.get("audit"):
            audit_dir = root / arts["audit"]
            out[method] = {"artifact": arts["audit"], "summary": _read_json(audit_dir / AUDIT_SUMMARY),
                           "gallery": (audit_dir / GALLERY).exists()}
    return out


def _checkpoints(runs: list[dict], root: Path) -> dict[str, Any]:
    """Per fine-tuned method: the checkpoint its generation used, and why (the ``select``
    artifact's candidates and scores, or the fine-tuning artifact's own choice when selection
    was off)."""
    from raugment.lib.finetuned.artifact import BEST_VAL, SELECTED, read_pointer, read_tags

    out: dict[str, Any] = {}
    for method in sorted({r[S.METHOD] for r in runs} - {BASELINE}):
        arts = next(r[S.ARTIFACTS] for r in runs if r[S.METHOD] == method)
        if not arts.get("finetune"):
            continue
        pointer = read_pointer(root / arts["select"]) if arts.get("select") else None
        if pointer is not None:
            candidates = pointer.get("candidates", [])
            why = "scored" if candidates else "pinned"  # pinned: select.checkpoint, no scoring
            out[method] = {"selection": why, "checkpoint": pointer["checkpoint"], "epoch": pointer["epoch"],
                           "candidates": candidates, "not_kept": pointer.get("not_kept", []),
                           "rule": pointer.get("rule", "pinned by select.checkpoint"), "finetune": arts["finetune"]}
            continue
        own = _read_json(root / arts["finetune"] / SELECTED)
        name = own.get("checkpoint", BEST_VAL)
        out[method] = {"selection": "off", "checkpoint": name,
                       "epoch": read_tags(root / arts["finetune"]).get(name), "candidates": [], "not_kept": [],
                       "rule": f"selection off: {name}", "finetune": arts["finetune"]}
    return out


def _recognisability(runs: list[dict], root: Path) -> dict[str, Any]:
    """Per generating method: top-1 of the real-data (baseline, first set) classifier on the
    method's generated images, before filtering; chance = 1 / number of classes.

    It answers "does the generator draw the class it was asked for?" apart from whether the images
    help training. Empty without a baseline run or a generating method.
    """
    import numpy as np

    from raugment.core.artifacts import MODEL_DIR
    from raugment.core.imageio import decode_image
    from raugment.lib.loader import build_transform
    from raugment.models.classifier import load_classifier, read_bundle_config

    base = [r for r in runs if r[S.METHOD] == BASELINE]
    if not base:
        return {}
    model_dir = root / base[0][S.ARTIFACTS]["train"] / MODEL_DIR
    if not (model_dir / "config.json").exists():
        return {}
    out: dict[str, Any] = {}
    model = None
    for method in sorted({r[S.METHOD] for r in runs} - {BASELINE}):
        source = next(r[S.ARTIFACTS].get("source") for r in runs if r[S.METHOD] == method)
        if not source or Path(source).parts[0] != "generate":
            continue
        import torch

        if model is None:
            meta = read_bundle_config(model_dir)
            model = load_classifier(model_dir)
            transform = build_transform(int(meta.get("image_size", 32)), train=False)
            num_classes = int(meta["num_classes"])
        table = Artifact.open(root / source).read("images", columns=[S.LABEL, S.IMAGE])
        labels = np.array(table.column(S.LABEL).to_pylist())
        if not len(labels):
            continue
        with torch.no_grad():
            x = torch.stack([transform(decode_image(b)) for b in table.column(S.IMAGE).to_pylist()])
            pred = model(x).argmax(1).numpy()
        out[method] = {"images": len(labels), "top1": float(np.mean(pred == labels)),
                       "chance": 1.0 / num_classes, "classifier": str(model_dir.relative_to(root))}
    return out


def _mini_models(path: str | None) -> dict[str, Any]:
    """``mini_models.json`` of a ``raugment models train-mini`` artifact (``report.mini_models``)."""
    if not path:
        return {}
    info = _read_json(Path(path) / MINI_MODELS_INFO)
    return {"path": str(path), "clip": info.get("clip", {}), "diffusion": info.get("diffusion", {}),
            "pool_rows": info.get("pool", {}).get("rows"),
            "near_duplicates": len(info.get("pool", {}).get("extra_ids", []))}


def _costs(plan: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Measured wall/CPU/GPU hours per (dataset, method, stage), each stage run counted once."""
    rows: dict[tuple, dict[str, Any]] = {}
    seen: set[str] = set()
    for node in plan.get("nodes", []):
        # two nodes can meet in one artifact at run time (checkpoint names sharing a snapshot)
        if not node.get("path") or node["path"] in seen:
            continue
        seen.add(node["path"])
        stats = _read_json(root / node["path"] / "stats.json")
        labels = node.get("labels", {})
        key = (labels.get("dataset", ""), labels.get("method") or "(shared)", node["stage"])
        row = rows.setdefault(key, {"dataset": key[0], "method": key[1], "stage": key[2], "runs": 0,
                                    "wall_h": 0.0, "cpu_h": 0.0, "gpu_h": 0.0})
        row["runs"] += 1
        for src, dst in (("wall_s", "wall_h"), ("cpu_s", "cpu_h"), ("gpu_s", "gpu_h")):
            row[dst] += float(stats.get(src, 0.0)) / 3600
    return sorted(rows.values(), key=lambda r: (r["dataset"], r["method"], r["stage"]))


# The paper's cost comparison (Burg et al. 2023, "Compute requirements", 10 % ImageNet): retrieval
# took 28.5 h on one CPU machine (no GPU) for 130 images x 990 classes; generating 390 images for
# each of the 1000 classes took 867 T4 GPU-h; fine-tuning took, in V100 GPU-h, the figures below
# (before the same generation). "30x faster than the prompt-based methods, 56x faster than
# PSEUDOWORD+DM" compares these totals in hours.
PAPER_RETRIEVAL_H, PAPER_RETRIEVED = 28.5, 130 * 990
PAPER_GENERATION_GPU_H, PAPER_GENERATED = 867.0, 390 * 1000
PAPER_FINETUNE_GPU_H = {"ft_cluster_conditioning": 244.0, "ft_conditioning": 380.0,
                        "textual_inversion": 368.0, "imagic": 552.0, "pseudoword_dm": 720.0}
# the stages every method's classifiers share at a ratio: not part of making the added images
NOT_POOL_STAGES = {"dataset", "assemble", "train", "report"}
POOL_OUTPUT_STAGES = ("dedup", "filter", "retrieve", "generate")  # the pool: the last of these


def paper_cost(method: str) -> dict[str, Any] | None:
    """The paper's cost of a study method per 1000 added images (None for the baseline).

    A method (or a variant whose name contains a paper method's, longest first) is matched to the
    paper's retrieval, its fine-tuning methods (their GPU-h + the generation), or else to
    prompt-based generation (Boomerang included: the paper gives one generation figure)."""
    if method == BASELINE:
        return None
    if "retriev" in method:
        return {"what": "retrieval: 28.5 h on one CPU machine",
                "cpu_h_per_1000": PAPER_RETRIEVAL_H / PAPER_RETRIEVED * 1000, "gpu_h_per_1000": 0.0,
                "x_retrieval": 1.0}
    ft = next((m for m in sorted(PAPER_FINETUNE_GPU_H, key=len, reverse=True) if m in method), None)
    gpu_h = PAPER_GENERATION_GPU_H + (PAPER_FINETUNE_GPU_H[ft] if ft else 0.0)
    what = (f"fine-tuning {PAPER_FINETUNE_GPU_H[ft]:g} V100 GPU-h + " if ft else "") + "generation 867 T4 GPU-h"
    return {"what": what, "cpu_h_per_1000": 0.0, "gpu_h_per_1000": gpu_h / PAPER_GENERATED * 1000,
            "x_retrieval": gpu_h / PAPER_RETRIEVAL_H}


def _rows_of(path: Path, table: str = "images") -> int | None:
    import pyarrow.parquet as pq

    parts = sorted((path / table).glob("part-*.parquet"))
    if not parts and (path / f"{table}.parquet").exists():
        parts = [path / f"{table}.parquet"]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parts) if parts else None


def _cost_per_image(plan: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Per (dataset, method): the measured cost of making its pool of added images (every stage of
    the method but assemble and train, each run once) per 1000 images in the pool (the rows of its
    last filter / dedup output), beside the paper's figures (:func:`paper_cost`)."""
    rows: dict[tuple, dict[str, Any]] = {}
    seen: set[str] = set()
    pool_node: dict[tuple, str] = {}
    for node in plan.get("nodes", []):
        labels = node.get("labels", {})
        method = labels.get("method")
        if not method or method == BASELINE or node["stage"] in NOT_POOL_STAGES or not node.get("path"):
            continue
        key = (labels.get("dataset", ""), method)
        if node["stage"] in POOL_OUTPUT_STAGES and "checkpoint" not in labels:
            best = pool_node.get(key)
            rank = POOL_OUTPUT_STAGES.index(node["stage"])
            if best is None or rank <= POOL_OUTPUT_STAGES.index(best.split("|")[0]):
                pool_node[key] = f"{node['stage']}|{node['path']}"
        if node["path"] in seen:
            continue
        seen.add(node["path"])
        stats = _read_json(root / node["path"] / "stats.json")
        row = rows.setdefault(key, {"dataset": key[0], "method": method, "stages": set(), "wall_h": 0.0,
                                    "cpu_h": 0.0, "gpu_h": 0.0, "remote_cpu_h": 0.0})
        row["stages"].add(node["stage"])
        row["wall_h"] += float(stats.get("wall_s", 0.0)) / 3600
        row["cpu_h"] += float(stats.get("cpu_s", 0.0)) / 3600
        row["gpu_h"] += float(stats.get("gpu_s", 0.0)) / 3600
        row["remote_cpu_h"] += sum(float(u.get("cpu_s", 0.0)) for where, u in stats.get("usage", {}).items()
                                   if where != "driver") / 3600
    out = []
    for key, row in sorted(rows.items()):
        added = _rows_of(root / pool_node[key].split("|", 1)[1]) if key in pool_node else None
        row["stages"] = sorted(row["stages"])
        row["added_images"] = added
        for what in ("wall_h", "cpu_h", "gpu_h", "remote_cpu_h"):
            row[f"{what}_per_1000"] = row[what] / added * 1000 if added else None
        row["paper"] = paper_cost(row["method"])
        out.append(row)
    return out


def collect(root: str | Path, study: Artifact, cfg: ReportConfig) -> dict[str, Any]:
    """Every number, id and link of the report, as plain data."""
    root = Path(root).resolve()
    runs = _read_runs(study)
    if not runs:
        raise ValueError(f"study {study.path} has no runs; run the study first")
    plan = _read_json(study.path / "plan.json")
    data: dict[str, Any] = {"title": cfg.title, "study": str(study.path.relative_to(root)),
                            "upper_bound": dict(cfg.upper_bound or {}), "datasets": {},
                            "costs": _costs(plan, root), "cost_per_image": _cost_per_image(plan, root),
                            "failed": plan.get("failed", []),
                            "mini_models": _mini_models(cfg.mini_models)}
    for ds in sorted({r[S.DATASET] for r in runs}):
        ds_runs = [r for r in runs if r[S.DATASET] == ds]
        ratios = sorted({r[S.RATIO] for r in ds_runs if r[S.METHOD] != BASELINE})
        data["datasets"][ds] = {
            "ratios": ratios,
            "methods": sorted({r[S.METHOD] for r in ds_runs} - {BASELINE}),
            "runs": [{**{k: r[k] for k in (S.METHOD, S.RATIO, S.SET_INDEX, S.SEED)},
                      "train": r[S.ARTIFACTS]["train"]} for r in ds_runs],
            "table": _table(ds_runs, root),
            "per_class": _per_class(ds_runs, root, ratios[0]) if ratios else {},
            "samples": _samples(ds_runs, root, cfg),
            "drops": _drops(ds_runs, root),
            "shortfalls": _shortfalls(ds_runs, root),
            "audit": _audit(ds_runs, root),
            "checkpoints": _checkpoints(ds_runs, root),
            "recognisability": _recognisability(ds_runs, root),
        }
    return data


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_improvement(per_class: dict[str, Any], bins: int, path: Path) -> Path:
    """Figure 5A: histogram of per-class top-1 change (percentage points) per method."""
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    values = {m: 100 * np.asarray(d["improvement"], dtype=float) for m, d in per_class.items()}
    lo = min(float(v.min()) for v in values.values())
    hi = max(float(v.max()) for v in values.values())
    if hi - lo < 1e-6:  # all classes changed alike: give the single bar a visible width
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)  # shared edges so the methods' bars line up
    for method, v in values.items():
        ax.hist(v, bins=edges, alpha=0.55, label=method)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("per-class top-1 change vs. baseline (points)")
    ax.set_ylabel("classes")
    ratio = next(iter(per_class.values()))["ratio"]
    ax.set_title(f"Per-class improvement at {ratio:g} % augmentation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scaling(table: dict[str, Any], path: Path) -> Path:
    """Figure 5B: test top-1 (mean ± s.e.) against the augmentation ratio per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for method, cells in sorted(table.items()):
        if method == BASELINE:
            continue
        pts = sorted((float(r), c[S.TEST_TOP1]) for r, c in cells.items() if S.TEST_TOP1 in c)
        ax.errorbar([p[0] for p in pts], [100 * p[1]["mean"] for p in pts],
                    yerr=[100 * (p[1]["se"] or 0) for p in pts], marker="o", capsize=3, label=method)
    base = table.get(BASELINE, {})
    for cell in base.values():
        if S.TEST_TOP1 in cell:
            m, se = 100 * cell[S.TEST_TOP1]["mean"], 100 * (cell[S.TEST_TOP1]["se"] or 0)
            ax.axhline(m, color="k", ls="--", lw=1, label="baseline")
            ax.axhspan(m - se, m + se, color="k", alpha=0.08)
    ax.set_xscale("log")
    ratios = sorted({float(r) for m, cells in table.items() if m != BASELINE for r in cells})
    if ratios:
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.minorticks_off()
    ax.set_xlabel("augmentation ratio (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Accuracy vs. augmentation ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render_grid(samples: dict[str, Any], root: Path, thumb: int, path: Path) -> Path:
    """Sample grid: one row per class, one block of thumbnails per column (original, methods)."""
    from PIL import Image, ImageDraw

    from raugment.core.imageio import decode_image

    cols = list(samples["columns"])
    per_cell = max((len(ids) for c in samples["columns"].values() for ids in c["ids"].values()), default=1)
    per_cell = max(per_cell, 1)
    label_w, head_h, pad = 150, 18, 6
    width = label_w + len(cols) * (per_cell * thumb + pad)
    height = head_h + len(samples["classes"]) * (thumb + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, col in enumerate(cols):
        draw.text((label_w + j * (per_cell * thumb + pad), 3), col[:28], fill="black")
    for col_i, col in enumerate(cols):
        info = samples["columns"][col]
        images = _read_images(Artifact.open(root / info["artifact"]),
                              sorted({i for ids in info["ids"].values() for i in ids}))
        for row, cls in enumerate(samples["classes"]):
            y = head_h + row * (thumb + pad)
            if col_i == 0:
                draw.text((3, y + thumb // 2 - 6), str(cls["name"])[:24], fill="black")
            for k, item in enumerate(info["ids"].get(str(cls["label"]), [])):
                if images.get(item) is None:
                    continue
                img = decode_image(images[item]).resize((thumb, thumb))
                canvas.paste(img, (label_w + col_i * (per_cell * thumb + pad) + k * thumb, y))
    canvas.save(path)
    return path


def _read_images(artifact: Artifact, ids: list[str]) -> dict[str, bytes]:
    """Encoded bytes of ``ids`` only: the filter runs while reading, shard by shard, so a large
    dataset's other images are never materialised."""
    import pyarrow.parquet as pq

    out: dict[str, bytes] = {}
    for f in artifact.files("images"):
        t = pq.read_table(f, columns=[S.ID, S.IMAGE], filters=[(S.ID, "in", ids)])
        out.update(zip(t.column(S.ID).to_pylist(), t.column(S.IMAGE).to_pylist()))
    return out


# ----------------------------------------------------------------------------------------------
# Rendering HTML and Markdown
# ----------------------------------------------------------------------------------------------


def _accuracy_rows(ds: dict[str, Any], upper: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [f"{r:g} %" for r in ds["ratios"]]
    rows = []
    table = ds["table"]
    if BASELINE in table:
        cell = next(iter(table[BASELINE].values())).get(S.TEST_TOP1)
        text = f"{cell['text']} (n={cell['n']})" if cell else "-"
        rows.append(["baseline (original data)"] + [text] * len(ds["ratios"]))
    for label, acc in upper.items():
        rows.append([f"upper bound: {label}"] + [f"{acc:.1f}"] * len(ds["ratios"]))
    for method in ds["methods"]:
        cells = table.get(method, {})
        row = [method]
        for r in ds["ratios"]:
            c = cells.get(_ratio_key(r), {}).get(S.TEST_TOP1)
            row.append(f"{c['text']} (n={c['n']})" if c else "-")
        rows.append(row)
    return header, rows


def _counts_text(stats: dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("counts", {}).items())) or "-"
    fails = stats.get("failures", {})
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(fails.items(), key=lambda kv: (-kv[1], kv[0])))
    text = f"{counts}; dropped/failed: {reasons}" if reasons else f"{counts}; nothing dropped"
    short = stats.get("shortfall") or {}
    if short:
        text += f"; {len(short)} classes short of quota by {sum(short.values())} images"
    if stats.get("precision_at_n") is not None:
        text += f"; precision@n {stats['precision_at_n']:.3f}"
    return text


def _scalar_items(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in sorted(d.items())
            if isinstance(v, (int, float, str, bool))]


class _Doc:
    """Builds the HTML and the Markdown side by side from the same calls."""

    def __init__(self, title: str):
        self.html = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                     "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                     "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;"
                     "padding:3px 8px;text-align:left}th{background:#eee}img{max-width:100%}"
                     ".note{color:#555}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
        self.md = [f"# {title}", ""]

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md += ["#" * level + " " + text, ""]

    def para(self, text: str) -> None:
        self.html.append(f"<p class='note'>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            self.html.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
        self.html.append("</table>")
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for row in rows:
            self.md.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
        self.md.append("")

    def image(self, rel: str, alt: str) -> None:
        self.html.append(f"<p><img src='{html.escape(rel)}' alt='{html.escape(alt)}'></p>")
        self.md += [f"![{alt}]({rel})", ""]

    def link(self, rel: str, text: str) -> None:
        self.html.append(f"<p><a href='{html.escape(rel)}'>{html.escape(text)}</a></p>")
        self.md += [f"[{text}]({rel})", ""]

    def finish(self) -> tuple[str, str]:
        return "\n".join([*self.html, "</body></html>"]), "\n".join(self.md) + "\n"


def _copy_gallery(root: Path, audit_rel: str, out: Path, name: str) -> str:
    """Copy an audit's gallery (``gallery.html`` and its thumbnail folder) into ``out``."""
    src = root / audit_rel
    dst = out / "audit" / name
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / GALLERY, dst / GALLERY)
    if (src / GALLERY_DIR).is_dir():
        shutil.copytree(src / GALLERY_DIR, dst / GALLERY_DIR, dirs_exist_ok=True)
    return f"audit/{name}/{GALLERY}"


def _dataset_sections(doc: _Doc, ds: dict[str, Any], slug: str, ctx: dict[str, Any]) -> None:
    """Every per-dataset section, in the order of the paper's figures."""
    cfg, figs, root, out = ctx["cfg"], ctx["figs"], ctx["root"], ctx["out"]
    doc.heading("Accuracy (Table 1)", 3)
    doc.table(*_accuracy_rows(ds, ctx["upper_bound"]))
    left_out = ds.get("shortfalls", {}).get("excluded", {})
    if left_out:
        doc.para(f"Every classifier above (the baseline's too) leaves out {len(left_out)} class(es) that a "
                 f"method could not fill: {', '.join(left_out)} (see \"Classes that could not be filled\").")

    doc.heading("Are generated images recognisable?", 3)
    if ds.get("recognisability"):
        doc.para("Top-1 of the classifier trained on real images only (the baseline, first set) on each "
                 "generating method's images, before filtering. Chance is 1 / number of classes.")
        doc.table(["method", "generated images", "top-1 (%)", "chance (%)"],
                  [[m, d["images"], f"{100 * d['top1']:.1f}", f"{100 * d['chance']:.1f}"]
                   for m, d in ds["recognisability"].items()])
    else:
        doc.para("No baseline classifier or no generating method: not measured.")

    doc.heading("Per-class improvement (Figure 5A)", 3)
    if ds["per_class"]:
        png = plot_improvement(ds["per_class"], cfg.histogram_bins, figs / f"improvement_{slug}.png")
        doc.image(f"figures/{png.name}", "per-class improvement histogram")
        doc.table(["method", "ratio", "classes improved", "classes worse", "mean change (points)",
                   "most improved", "most worsened"],
                  [[m, f"{d['ratio']:g} %", d["classes_improved"], d["classes_worse"],
                    f"{100 * d['mean']:+.2f}", ", ".join(d["best"]), ", ".join(d["worst"])]
                   for m, d in ds["per_class"].items()])
    else:
        doc.para("No baseline or no augmented runs: nothing to compare per class.")

    doc.heading("Accuracy vs. augmentation ratio (Figure 5B)", 3)
    png = plot_scaling(ds["table"], figs / f"scaling_{slug}.png")
    doc.image(f"figures/{png.name}", "accuracy vs augmentation ratio")

    doc.heading("Sample images (class x method)", 3)
    png = render_grid(ds["samples"], root, cfg.thumb_size, figs / f"samples_{slug}.png")
    doc.image(f"figures/{png.name}", "sample grid")

    doc.heading("Retrieval success and filter drops", 3)
    rows = [[m, stage, _counts_text(st)] for m, stages in ds["drops"].items() for stage, st in stages.items()]
    doc.table(["method", "stage", "counts; dropped or failed by reason"], rows or [["-", "-", "-"]])

    _shortfall_section(doc, ds.get("shortfalls", {}))

    doc.heading("Leakage audit", 3)
    if not ds["audit"]:
        doc.para("No audit in this study.")
    for m, a in ds["audit"].items():
        doc.table([f"{m}: audit", "value"], [list(kv) for kv in _scalar_items(a["summary"])] or [["-", "-"]])
        if a["gallery"]:
            doc.link(_copy_gallery(root, a["artifact"], out, f"{slug}_{m}"),
                     f"{m}: gallery of leakage candidates (for a person to judge)")

    _checkpoint_section(doc, ds.get("checkpoints", {}))


def _shortfall_section(doc: _Doc, shortfalls: dict[str, Any]) -> None:
    """Classes that a method's final pool could not fill, and what ``study.shortfall`` did."""
    doc.heading("Classes that could not be filled (study.shortfall)", 3)
    if not shortfalls.get("rows"):
        doc.para("Every method's pool filled every class: no class was left out or short.")
        return
    excluded = shortfalls.get("excluded", {})
    if excluded:
        doc.para(f"{len(excluded)} class(es) left out of every classifier of this dataset, the baseline's "
                 "included (as the paper left out the classes retrieval could not fill): "
                 + "; ".join(f"{name} ({', '.join(why)})" for name, why in excluded.items()) + ".")
    doc.table(["class", "method", "ratio", "needed", "available", "action"],
              [[r[S.CLASS_NAME] or r[S.LABEL], r[S.METHOD], f"{r[S.RATIO]:g} %", r[S.NEED], r[S.AVAILABLE],
                r[S.ACTION]] for r in shortfalls["rows"]])


def _checkpoint_section(doc: _Doc, checkpoints: dict[str, Any]) -> None:
    """Which fine-tuning checkpoint each fine-tuned method generated from, and why."""
    if not checkpoints:
        return
    doc.heading("Checkpoint selection (fine-tuned methods)", 3)
    doc.para("Each candidate checkpoint generated a small set; a classifier trained on the original "
             "data plus that set was scored on the validation split. The chosen checkpoint (marked) "
             "generated the method's images; candidates sharing a snapshot were scored once.")
    rows = []
    for method, c in checkpoints.items():
        if c["selection"] != "scored":
            epoch = "-" if c["epoch"] is None else c["epoch"]
            rows.append([method, c["checkpoint"], epoch, "-", f"used ({c['rule']})"])
            continue
        for cand in c["candidates"]:
            rows.append([method, cand["name"], cand["epoch"], f"{100 * cand['val_top1']:.2f}",
                         "chosen" if cand["chosen"] else ""])
        rows += [[method, name, "-", "-", "not kept by the fine-tuning run"] for name in c["not_kept"]]
    doc.table(["method", "checkpoint", "epoch", "val top-1 of its scoring classifier (%)", "used"], rows)


def _mini_models_section(doc: _Doc, mini: dict[str, Any]) -> None:
    doc.heading("The mini-world's small models")
    clip, held = mini["clip"], mini["clip"].get("heldout", {})
    rows = [["CLIP precision@n (held-out pool, query \"A photo of {w(name)}.\")",
             f"{held.get('precision_at_n', float('nan')):.3f} (n = {held.get('n')})"],
            ["CLIP training", f"{clip.get('steps')} steps, {clip.get('train_cpu_s')} s CPU"],
            ["pool images (near-duplicates of test images)", f"{mini['pool_rows']} ({mini['near_duplicates']})"]]
    if mini.get("diffusion"):
        d = mini["diffusion"]
        rows.append(["diffusion model training", f"{d.get('steps')} steps, {d.get('train_cpu_s')} s CPU"])
    doc.table(["", "value"], rows)
    if held.get("per_class"):
        doc.table(["class", "CLIP precision@n"], [[k, f"{v:.2f}"] for k, v in held["per_class"].items()])


def _cost_sections(doc: _Doc, costs: list[dict[str, Any]]) -> None:
    doc.heading("Measured cost per method and stage")
    doc.table(["dataset", "method", "stage", "runs", "wall h", "CPU h", "GPU h"],
              [[c["dataset"], c["method"], c["stage"], c["runs"], f"{c['wall_h']:.3g}",
                f"{c['cpu_h']:.3g}", f"{c['gpu_h']:.3g}"] for c in costs])
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for c in costs:
        t = totals[c["method"]]
        t[0] += c["wall_h"]
        t[1] += c["cpu_h"]
        t[2] += c["gpu_h"]
    doc.table(["method (all stages)", "wall h", "CPU h", "GPU h"],
              [[m, f"{t[0]:.3g}", f"{t[1]:.3g}", f"{t[2]:.3g}"] for m, t in sorted(totals.items())])


def _per_image_section(doc: _Doc, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    doc.heading("Cost per 1000 added images: measured and the paper's")
    doc.para("Measured: every stage that makes a method's pool (not assemble or train), each run once, "
             "CPU and GPU seconds of the driver and of every Ray actor and DDP rank (stats.json "
             "usage), over the images in the pool after filtering and dedup. Paper: Burg et al. "
             "2023's compute figures for 10 % ImageNet (retrieval: hours of one CPU machine; "
             "generation: T4 GPU-h; fine-tuning: V100 GPU-h); x retrieval compares total hours as "
             "the paper does (30x for prompt-based generation, 56x for PSEUDOWORD+DM).")

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    table = []
    for r in rows:
        p = r["paper"] or {}
        table.append([r["dataset"], r["method"], f(r["added_images"]), f(r["cpu_h_per_1000"]),
                      f(r["gpu_h_per_1000"]), f(r["wall_h_per_1000"]), f(r["remote_cpu_h_per_1000"]),
                      f(p.get("cpu_h_per_1000")), f(p.get("gpu_h_per_1000")),
                      f"{p['x_retrieval']:.3g}x" if p else "-", p.get("what", "")])
    doc.table(["dataset", "method", "added images", "CPU-h", "GPU-h", "wall h", "of the CPU-h: actors, ranks, tasks",
               "paper CPU-h", "paper GPU-h", "paper x retrieval", "paper's figure"], table)


def render(data: dict[str, Any], root: str | Path, out: str | Path, cfg: ReportConfig) -> Path:
    """Write ``report.html``, ``report.md``, ``report.json`` and ``figures/`` into ``out``."""
    root, out = Path(root), Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    ctx = {"cfg": cfg, "figs": figs, "root": root, "out": out, "upper_bound": data["upper_bound"]}
    doc = _Doc(data["title"])
    doc.para(f"Study index: {data['study']}. Accuracies are test top-1 in percent, mean ± standard "
             "error over resampled sets (n = number of classifiers).")
    if data.get("mini_models"):
        _mini_models_section(doc, data["mini_models"])
    for ds_name, ds in data["datasets"].items():
        doc.heading(f"Dataset: {ds_name}")
        _dataset_sections(doc, ds, "".join(ch if ch.isalnum() else "_" for ch in ds_name), ctx)
    if data["failed"]:
        doc.heading("Failed or left-out stage runs")
        doc.para("Their classifiers are missing from the tables above; re-running the study retries them.")
        doc.table(["stage", "what", "reason"],
                  [[f["stage"], ", ".join(f"{k}={v}" for k, v in sorted(f["labels"].items())), f["reason"][:300]]
                   for f in data["failed"]])
    _cost_sections(doc, data["costs"])
    _per_image_section(doc, data.get("cost_per_image", []))
    page, md = doc.finish()
    write_text_atomic(page, out / "report.html")
    write_text_atomic(md, out / "report.md")
    write_text_atomic(json.dumps(data, indent=1, sort_keys=True, default=str), out / "report.json")
    return out / "report.html"


def write_report(root: str | Path, study: Artifact, cfg: ReportConfig, out: str | Path) -> Path:
    """Collect and render the report of ``study`` into ``out``; returns ``report.html``."""
    data = collect(root, study, cfg)
    return render(data, root, out, cfg)


def run(cfg: Config, study: Artifact) -> Artifact:
    """The report as a stage: ``<root>/report/<key>/`` (skipped when study and section are unchanged)."""
    def body(run_: StageRun) -> None:
        write_report(cfg.run.root, study, cfg.report, run_.path)
        run_.stats.add("datasets", len(json.loads((run_.path / "report.json").read_text())["datasets"]))

    art = run_stage(cfg.run.root, "report", cfg.report, {"study": study}, body)
    log.info("report: %s", art.path / "report.html")
    return art
