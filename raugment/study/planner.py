"""The study planner: datasets x methods x ratios x sets -> the stage runs, their sizes and costs.

A plan is a graph of :class:`Node` s, one per stage run, each with the config variant that the
stage's ``run()`` receives and the nodes it reads. A node's id is a hash of the config sections its
stage reads plus its inputs' ids (the same rule as the storage keys), so two paths through the
study that need the same artifact meet in one node: one dataset stage, one generation pool per
method sized for the largest ratio, one retrieval at the largest quota, one filter/dedup/audit
chain per method; only assemble and train vary with ratio, set and seed.

A study method is ``baseline``, ``retrieval``, a generation method (a plug-in of
``raugment/stages/generate/methods/``: planned as generation) or a fine-tuning method (a plug-in of
``raugment/stages/finetune/methods/``: fine-tuning -> checkpoint selection -> generation from it);
see :func:`method_pipeline`. A new plug-in is planned without any change here. Methods joined by
``+`` (``retrieval+simple``, ``retrieval+pseudoword_dm``) are one method mixing their added images
(:func:`plan_combined`).

Each node also carries how many images it generates / retrieves / downloads / trains on and an
estimate of its CPU- and GPU-hours from per-image costs (:data:`DEFAULT_COSTS` and the figures the
plug-ins declare, :func:`plugin_costs`, overridable by ``study.costs``; measured seconds from
``stats.json`` replace the estimate for nodes a study has already run). The index build is costed
from its size (counted from ``index.path``, else ``study.expected.index_vectors``) and faiss rates
measured by ``benchmarks/index_build.py`` (:func:`index_cost`). The printed plan
(:func:`format_plan`) gives images and hours per stage, method and ratio, and per method and
ratio (:func:`ratio_rows`: the method's pool once, then each ratio's own runs). Nothing here
imports torch or ray, and planning writes nothing.

``raugment <stage>`` plans with the same builders (:mod:`raugment.study.target`): one target
stage and what it needs, with the user's sections used as given (:attr:`PlanContext.as_given`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raugment.config import Config
from raugment.core.config import ConfigError, section_hash, to_dict, with_overrides
from raugment.core.registry import Registry

log = logging.getLogger(__name__)

# benchmarks/index_build.py, run 2026-12-06 on the 2-core dev box (shared, loadavg 8.5; CPU seconds
# of the process, so the load matters little), faiss-cpu 1.15.1 on one thread, d = 768, defaults
# (--train 20000 --add 20000 --nlist 256 1024): IVF256,Flat train 0.833 s / add 0.145 s,
# IVF1024,Flat train 3.02 s / add 0.378 s. PQ training and encoding are not in the model.
INDEX_RATE: dict[str, float] = {
    "index.cpu_s_per_vector": 3.34e-6,
    "index.cpu_s_per_vector_list": 1.52e-8,
    "index.train_cpu_s_per_vector_list": 1.55e-7,
}
# faiss trains k-means on at most this many vectors per centroid (ClusteringParameters default)
FAISS_MAX_POINTS_PER_CENTROID = 256

# Per-image costs. "gpu_s"/"cpu_s" are device-seconds on the reference hardware named beside each.
# The plug-ins declare their own figures (:func:`plugin_costs`): a generation method its
# ``cost_fraction`` (key ``generate.<method>_fraction``; Boomerang's img2img at strength 0.2 runs
# ~20 % of the denoising steps), a fine-tuning method its ``gpu_s_per_image`` (key
# ``finetune.<method>.gpu_s_per_image``; the paper's V100 GPU-hours on 10 % ImageNet).
DEFAULT_COSTS: dict[str, float] = {
    # SD v1.4, 512 px, 50 steps with guidance: published diffusers figure ~1.5 img/s on an A100.
    # The paper measured 867 T4 GPU-h for 390 x 1000 images = 8.0 s/image.
    "generate.gpu_s_per_image": 1 / 1.5,
    # Fine-tuning, whole run, per training image, for a fine-tuning method that declares no figure
    # (every method's own figure, or its study.costs override, comes first): the paper's FT
    # conditioning, 380 V100 GPU-h on 10 % ImageNet (126,861 images, <= 40 epochs).
    "finetune.gpu_s_per_image": 380 * 3600 / 126_861,
    # Downloads: img2dataset reaches ~1,000 img/s on a 16-core node -> 0.016 core-s per attempted
    # URL. (The paper's retrieval took 28.5 h wall for 10 % ImageNet.)
    "retrieve.cpu_s_per_download": 0.016,
    # One CLIP text query per class plus index search: negligible beside downloads.
    "retrieve.cpu_s_per_class": 0.5,
    # NSFW + aesthetic + CLIP scores: one ViT-L/14 image embedding (~80 GFLOP) per image.
    "filter.gpu_s_per_image": 0.004,
    # pHash of a 64 px reduced image: ~12.7k img/s on one core (measured).
    "dedup.cpu_s_per_image": 1 / 12_700,
    "audit.cpu_s_per_image": 1 / 12_700,
    # Reading, decoding, resizing and re-encoding a dataset image.
    "dataset.cpu_s_per_image": 0.01,
    # ResNet-50 at 224 px: NVIDIA's reference ~2,500 img/s on one A100 with AMP + DALI; decoding is
    # usually the wall without DALI, so budget half of that.
    "train.gpu_s_per_image_epoch": 1 / 1_250,
    # Early stopping ends most runs before max_epochs: the paper's 128-160 T4 GPU-h per 10 %
    # ImageNet classifier at ~95 img/s on a T4 is ~190 of its 270 epochs.
    "train.epochs_fraction": 0.7,
    "train.cpu_s_per_image_epoch": 0.004,  # CPU decode/augment when training on GPU
    # Index build (faiss train + add, core-seconds, d = 768), measured by benchmarks/index_build.py
    # (:data:`INDEX_RATE`; the model: :func:`index_cost`): per added vector, per added vector and
    # coarse list, per k-means training vector and list.
    "index.cpu_s_per_vector": INDEX_RATE["index.cpu_s_per_vector"],
    "index.cpu_s_per_vector_list": INDEX_RATE["index.cpu_s_per_vector_list"],
    "index.train_cpu_s_per_vector_list": INDEX_RATE["index.train_cpu_s_per_vector_list"],
    # CLIP ViT-L/14 image embedding of an image pool (index.source=images): as the filter's.
    "index.gpu_s_per_image": 0.004,
}


def plugin_costs() -> dict[str, float]:
    """The cost figures the generation and fine-tuning plug-ins declare, by ``study.costs`` key."""
    from raugment.stages.finetune.methods import FINETUNERS
    from raugment.stages.generate.methods import GENERATORS

    out = {f"generate.{name}_fraction": float(GENERATORS.get(name).cost_fraction) for name in GENERATORS}
    for name in FINETUNERS:
        figure = FINETUNERS.get(name).gpu_s_per_image
        if figure is not None:
            out[f"finetune.{name}.gpu_s_per_image"] = float(figure)
    return out


# Which config sections each stage reads: they (and the inputs) make a node's identity.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "dataset": ("dataset",),
    "index": ("index",),
    "retrieve": ("retrieve",),
    "finetune": ("finetune",),
    "generate": ("generate",),
    "filter": ("filter",),
    "dedup": ("dedup",),
    "audit": ("audit",),
    "assemble": ("assemble",),
    "train": ("train",),
    "select": ("select",),
}

BASELINE = "baseline"
RETRIEVAL = "retrieval"
COMBINE = "+"  # "retrieval+simple": one study method mixing the added images of several
ADDED = "added"  # the role of what assemble reads; "added.<part>" for each part of a combined method
CENSUS_INPUTS = ("census", "census_audit")


def method_pipeline(base: str) -> str | None:
    """The pipeline of a study method: ``baseline``, ``retrieval``, ``generate`` (a registered
    generation method) or ``finetune`` (a registered fine-tuning method); None for an unknown name."""
    from raugment.stages.finetune.methods import FINETUNERS
    from raugment.stages.generate.methods import GENERATORS

    if base in (BASELINE, RETRIEVAL):
        return base
    if COMBINE in base:  # its parts are resolved (and checked) when it is planned: plan_combined
        return "combined"
    if base in GENERATORS:
        return "generate"
    if base in FINETUNERS:
        return "finetune"
    return None


def known_methods() -> list[str]:
    """Every name a study method may have (besides the baseline and combinations such as
    ``retrieval+simple``), sorted."""
    from raugment.stages.finetune.methods import FINETUNERS
    from raugment.stages.generate.methods import GENERATORS

    return sorted({RETRIEVAL, *GENERATORS.names(), *FINETUNERS.names()})


def unknown_method(where: str, base: str) -> ConfigError:
    """The error for a study method ``base`` (at config key ``where``) that no registry knows."""
    return ConfigError(f"{where}: unknown method {base!r}; known: {', '.join(known_methods())} "
                       "(or a name of study.variants, or several joined by '+', e.g. retrieval+simple)")


InputRef = str | list[str] | dict[str, str] | None


@dataclass
class Node:
    """One stage run of a study.

    Attributes:
        id: plan identity (hash of the stage's config sections and its inputs' ids).
        stage: stage name (module ``raugment.<stage>``).
        cfg: the config variant the stage's ``run()`` receives.
        inputs: argument name -> node id, list of ids or name -> id mapping (None: not given).
        labels: what the node is for (dataset, method, ratio, set_index, seed).
        images: planned counts: generate / retrieve / download / process / train.
        cpu_h, gpu_h: estimated (or measured) device-hours.
        cost: "estimate" or "measured".
        path: the finished artifact directory, when the study has run this node.
        given: a finished artifact directory the user gave instead of this stage run (a pin of a
            one-target study, :mod:`raugment.study.target`): opened, never run or checked.
    """

    id: str
    stage: str
    cfg: Config
    inputs: dict[str, InputRef] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    cpu_h: float = 0.0
    gpu_h: float = 0.0
    cost: str = "estimate"
    path: str | None = None
    given: str | None = None

    def input_ids(self) -> list[str]:
        """Ids of every node this one reads."""
        out: list[str] = []
        for ref in self.inputs.values():
            if isinstance(ref, str):
                out.append(ref)
            elif isinstance(ref, list):
                out.extend(ref)
            elif isinstance(ref, dict):
                out.extend(ref.values())
        return out


@dataclass
class RunSpec:
    """One classifier of the study: (dataset, method, ratio, set, seed) and the nodes behind it."""

    dataset: str
    method: str
    ratio: float
    set_index: int
    seed: int
    train: str
    assemble: str
    artifacts: dict[str, str] = field(default_factory=dict)  # role -> node id


@dataclass
class Plan:
    """Nodes in run order (every node after its inputs) and the classifiers they lead to."""

    nodes: dict[str, Node] = field(default_factory=dict)
    runs: list[RunSpec] = field(default_factory=list)
    node_gpus: int = 8
    node_cpus: int = 64

    def add(self, node: Node) -> str:
        """Add ``node`` unless a node with its id exists (the sharing); return the id."""
        self.nodes.setdefault(node.id, node)
        return node.id

    def by_stage(self, stage: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.stage == stage]

    def totals(self) -> dict[str, float]:
        """Summed images and hours over all nodes, and the wall-time estimate on the node."""
        out: dict[str, float] = {"cpu_h": 0.0, "gpu_h": 0.0}
        for node in self.nodes.values():
            out["cpu_h"] += node.cpu_h
            out["gpu_h"] += node.gpu_h
            for k, v in node.images.items():
                out[f"images_{k}"] = out.get(f"images_{k}", 0) + v
        out["wall_h"] = sum(wall_hours(n.cpu_h, n.gpu_h, self.node_cpus, self.node_gpus)
                            for n in self.nodes.values())
        return out


def wall_hours(cpu_h: float, gpu_h: float, cpus: int, gpus: int) -> float:
    """Wall-clock hours of one stage run spread over all CPUs and GPUs of a node.

    Within a stage, CPU work (decoding, downloads) overlaps GPU work, so the slower side sets the
    pace; the stages of a study run one after another, so their times add up.
    """
    return max(cpu_h / max(cpus, 1), gpu_h / max(gpus, 1))


# ----------------------------------------------------------------------------------------------
# Dataset sizes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSize:
    """What the planner needs to know of a dataset's training split."""

    classes: int
    train_images: int
    max_per_class: int
    measured: bool = False

    @classmethod
    def from_counts(cls, counts: Mapping[Any, int]) -> DatasetSize:
        if not counts:
            raise ValueError("the dataset has no training images")
        return cls(len(counts), int(sum(counts.values())), int(max(counts.values())), measured=True)


def expected_size(cfg: Config) -> DatasetSize:
    """A dataset's size before it has been read: ``study.expected`` hints, else what the dataset
    source knows without reading (its ``expected_class_sizes``, e.g. the synthetic source's)."""
    from raugment.stages.dataset.sources import source_class

    hint = cfg.study.expected
    classes = train = max_per_class = 0
    pool = source_class(cfg.dataset.source).expected_class_sizes(cfg.dataset)
    if pool:
        keep = cfg.dataset.fraction if cfg.dataset.protocol == "subsample" else 1.0
        sizes = [max(1, round(n * keep)) for n in pool]
        classes, train, max_per_class = len(sizes), sum(sizes), max(sizes)
    classes = int(hint.get("classes", classes))
    train = int(hint.get("train_images", train))
    max_per_class = int(hint.get("max_per_class", max_per_class)) or (
        math.ceil(train / classes) if classes else 0)
    if not (classes and train and max_per_class):
        raise ConfigError(
            "study.expected: the planner needs classes, train_images and max_per_class for dataset "
            f"source {cfg.dataset.source!r} before the dataset stage has run; give them, e.g. "
            "--set 'study.expected={classes: 990, train_images: 126861, max_per_class: 130}'")
    return DatasetSize(classes, train, max_per_class)


# ----------------------------------------------------------------------------------------------
# Building the plan
# ----------------------------------------------------------------------------------------------


def node_id(stage: str, cfg: Config, inputs: Mapping[str, InputRef]) -> str:
    """Identity of a stage run: its config sections and its inputs' ids."""
    sections = {name: to_dict(getattr(cfg, name)) for name in STAGE_SECTIONS[stage]}
    # an assemble run's census (study.shortfall=exclude) is keyed by the classes it leaves out, at
    # run time (stages/assemble/stage.py), so a study that grows by a method keeps its node ids
    flat = {k: json.dumps(v, sort_keys=True) for k, v in inputs.items()
            if v is not None and k not in CENSUS_INPUTS}
    return f"{stage}-{section_hash({'stage': stage, 'sections': sections}, flat)}"


def dataset_configs(cfg: Config) -> dict[str, Config]:
    """name -> config of each dataset of the study (``study.datasets`` overrides applied)."""
    if not cfg.study.datasets:
        return {"default": cfg}
    out = {}
    for name, overrides in cfg.study.datasets.items():
        try:
            out[name] = with_overrides(cfg, overrides)
        except ConfigError as exc:
            raise ConfigError(f"study.datasets.{name}: {exc}") from None
    return out


def method_config(cfg: Config, method: str) -> tuple[str, str, Config]:
    """(base method, pipeline name, config variant) of a study method or variant."""
    variant = dict(cfg.study.variants.get(method, {}))
    base = variant.pop("method", method)
    pipeline = variant.pop("pipeline", None) or method_pipeline(base)
    if pipeline is None:
        raise unknown_method(f"study.variants.{method}.method" if method in cfg.study.variants else "study.methods",
                             base)
    if not isinstance(pipeline, str) or pipeline not in PIPELINES:
        raise ConfigError(f"study.variants.{method}.pipeline: unknown pipeline {pipeline!r}; known: "
                          f"{', '.join(PIPELINES.names())} (or leave it out: the method's own pipeline)")
    try:
        variant_cfg = with_overrides(cfg, variant) if variant else cfg
    except ConfigError as exc:
        raise ConfigError(f"study.variants.{method}: {exc}") from None
    return base, pipeline, variant_cfg


def _set(cfg: Config, **dotted: Any) -> Config:
    """``cfg`` with ``section__key=value`` overrides (keyword-friendly dotted keys)."""
    return with_overrides(cfg, {k.replace("__", "."): v for k, v in dotted.items()})


@dataclass
class PlanContext:
    """What a pipeline builder needs: the plan so far, the dataset node, sizes, costs."""

    plan: Plan
    dataset_name: str
    dataset_node: str
    size: DatasetSize
    costs: dict[str, float]
    max_ratio: float
    as_given: bool = False  # a one-target study: the user's sections are used as given

    def derive(self, cfg: Config, **dotted: Any) -> Config:
        """``cfg`` with settings the study derives for a stage run (quotas from the ratios and the
        dataset size, set counts), or ``cfg`` unchanged when the sections are used as given."""
        return cfg if self.as_given else _set(cfg, **dotted)


# A pipeline adds the nodes that produce a method's added images and returns role -> node id
# ("source", "filter", "dedup", "audit", "finetune", ...; "added" = what assemble reads).
Pipeline = Callable[[PlanContext, str, str, Config], dict[str, str]]
PIPELINES: Registry = Registry("study pipeline")


def _new_node(ctx: PlanContext, stage: str, cfg: Config, inputs: dict[str, InputRef],
              labels: dict[str, Any], images: dict[str, int] | None = None,
              cpu_s: float = 0.0, gpu_s: float = 0.0) -> str:
    node = Node(id=node_id(stage, cfg, inputs), stage=stage, cfg=cfg, inputs=inputs,
                labels={"dataset": ctx.dataset_name, **labels}, images=dict(images or {}),
                cpu_h=cpu_s / 3600, gpu_h=gpu_s / 3600)
    return ctx.plan.add(node)


def _postprocess(ctx: PlanContext, method: str, cfg: Config, source: str, n_images: int) -> dict[str, str]:
    """filter -> dedup -> audit after a method's source stage, as ``study`` switches say."""
    c = ctx.costs
    roles = {"source": source}
    added = source
    labels = {"method": method}
    if cfg.study.filter:
        added = roles["filter"] = _new_node(
            ctx, "filter", cfg, {"added": added}, labels, {"process": n_images},
            gpu_s=n_images * c["filter.gpu_s_per_image"])
    if cfg.study.dedup:
        added = roles["dedup"] = _new_node(
            ctx, "dedup", cfg, {"added": [added]}, labels, {"process": n_images},
            cpu_s=n_images * c["dedup.cpu_s_per_image"])
    if cfg.study.audit:
        roles["audit"] = _new_node(
            ctx, "audit", cfg, {"dataset": ctx.dataset_node, "added": [added]}, labels,
            {"process": n_images}, cpu_s=n_images * c["audit.cpu_s_per_image"])
    roles["added"] = added
    return roles


def index_nlist(index_type: str) -> int:
    """The number of coarse lists of a faiss index_factory string (``IVF65536,PQ64`` -> 65536;
    0 for an index without an inverted file: Flat, HNSW, PQ)."""
    import re

    m = re.search(r"IVF(\d+)", index_type)
    return int(m.group(1)) if m else 0


def index_cost(index_type: str, source: str, vectors: int, costs: Mapping[str, float]) -> tuple[float, float]:
    """(CPU s, GPU s) of building an index of ``vectors`` vectors: faiss k-means training on at most
    256 vectors per list, adding every vector (its distance to each coarse centroid + encoding),
    and for ``source="images"`` a CLIP image embedding per vector. The per-vector rates are
    measured by ``benchmarks/index_build.py`` (``DEFAULT_COSTS``; ``study.costs`` overrides)."""
    nlist = index_nlist(index_type)
    trained = min(vectors, FAISS_MAX_POINTS_PER_CENTROID * nlist)
    cpu_s = (trained * nlist * costs["index.train_cpu_s_per_vector_list"]
             + vectors * (costs["index.cpu_s_per_vector"] + nlist * costs["index.cpu_s_per_vector_list"]))
    gpu_s = vectors * costs["index.gpu_s_per_image"] if source == "images" else 0.0
    return cpu_s, gpu_s


def index_vectors(cfg: Config) -> int | None:
    """How many vectors the index stage will index: counted from ``index.path`` when it is there
    (LAION layout: the ``img_emb/*.npy`` headers; images: Parquet row counts or caption files), else
    the ``study.expected.index_vectors`` hint; None when neither is known."""
    hint = cfg.study.expected.get("index_vectors")
    path = Path(cfg.index.path) if cfg.index.path else None
    try:
        if path is not None and path.is_dir() and cfg.index.source == "embeddings":
            files = sorted((path / "img_emb").glob("*.npy"))
            if files:
                return sum(_npy_rows(f) for f in files)
        elif path is not None and path.exists() and cfg.index.source == "images":
            import pyarrow.parquet as pq

            parts = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            if parts:
                return sum(pq.ParquetFile(f).metadata.num_rows for f in parts)
            captions = sum(1 for _ in path.rglob("*.txt"))
            if captions:
                return captions
    except (OSError, ValueError) as exc:  # unreadable: preflight names it; plan from the hint
        log.warning("index.path %s: cannot count its vectors for the plan (%s)", path, exc)
    if hint is not None:
        return int(hint)
    log.warning("the index build is planned without its size: index.path %s is not there yet; give "
                "--set study.expected.index_vectors=N (LAION-5B ViT-L/14: 5.85e9) to cost it", path)
    return None


def _npy_rows(path: Any) -> int:
    """Rows of a .npy file from its header alone."""
    import numpy as np

    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return int(shape[0]) if shape else 1


def retrieval_quota(ratio: float, size: DatasetSize, margin: float = 0.0) -> int:
    """Images per class that retrieval must deliver so that ``ratio`` % of every class fits, plus
    ``margin`` (a fraction) for what the filter and dedup stages after it drop."""
    return max(1, math.ceil(ratio / 100 * size.max_per_class * (1 + margin) - 1e-9))


def generation_quota(ratio: float, size: DatasetSize, pool_factor: float) -> int:
    """Images per class of a generation pool that serves ``ratio`` and all smaller ratios."""
    return max(1, math.ceil(pool_factor * ratio / 100 * size.max_per_class))


def plan_given(ctx: PlanContext, method: str, cfg: Config, source: str) -> dict[str, str]:
    """A method whose images are a given artifact (``source``: a node the user pinned in a
    one-target study): the post-processing ``cfg.study`` switches on."""
    return _postprocess(ctx, method, cfg, source, 0)


@PIPELINES.register("baseline")
def plan_baseline(ctx: PlanContext, method: str, base: str, cfg: Config) -> dict[str, str]:
    """The original data alone: nothing is added."""
    return {}


@PIPELINES.register("retrieval")
def plan_retrieval(ctx: PlanContext, method: str, base: str, cfg: Config) -> dict[str, str]:
    """(index) -> retrieve + download at the largest ratio's quota -> post-processing.

    The index stage is planned when the backend needs an index and ``retrieve.index`` names none.
    """
    from raugment.stages.retrieve.backends import needs_index

    # over-fetch: the quota counts what survives filter + dedup too (assemble takes the best ranks)
    margin = cfg.study.retrieval_margin if (cfg.study.filter or cfg.study.dedup) else 0.0
    cfg = ctx.derive(cfg, retrieve__images_per_class=retrieval_quota(ctx.max_ratio, ctx.size, margin))
    quota = cfg.retrieve.images_per_class
    index = None
    if needs_index(cfg.retrieve.backend) and not cfg.retrieve.index:
        vectors = index_vectors(cfg)
        cpu_s, gpu_s = index_cost(cfg.index.index_type, cfg.index.source, vectors or 0, ctx.costs)
        index = _new_node(ctx, "index", cfg, {}, {"method": method}, {"index": vectors or 0},
                          cpu_s=cpu_s, gpu_s=gpu_s)
    n = quota * ctx.size.classes
    attempts = math.ceil(n * cfg.retrieve.k_start_factor)
    c = ctx.costs
    source = _new_node(
        ctx, "retrieve", cfg, {"dataset": ctx.dataset_node, "index": index}, {"method": method},
        {"retrieve": n, "download": attempts},
        cpu_s=attempts * c["retrieve.cpu_s_per_download"] + ctx.size.classes * c["retrieve.cpu_s_per_class"])
    roles = _postprocess(ctx, method, cfg, source, n)
    if index:
        roles["index"] = index
    return roles


def _generation_gpu_s(ctx: PlanContext, base: str, cfg: Config, n: int) -> float:
    """Estimated GPU-seconds of generating ``n`` images with ``cfg.generate``."""
    g = cfg.generate
    # Cost scales with UNet calls (steps) and latent pixels relative to 512 px x 50 steps, times
    # the method's own fraction of that (a fine-tuned method's generation: a full sample).
    scale = (g.steps / 50) * (g.height * g.width) / (512 * 512)
    scale *= ctx.costs.get(f"generate.{base}_fraction", 1.0)
    return n * scale * ctx.costs["generate.gpu_s_per_image"]


def _generate_node(ctx: PlanContext, method: str, base: str, cfg: Config,
                   finetune: str | None, select: str | None = None) -> dict[str, str]:
    """The method's generation pool (from ``select``'s checkpoint when given, else from
    ``finetune``'s ``selected.json``) and its post-processing."""
    quota = generation_quota(ctx.max_ratio, ctx.size, cfg.study.pool_factor)
    # num_sets only grows: a study that adds a set keeps its pool (and every stage after it).
    cfg = _set(ctx.derive(cfg, generate__images_per_class=quota,
                          generate__num_sets=max(cfg.generate.num_sets, cfg.study.sets)), generate__method=base)
    n = cfg.generate.images_per_class * ctx.size.classes
    source = _new_node(ctx, "generate", cfg, {"dataset": ctx.dataset_node, "finetune": select or finetune},
                       {"method": method}, {"generate": n}, gpu_s=_generation_gpu_s(ctx, base, cfg, n))
    roles = _postprocess(ctx, method, cfg, source, n)
    if finetune:
        roles["finetune"] = finetune
    if select:
        roles["select"] = select
    return roles


def combined_parts(method: str, base: str) -> list[str]:
    """The parts of a combined study method (``retrieval+simple`` -> ``[retrieval, simple]``).

    Raises:
        ConfigError: an empty or repeated part.
    """
    parts = base.split(COMBINE)
    if len(parts) < 2 or not all(parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"study.methods: {method!r} combines methods joined by '+', each once, e.g. "
                          f"retrieval+simple; got the parts {parts}")
    return parts


@PIPELINES.register("combined")
def plan_combined(ctx: PlanContext, method: str, base: str, cfg: Config) -> dict[str, str]:
    """Several methods' added images mixed in one training set (``retrieval+<generation method>``:
    the paper's closing suggestion): each part planned by its own pipeline (so its nodes are the
    ones the part has as a method of its own: one retrieval, one generation pool), one leakage
    audit over all of them; assemble splits each class's quota evenly between the parts.

    Returns:
        ``added.<part>`` -> each part's added images, ``<role>.<part>`` for the parts' other
        roles, and ``audit`` (the joint audit, when ``study.audit``).
    """
    roles: dict[str, str] = {}
    added: list[str] = []
    for part in combined_parts(method, base):
        p_base, p_pipeline, p_cfg = method_config(cfg, part)
        if p_pipeline in (BASELINE, "combined"):
            raise ConfigError(f"study.methods: {method!r} combines {part!r}, which "
                              + ("adds no images" if p_pipeline == BASELINE else "is itself a combination")
                              + "; combine methods that add images, e.g. retrieval+simple")
        # the joint audit below replaces the part's own (study is in no node's identity: shared nodes stay shared)
        part_roles = PIPELINES.get(p_pipeline)(ctx, part, p_base, _set(p_cfg, study__audit=False))
        roles.update({f"{role}.{part}": nid for role, nid in part_roles.items() if role != "audit"})
        added.append(part_roles[ADDED])
    if cfg.study.audit:
        n = sum(ctx.plan.nodes[a].images.get("process", 0) for a in added)
        roles["audit"] = _new_node(ctx, "audit", cfg, {"dataset": ctx.dataset_node, "added": added},
                                   {"method": method}, {"process": n}, cpu_s=n * ctx.costs["audit.cpu_s_per_image"])
    return roles


def added_inputs(method: str, roles: Mapping[str, str]) -> dict[str, str]:
    """What assemble mixes for a study method: source name -> added-images node."""
    prefix = f"{ADDED}."
    parts = {role[len(prefix):]: nid for role, nid in roles.items() if role.startswith(prefix)}
    if parts:
        return parts
    return {method: roles[ADDED]} if ADDED in roles else {}


@PIPELINES.register("generate")
def plan_generate(ctx: PlanContext, method: str, base: str, cfg: Config) -> dict[str, str]:
    """Prompt or img2img generation with a frozen model -> post-processing."""
    return _generate_node(ctx, method, base, cfg, None)


@PIPELINES.register("finetune")
def plan_finetune(ctx: PlanContext, method: str, base: str, cfg: Config) -> dict[str, str]:
    """Fine-tune the model (methods 5-9) -> generate with it -> post-processing."""
    cfg = _set(cfg, finetune__method=base)
    c = ctx.costs
    per_image = c.get(f"finetune.{base}.gpu_s_per_image", c["finetune.gpu_s_per_image"])
    # The paper's figures are for <= 40 epochs at 512 px; scale with the configured budget.
    scale = (cfg.finetune.max_epochs / 40) * (cfg.finetune.resolution / 512) ** 2
    ft = _new_node(ctx, "finetune", cfg, {"dataset": ctx.dataset_node}, {"method": method},
                   {"train": ctx.size.train_images},
                   gpu_s=ctx.size.train_images * per_image * scale)
    select = plan_selection(ctx, method, base, cfg, ft) if cfg.study.select_checkpoint else None
    return _generate_node(ctx, method, base, cfg, ft, select)


def candidate_names(cfg: Config, base: str) -> list[str]:
    """Checkpoint names that selection scores for fine-tuning method ``base``.

    ``select.candidates``, or every name the fine-tuning keeps: best train and validation loss
    and the method's kept epochs (``finetune.keep_epochs``; Imagic's first ``imagic_epochs``) up
    to ``finetune.max_epochs``.

    Raises:
        ConfigError: a candidate (or ``select.checkpoint``) epoch the fine-tuning never keeps.
    """
    from raugment.lib.finetuned.artifact import BEST_TRAIN, BEST_VAL, epoch_tag
    from raugment.stages.finetune.methods import get_method

    f = cfg.finetune
    kept = get_method(base, key="finetune.method").keep_epochs(f)
    epochs = sorted(e for e in set(kept) if e <= f.max_epochs)
    asked = {"select.candidates": cfg.select.candidates, "select.checkpoint": [cfg.select.checkpoint or BEST_VAL]}
    for key, names in asked.items():
        for name in names:
            if name.startswith("epoch_") and int(name[len("epoch_"):]) not in epochs:
                raise ConfigError(
                    f"{key}: {base} keeps no checkpoint {name}; its kept epochs up to finetune.max_epochs="
                    f"{f.max_epochs} are {epochs} (finetune.keep_epochs, imagic_epochs for imagic)")
    return list(cfg.select.candidates) or [BEST_TRAIN, BEST_VAL] + [epoch_tag(e) for e in epochs]


def plan_selection(ctx: PlanContext, method: str, base: str, cfg: Config, finetune: str) -> str:
    """Checkpoint selection of a fine-tuned method (paper 3.1); returns the ``select`` node whose
    checkpoint the method's generation uses.

    Per candidate name: a ``select`` pointer run (keyed by the snapshot's epoch when it runs, so
    names sharing a snapshot share everything after it), a small ``generate`` run from it,
    ``assemble`` at ``select.ratio`` and ``train``; then one ``select`` run that reads the
    classifiers' validation top-1. With ``select.checkpoint`` set, only a pointer to that one.
    The estimates count every candidate; at run time a shared snapshot is generated and scored once.
    """
    s = cfg.select
    names = candidate_names(cfg, base)
    if s.checkpoint:
        return _new_node(ctx, "select", cfg, {"finetune": finetune}, {"method": method, "checkpoint": s.checkpoint})
    quota = generation_quota(s.ratio, ctx.size, 1.0)
    per_class = s.images_per_class or quota
    if per_class < quota:
        raise ConfigError(f"select.images_per_class={per_class} is fewer than select.ratio={s.ratio:g} % of "
                          f"the largest class needs ({quota}); raise it or lower select.ratio")
    n_gen = per_class * ctx.size.classes
    n_train = ctx.size.train_images + math.floor(s.ratio / 100 * ctx.size.train_images)
    g_cfg = _set(cfg, generate__method=base, generate__images_per_class=per_class, generate__num_sets=1)
    # the scoring sets skip filter/dedup/audit, so there are no leakage candidates to remove
    a_cfg = _set(cfg, assemble__sources=[method], assemble__ratio=s.ratio, assemble__set_index=0,
                 assemble__num_sets=1, assemble__leakage="keep")
    cpu_s, gpu_s = _train_cost(a_cfg, n_train, ctx.costs)
    scores: dict[str, str] = {}
    for name in names:
        labels = {"method": method, "checkpoint": name}
        pointer = _new_node(ctx, "select", _set(cfg, select__checkpoint=name), {"finetune": finetune}, labels)
        gen = _new_node(ctx, "generate", g_cfg, {"dataset": ctx.dataset_node, "finetune": pointer}, labels,
                        {"generate": n_gen}, gpu_s=_generation_gpu_s(ctx, base, g_cfg, n_gen))
        assemble = _new_node(ctx, "assemble", a_cfg, {"dataset": ctx.dataset_node, "added": {method: gen},
                                                      "audit": None}, labels, {"process": n_train})
        scores[name] = _new_node(ctx, "train", a_cfg, {"dataset": ctx.dataset_node, "manifest": assemble},
                                 labels, {"train": n_train}, cpu_s=cpu_s, gpu_s=gpu_s)
    return _new_node(ctx, "select", cfg, {"finetune": finetune, "scores": scores}, {"method": method})


def _train_cost(cfg: Config, images: int, costs: Mapping[str, float]) -> tuple[float, float]:
    epochs = cfg.train.max_epochs * costs["train.epochs_fraction"]
    pixels = (cfg.train.image_size / 224) ** 2
    gpu_s = images * epochs * pixels * costs["train.gpu_s_per_image_epoch"]
    cpu_s = images * epochs * costs["train.cpu_s_per_image_epoch"]
    return cpu_s, gpu_s


def _seeds(cfg: Config, set_index: int) -> list[int]:
    """Classifier seeds of one set: ``study.seeds``, or ``train.seed + set_index`` (one per set)."""
    if cfg.study.seeds:
        return list(cfg.study.seeds)
    return [cfg.train.seed + set_index]


def dataset_nodes(cfg: Config) -> list[Node]:
    """The dataset stage runs of a study (they need no sizes: everything else does)."""
    return [Node(id=node_id("dataset", c, {}), stage="dataset", cfg=c, labels={"dataset": name})
            for name, c in dataset_configs(cfg).items()]


def build_plan(cfg: Config, sizes: Mapping[str, DatasetSize] | None = None,
               costs: Mapping[str, float] | None = None) -> Plan:
    """The whole study as a plan.

    Args:
        cfg: the study config.
        sizes: dataset name -> measured size (from its finished dataset stage); datasets not given
            are planned with :func:`expected_size`.
        costs: per-image cost overrides on top of ``DEFAULT_COSTS`` and ``study.costs``.

    Raises:
        ConfigError: unknown cost keys, methods or variants that do not apply.
    """
    plan, contexts = plan_datasets(cfg, sizes, costs)
    methods = ([BASELINE] if cfg.study.baseline else []) + list(cfg.study.methods)
    for ctx, ds_cfg in contexts:
        planned = []
        for method in methods:
            base, pipeline, m_cfg = method_config(ds_cfg, method)
            planned.append((method, pipeline, m_cfg, PIPELINES.get(pipeline)(ctx, method, base, m_cfg)))
        census = shortfall_census(cfg, {method: roles for method, _, _, roles in planned})
        for method, pipeline, m_cfg, roles in planned:
            ratios = [0.0] if pipeline == "baseline" else sorted(set(cfg.study.ratios))
            for ratio in ratios:
                for s in range(cfg.study.sets):
                    _add_runs(ctx, method, m_cfg, roles, ratio, s, census)
    return plan


Census = tuple[dict[str, str], dict[str, str]]


def shortfall_census(cfg: Config, roles: Mapping[str, Mapping[str, str]]) -> Census | None:
    """What every assemble run of a dataset checks for shortfalls under ``study.shortfall=exclude``:
    (method -> its final pool node, method -> its audit node). A class that any pool cannot fill
    at the largest ratio is then left out of every classifier, the baseline's included, so all
    of them train and score on one class set (the paper's 990 classes). None for other policies."""
    if cfg.study.shortfall != "exclude":
        return None
    pools: dict[str, str] = {}
    audits: dict[str, str] = {}
    for m, r in roles.items():  # a combined method's parts count as pools of their own
        for source, node in added_inputs(m, r).items():
            if source not in pools:
                pools[source] = node
                if r.get("audit"):
                    audits[source] = r["audit"]
    if not pools:
        return None
    return pools, audits


def plan_datasets(cfg: Config, sizes: Mapping[str, DatasetSize] | None = None,
                  costs: Mapping[str, float] | None = None,
                  as_given: bool = False) -> tuple[Plan, list[tuple[PlanContext, Config]]]:
    """A plan holding the study's dataset stage runs, and a pipeline context and config per dataset.

    Args:
        cfg, sizes, costs: as for :func:`build_plan`.
        as_given: the contexts use the user's sections as given (:attr:`PlanContext.as_given`).

    Raises:
        ConfigError: unknown cost keys.
    """
    declared = plugin_costs()
    merged = {**DEFAULT_COSTS, **declared, **cfg.study.costs, **(costs or {})}
    unknown = sorted(set(cfg.study.costs) - set(DEFAULT_COSTS) - set(declared))
    if unknown:
        raise ConfigError(f"study.costs.{unknown[0]}: unknown cost; known: "
                          f"{', '.join(sorted({*DEFAULT_COSTS, *declared}))}")
    plan = Plan(node_gpus=cfg.study.node_gpus, node_cpus=cfg.study.node_cpus)
    max_ratio = max(cfg.study.ratios)
    contexts = []
    for ds_node in dataset_nodes(cfg):
        ds_name, ds_cfg = ds_node.labels["dataset"], ds_node.cfg
        size = (sizes or {}).get(ds_name) or expected_size(ds_cfg)
        ds_node.images = {"process": size.train_images}
        ds_node.cpu_h = size.train_images * merged["dataset.cpu_s_per_image"] / 3600
        plan.add(ds_node)
        contexts.append((PlanContext(plan, ds_name, ds_node.id, size, merged, max_ratio, as_given), ds_cfg))
    return plan, contexts


def _add_runs(ctx: PlanContext, method: str, cfg: Config, roles: dict[str, str], ratio: float,
              set_index: int, census: Census | None = None) -> None:
    added = added_inputs(method, roles)
    a_cfg = _set(cfg, assemble__sources=list(added), assemble__ratio=ratio, assemble__set_index=set_index,
                 assemble__num_sets=max(cfg.assemble.num_sets, cfg.study.sets),
                 assemble__shortfall=cfg.study.shortfall)
    if census is not None:  # every classifier of the dataset checks the same pools at one ratio
        a_cfg = _set(a_cfg, assemble__census_ratio=ctx.max_ratio)
    labels = {"method": method, "ratio": ratio, "set_index": set_index}
    assemble, trains = plan_classifiers(ctx, a_cfg, added, roles.get("audit"), labels, _seeds(cfg, set_index),
                                        census)
    for seed, train in trains:
        ctx.plan.runs.append(RunSpec(ctx.dataset_name, method, ratio, set_index, seed, train, assemble,
                                     {k: v for k, v in roles.items()}))


def plan_classifiers(ctx: PlanContext, cfg: Config, added: dict[str, str], audit: str | None,
                     labels: dict[str, Any], seeds: Iterable[int],
                     census: Census | None = None) -> tuple[str, list[tuple[int, str]]]:
    """One ``assemble`` run of ``cfg.assemble`` (the dataset's train split + ``added``: method ->
    node, with ``audit``'s leakage candidates; ``census``: every pool and audit of the dataset,
    see :func:`shortfall_census`) and one ``train`` run per seed on its manifest.

    Returns:
        (assemble node id, [(seed, train node id), ...]).
    """
    inputs: dict[str, InputRef] = {"dataset": ctx.dataset_node, "added": added, "audit": audit}
    if census is not None:
        inputs.update({"census": dict(census[0]), "census_audit": dict(census[1]) or None})
    n_added = math.floor(cfg.assemble.ratio / 100 * ctx.size.train_images)
    n_train = ctx.size.train_images + n_added
    assemble = _new_node(ctx, "assemble", cfg, inputs, labels, {"process": n_train, "added": n_added})
    trains = []
    for seed in seeds:
        t_cfg = _set(cfg, train__seed=seed)
        cpu_s, gpu_s = _train_cost(t_cfg, n_train, ctx.costs)
        trains.append((seed, _new_node(ctx, "train", t_cfg, {"dataset": ctx.dataset_node, "manifest": assemble},
                                       {**labels, "seed": seed}, {"train": n_train}, cpu_s=cpu_s, gpu_s=gpu_s)))
    return assemble, trains


# ----------------------------------------------------------------------------------------------
# What a study has already run (measured costs), and printing
# ----------------------------------------------------------------------------------------------


def apply_measured(plan: Plan, done: Mapping[str, str], root: str | Path) -> int:
    """Mark nodes the study has finished (``done``: node id -> artifact dir relative to ``root``)
    and replace their estimates by the CPU/GPU-seconds in their ``stats.json``. Returns how many."""
    n = 0
    counted: set[str] = set()
    for nid, rel in done.items():
        node = plan.nodes.get(nid)
        stats_file = Path(root) / rel / "stats.json"
        if node is None or not (Path(root) / rel / "_SUCCESS").exists():
            continue
        node.path = rel
        if stats_file.exists():
            stats = json.loads(stats_file.read_text())
            # nodes that met in one artifact at run time (checkpoint names sharing a snapshot) ran once
            once = rel not in counted
            counted.add(rel)
            node.cpu_h = once * float(stats.get("cpu_s", 0.0)) / 3600
            node.gpu_h = once * float(stats.get("gpu_s", 0.0)) / 3600
            node.cost = "measured"
        n += 1
    return n


def summary_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per (dataset, stage, method, ratio): nodes, images, hours, how many are done.

    ``ratio`` is the node's augmentation ratio (assemble, train), or "" for a run every ratio of
    the method shares (its pool: index, retrieve / fine-tune, generate, filter, dedup, audit)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for node in plan.nodes.values():
        method = node.labels.get("method", "")
        if "checkpoint" in node.labels:  # a checkpoint-selection run: keep it apart from the method's own
            method = f"{method} (checkpoint selection)"
        ratio = node.labels.get("ratio", "") if "checkpoint" not in node.labels else ""
        key = (node.labels.get("dataset", ""), node.stage, method, ratio)
        row = rows.setdefault(key, {"dataset": key[0], "stage": key[1], "method": key[2], "ratio": ratio,
                                    "runs": 0, "done": 0, "cpu_h": 0.0, "gpu_h": 0.0, "images": {}})
        row["runs"] += 1
        row["done"] += node.path is not None
        row["cpu_h"] += node.cpu_h
        row["gpu_h"] += node.gpu_h
        for k, v in node.images.items():
            row["images"][k] = row["images"].get(k, 0) + v
    return list(rows.values())


def ratio_rows(plan: Plan) -> list[dict[str, Any]]:
    """Per (dataset, method): one ``ratio="pool"`` row for the runs every ratio shares (images: the
    pool made; hours: making it, checkpoint selection included) and one row per ratio (images:
    added per classifier; hours: its assemble + train runs). Hours of the rows sum to the plan's."""
    rows: dict[tuple, dict[str, Any]] = {}
    for node in plan.nodes.values():
        method = node.labels.get("method", "")
        ratio = node.labels.get("ratio", "pool") if "checkpoint" not in node.labels else "pool"
        key = (node.labels.get("dataset", ""), method, ratio)
        row = rows.setdefault(key, {"dataset": key[0], "method": method, "ratio": ratio, "classifiers": 0,
                                    "images": 0, "added_per_classifier": 0, "cpu_h": 0.0, "gpu_h": 0.0})
        row["cpu_h"] += node.cpu_h
        row["gpu_h"] += node.gpu_h
        if ratio == "pool":
            if node.stage in ("retrieve", "generate") and "checkpoint" not in node.labels:
                row["images"] += node.images.get("retrieve", 0) + node.images.get("generate", 0)
        elif node.stage == "train":
            row["classifiers"] += 1
        elif node.stage == "assemble":
            row["added_per_classifier"] = node.images.get("added", 0)
    return sorted(rows.values(), key=lambda r: (r["dataset"], r["method"], r["ratio"] != "pool",
                                                 r["ratio"] if r["ratio"] != "pool" else 0.0))


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def format_plan(plan: Plan) -> str:
    """The plan as a text table: per stage and method, then totals and the node wall-time."""
    head = f"{'dataset':<10} {'stage':<9} {'method':<40} {'ratio':>6} {'runs':>5} {'done':>5} " \
           f"{'generate':>9} {'retrieve':>9} {'download':>9} {'train':>9} {'CPU-h':>9} {'GPU-h':>9}"
    lines = [head, "-" * len(head)]
    for r in summary_rows(plan):
        im = r["images"]
        if r["stage"] == "index":
            im = {**im, "retrieve": im.get("index", 0)}  # the vectors indexed, in the retrieve column
        ratio = f"{r['ratio']:g}" if r["ratio"] != "" else "-"
        lines.append(
            f"{r['dataset']:<10.10} {r['stage']:<9} {r['method'] or '-':<40.40} {ratio:>6} {r['runs']:>5} "
            f"{r['done']:>5} "
            f"{_fmt_count(im.get('generate', 0)):>9} {_fmt_count(im.get('retrieve', 0)):>9} "
            f"{_fmt_count(im.get('download', 0)):>9} {_fmt_count(im.get('train', 0)):>9} "
            f"{r['cpu_h']:>9.3g} {r['gpu_h']:>9.3g}")
    t = plan.totals()
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<10} {'':<9} {'':<40} {'':>6} {len(plan.nodes):>5} "
        f"{sum(n.path is not None for n in plan.nodes.values()):>5} "
        f"{_fmt_count(t.get('images_generate', 0)):>9} {_fmt_count(t.get('images_retrieve', 0)):>9} "
        f"{_fmt_count(t.get('images_download', 0)):>9} {_fmt_count(t.get('images_train', 0)):>9} "
        f"{t['cpu_h']:>9.3g} {t['gpu_h']:>9.3g}")
    lines.append(f"{len(plan.runs)} classifiers; on one node with {plan.node_gpus} GPUs and "
                 f"{plan.node_cpus} CPUs: about {t['wall_h']:.3g} h "
                 f"({t['wall_h'] / 24:.3g} days) if the stages run back to back.")
    head = f"{'dataset':<10} {'method':<40} {'ratio':>6} {'classifiers':>11} {'images':>9} {'CPU-h':>9} {'GPU-h':>9}"
    lines += ["", "Per method and ratio (pool: the images a method makes once for all its ratios; a "
              "ratio: images added per classifier, and its assemble + train runs):", head, "-" * len(head)]
    for r in ratio_rows(plan):
        pool = r["ratio"] == "pool"
        images = r["images"] if pool else r["added_per_classifier"]
        lines.append(f"{r['dataset']:<10.10} {r['method'] or '-':<40.40} "
                     f"{'pool' if pool else format(r['ratio'], 'g'):>6} {r['classifiers'] or '-':>11} "
                     f"{_fmt_count(images):>9} {r['cpu_h']:>9.3g} {r['gpu_h']:>9.3g}")
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Plain data of a plan (no configs) for ``plan.json``."""
    return {
        "nodes": [{"id": n.id, "stage": n.stage, "inputs": n.inputs, "labels": n.labels,
                   "images": n.images, "cpu_h": n.cpu_h, "gpu_h": n.gpu_h, "cost": n.cost,
                   "path": n.path} for n in plan.nodes.values()],
        "runs": [dataclasses.asdict(r) for r in plan.runs],
        "totals": plan.totals(),
    }


def topological(nodes: Iterable[Node]) -> list[Node]:
    """Nodes with every input before its readers (plans are built in this order already)."""
    nodes = list(nodes)
    by_id = {n.id: n for n in nodes}
    seen: set[str] = set()
    out: list[Node] = []

    def visit(n: Node) -> None:
        if n.id in seen:
            return
        seen.add(n.id)
        for i in n.input_ids():
            if i in by_id:
                visit(by_id[i])
        out.append(n)

    for n in nodes:
        visit(n)
    return out
