"""Typed configuration: one dataclass per stage, loaded from YAML with ``--set a.b=c`` overrides.

Everything here is standard library + PyYAML so that ``raugment --help`` and config validation never
import torch or ray. Unknown keys, wrong types and bad values raise :class:`ConfigError` naming the
dotted key and what to do about it, before any work starts.

Each stage reads only its own section; a stage's output directory is keyed by the hash of that
section (plus its inputs' keys), see :func:`section_hash` and :mod:`raugment.storage`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class InputError(ValueError):
    """An input file or directory is missing, unreadable or malformed; the message names it and the fix."""


DIFFUSERS_HINT = "expected a diffusers model directory; `raugment models tiny DIR` writes a tiny one in DIR/sd"


def looks_local(ref: str) -> bool:
    """Whether a model reference is a local path rather than a hub id (``org/name``)."""
    p = Path(ref).expanduser()
    return p.exists() or p.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1


def check_local_model(ref: Optional[str], key: str, marker: str, hint: str = "") -> None:
    """A model reference that points at the local file system must be there and hold ``marker``.

    Hub ids (``org/name``) are not checked here: they resolve when the model is loaded.
    """
    if not ref or not looks_local(ref):
        return
    p = Path(ref).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {ref!r} does not exist{'; ' + hint if hint else ''}")
    if marker and p.is_dir() and not (p / marker).exists():
        raise ConfigError(f"{key}: {ref!r} has no {marker}{'; ' + hint if hint else ''}")


# GPU options that default to "auto": resolved from the device a stage's workers will run on
# (``"cuda..."`` -> the GPU setting, anything else -> the CPU one) by each section's
# ``resolved(device)``, so one config is fast on a GPU and exact on a CPU.
AUTO = "auto"
AutoBool = Union[bool, Literal["auto"]]


def on_gpu(device: str) -> bool:
    """Whether a torch device string names a GPU (``cuda``, ``cuda:1``)."""
    return str(device).startswith("cuda")


def _auto(value: Any, device: str, gpu: Any, cpu: Any) -> Any:
    return (gpu if on_gpu(device) else cpu) if value == AUTO else value


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@dataclass
class ActorPoolConfig:
    """Resources of one actor pool: a ``cluster.ActorGroup`` (generate, filter, index, retrieval's
    pools: ``concurrency`` actors) or a Ray Data ``map_batches`` actor pool (Inception features);
    ``batch_size`` is the items per model call.

    On a 2-CPU box an actor pool that holds every CPU starves its own read tasks (STACK-NOTES,
    hang 1), hence fractional CPUs by default. Inside a study a group is kept between stage runs
    of the same class and resources (``cluster.POOLS``) and given back before any stage that
    needs the CPUs. ``gpu_fallback``: what a GPU request means on a cluster without GPUs — run on
    CPU instead (logged; for light, optional GPU work such as retrieval's scoring) or, when false,
    a config error naming the key before anything starts (SD generation on a CPU would take days,
    so it must be asked for with ``num_gpus: 0``).
    """

    concurrency: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    batch_size: int = 8
    gpu_fallback: bool = False

    def validate(self, key: str) -> None:
        _positive(self.concurrency, f"{key}.concurrency")
        _positive(self.batch_size, f"{key}.batch_size")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"{key}: num_cpus/num_gpus must be >= 0")


@dataclass
class WorkersConfig:
    """Resources of a Ray Train job. 0.5 CPU per worker leaves room for data ingest (hang 2)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0
    max_failures: int = 2

    def validate(self, key: str) -> None:
        _positive(self.num_workers, f"{key}.num_workers")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"{key}.cpus_per_worker must be > 0 (Ray refuses 0); try 0.5")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Where outputs go and the study-wide seed."""

    root: str = "runs"
    seed: int = 0
    log_level: str = "INFO"
    progress: bool = True


@dataclass
class ClusterConfig:
    """How to reach Ray. ``address=None`` starts (or joins, under ``ray job submit``) a cluster."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    temp_dir: Optional[str] = None
    include_dashboard: bool = True
    object_store_memory: Optional[int] = None
    # Niceness of the worker processes of a local cluster started here. Ray's own default (15)
    # lets every other process of the machine, the driver included, take the CPU from the stage
    # actors on a shared box (measured: a generation actor at a third of a plain loop's speed).
    worker_niceness: int = 0
    # Python modules every worker process of a local cluster started here imports when it starts,
    # before it takes work (Ray's ``preload_python_modules``): the workers Ray starts with the
    # cluster pay them in the background, so the first actor that needs them (a generation pool:
    # ``raugment.models.preload`` = torch + diffusers' SD pipelines + transformers' CLIP, ~6.5 s
    # and ~0.8 GB per process) starts without the imports. Every later worker pays them too; a
    # joined cluster takes them from ``RAY_preload_python_modules`` where its nodes were started.
    preload_modules: list[str] = field(default_factory=list)

    def validate(self, key: str) -> None:
        if not 0 <= self.worker_niceness <= 19:
            raise ConfigError(f"{key}.worker_niceness is a Unix nice value in [0, 19], got {self.worker_niceness}")
        for i, name in enumerate(self.preload_modules):
            where = f"{key}.preload_modules[{i}]"
            if not all(part.isidentifier() for part in name.split(".")):
                raise ConfigError(f"{where}: {name!r} is not a Python module name (dotted identifiers, e.g. "
                                  "torch or raugment.models.preload)")
            if importlib.util.find_spec(name.split(".")[0]) is None:
                raise ConfigError(f"{where}: no module {name.split('.')[0]!r} is installed here; fix the name, "
                                  "install it, or remove it from the list")


@dataclass
class SyntheticConfig:
    """The embedded demo dataset (``raugment.synthetic``): coloured shapes a small CNN can learn.

    Classes are the first ``num_classes`` of ``synthetic.SYNTHETIC_CLASSES`` ("red circle", ...).
    """

    num_classes: int = 4
    train_per_class: int = 60
    test_per_class: int = 20
    size: int = 32
    imbalance: float = 0.0  # 0 = balanced; 0.5 = last class has half the images of the first

    def validate(self, key: str) -> None:
        _positive(self.num_classes, f"{key}.num_classes")
        _positive(self.train_per_class, f"{key}.train_per_class")
        if self.test_per_class < 0:
            raise ConfigError(f"{key}.test_per_class must be >= 0, got {self.test_per_class}")
        if self.size < 8:
            raise ConfigError(f"{key}.size must be >= 8 pixels, got {self.size}")
        if not 0 <= self.imbalance < 1:
            raise ConfigError(f"{key}.imbalance must be in [0, 1), got {self.imbalance}")


@dataclass
class DatasetConfig:
    """The target dataset and its splits (paper section 3, "Dataset")."""

    # A name in registry.DATASETS: "imagefolder", "parquet" or "synthetic".
    source: str = "synthetic"
    path: Optional[str] = None
    # The test split when it is not under ``path`` (ImageFolder: ``path/test`` or ``path/val``).
    test_path: Optional[str] = None
    # subsample: train = fraction of each class, val = as many again, rest "unused";
    # full: all but that same val; split_80_10_10: Caltech256-style, for data without a test split.
    protocol: Literal["subsample", "split_80_10_10", "full"] = "subsample"
    fraction: float = 0.1
    class_names: Literal["auto", "wordnet", "folder"] = "auto"
    exclude_classes: list[str] = field(default_factory=list)
    max_side: Optional[int] = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    seed: int = 0
    # Parquet sources: the image column (bytes, or a struct with a "bytes" field as Hugging Face
    # writes), the class column (None: the first of label, class_id, class_name) and a split column.
    image_column: str = "image"
    label_column: Optional[str] = None
    split_column: Optional[str] = "split"
    shard_size: int = 1000
    read_threads: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, key: str) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{key}.fraction must be in (0, 1], got {self.fraction}")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"{key}.path is required when {key}.source={self.source!r}")
        if self.protocol == "split_80_10_10" and self.test_path:
            raise ConfigError(f"{key}.test_path is set but {key}.protocol=split_80_10_10 makes its own "
                              "test split; drop one of them")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"{key}.max_side must be >= 8 pixels or null, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"{key}.quality must be in [1, 100], got {self.quality}")
        _positive(self.shard_size, f"{key}.shard_size")
        _positive(self.read_threads, f"{key}.read_threads")


@dataclass
class GenerateConfig:
    """Diffusion generation (paper 3.1, prompt conditioning and Boomerang; ``raugment.generate``).

    ``method`` names a class in ``registry.GENERATORS`` (simple, simple_nows, clip_templates,
    sariyildiz, boomerang, and the personalised methods). ``model`` is a hub id or a local bundle
    (``raugment models tiny DIR`` writes ``DIR/sd``). ``seed`` fixes every prompt and per-image
    seed. ``pool`` is the actor pool: ``batch_size`` is the diffusion batch per pipeline call,
    ``num_gpus``/``num_cpus``/``concurrency`` only say where it runs (they are not part of the
    output's key, so a resumed run may use other resources). ``dtype``, ``sdpa``,
    ``channels_last``, ``compile`` and ``vae_slicing`` are the GPU options; ``dtype`` and
    ``channels_last`` default to ``auto``: float16 + channels-last on a GPU, float32 on a CPU (see
    :meth:`resolved`; SDPA is on everywhere). ``device: auto`` is the GPU when the pool asks for
    one (``pool.num_gpus > 0``; Ray hides GPUs from actors that do not), else the CPU. A sample flagged by the
    safety checker is replaced by a new seed, at most ``max_attempts_per_image`` tries per image.
    ``shard_images``: a class's slots are made in chunks of this many (by slot index), each
    written as one shard once complete, so a kill loses at most the chunks in progress and a
    resumed run writes the same shards, from the same batches, as an uninterrupted one.
    ``conditioning``: a fine-tuning stage directory for the personalised methods, used when no
    fine-tuning artifact is passed to ``generate.run`` (the CLI otherwise runs that stage).
    """

    method: str = "simple"
    model: str = "CompVis/stable-diffusion-v1-4"
    revision: Optional[str] = None
    seed: int = 0
    images_per_class: int = 390
    num_sets: int = 5
    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "pndm"
    boomerang_strength: float = 0.2
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    sdpa: bool = True
    channels_last: AutoBool = "auto"
    compile: bool = False
    vae_slicing: bool = False
    safety_checker: bool = True
    max_attempts_per_image: int = 10
    shard_images: int = 256
    conditioning: Optional[str] = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(num_gpus=1.0, batch_size=8))

    def validate(self, key: str) -> None:
        from raugment.models.diffusion import SCHEDULERS  # a plain table; no torch

        _positive(self.images_per_class, f"{key}.images_per_class")
        _positive(self.steps, f"{key}.steps")
        _positive(self.num_sets, f"{key}.num_sets")
        _positive(self.max_attempts_per_image, f"{key}.max_attempts_per_image")
        _positive(self.shard_images, f"{key}.shard_images")
        if self.pool.gpu_fallback:
            raise ConfigError(f"{key}.pool.gpu_fallback is not supported: the device decides the pipeline's "
                              f"dtype and is part of the stage's key; set {key}.pool.num_gpus=0 to generate on CPU")
        for dim in ("height", "width"):
            v = getattr(self, dim)
            if v <= 0 or v % 8:
                raise ConfigError(f"{key}.{dim} must be a positive multiple of 8, got {v}")
        if not 0 < self.boomerang_strength <= 1:
            raise ConfigError(f"{key}.boomerang_strength must be in (0, 1]")
        if self.guidance_scale < 0:
            raise ConfigError(f"{key}.guidance_scale must be >= 0 (1 = no guidance), got {self.guidance_scale}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"{key}.scheduler {self.scheduler!r} is not one of {sorted(SCHEDULERS)}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"{key}.quality must be in [1, 100], got {self.quality}")
        if self.device != AUTO and not (self.device == "cpu" or on_gpu(self.device)):
            raise ConfigError(f"{key}.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if on_gpu(self.device) and self.pool.num_gpus <= 0:
            raise ConfigError(f"{key}.device={self.device} but {key}.pool.num_gpus=0: Ray hides the GPUs "
                              f"from actors without one; set {key}.pool.num_gpus (e.g. 1) or device=auto")

    def run_device(self) -> str:
        """The device the generation actors use: ``device``, or for ``auto`` the GPU exactly when
        the pool asks for GPUs."""
        if self.device != AUTO:
            return self.device
        return "cuda" if self.pool.num_gpus > 0 else "cpu"

    def resolved(self, device: Optional[str] = None) -> "GenerateConfig":
        """A copy with ``device``, ``dtype`` and ``channels_last`` concrete for ``device``
        (default :meth:`run_device`): GPU -> float16 (SD v1's published half-precision weights)
        and a channels-last UNet; CPU -> float32 (half precision is slow or unsupported there)."""
        device = device or self.run_device()
        return dataclasses.replace(self, device=device,
                                   dtype=_auto(self.dtype, device, "float16", "float32"),
                                   channels_last=_auto(self.channels_last, device, True, False))


@dataclass
class IndexConfig:
    """Building a local CLIP kNN index over a captioned pool (``raugment index build``).

    ``source="images"``: ``path`` is a Parquet file/directory of captioned images (url, caption,
    image bytes; optional aesthetic_score, nsfw_score, pool_label) or a folder of images with
    ``<name>.txt`` captions; CLIP image embeddings are computed on an actor pool (``pool``).
    ``source="embeddings"``: ``path`` holds LAION's published layout, ``img_emb/*.npy`` +
    ``metadata/*.parquet`` (row i of the concatenated shards = embedding i); ``clip_model`` then
    only records which model made them (the text side must use the same one).
    """

    source: Literal["images", "embeddings"] = "images"
    path: Optional[str] = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    device: str = "auto"
    index_type: str = "Flat"   # any faiss index_factory string, e.g. "IVF256,Flat", "HNSW32"
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=64))

    def validate(self, key: str) -> None:
        if not self.index_type.strip():
            raise ConfigError(f"{key}.index_type must be a faiss index_factory string such as 'Flat'")


@dataclass
class DownloadConfig:
    """Untrusted downloads (DESIGN section 8): Ray Data CPU actors, many requests in flight each.

    Link-local (169.254.x, fe80::), multicast, unspecified and reserved addresses are always
    refused; loopback and private ranges only when allowed (tests and the local demo allow
    loopback). Every redirect hop is checked again.
    """

    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(concurrency=2, num_cpus=0.25,
                                                                          batch_size=64))
    concurrency_per_actor: int = 32
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_redirects: int = 5
    allow_loopback: bool = False
    allow_private: bool = False
    resize_max_side: Optional[int] = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    user_agent: str = "raugment/0.1 (+research data augmentation)"

    def validate(self, key: str) -> None:
        _positive(self.concurrency_per_actor, f"{key}.concurrency_per_actor")
        _positive(self.timeout_s, f"{key}.timeout_s")
        _positive(self.max_bytes, f"{key}.max_bytes")
        _positive(self.max_pixels, f"{key}.max_pixels")
        if self.retries < 0 or self.max_redirects < 0 or self.backoff_s < 0:
            raise ConfigError(f"{key}: retries, max_redirects and backoff_s must be >= 0")


@dataclass
class RetrieveConfig:
    """CLIP kNN retrieval with quota-driven growth of k (paper 3.1, "Laion nearest neighbor").

    Per class, k starts at ``k_start_factor * n`` and grows by ``k_step_factor * n`` up to
    ``k_max_factor * n`` (paper: 1.4 n ... 10 x 1.4 n) until n images survive downloads and the
    filters; the n most similar survivors are kept. n = ``images_per_class``, or
    ``ratio`` percent of the class's training images when ``ratio`` is set.
    """

    backend: str = "local"
    index: Optional[str] = None          # local index directory (default: the index stage's output)
    url_base: Optional[str] = None       # joined with relative URLs of the index (local demo pool)
    service_url: Optional[str] = None    # knn_service: e.g. http://127.0.0.1:1234/knn-service
    indice_name: str = "laion5B-L-14"
    result_ids_factor: float = 3.0       # knn_service: num_result_ids = factor * num_images
    service_aesthetic_score: Optional[int] = None   # knn_service query steering only, not a filter
    service_aesthetic_weight: Optional[float] = None
    clip_model: Optional[str] = None     # None: the model the index was built with
    clip_pretrained: Optional[str] = None
    device: str = "auto"
    prompt: str = "simple_nows"
    images_per_class: int = 130
    ratio: Optional[float] = None
    k_start_factor: float = 1.4
    k_step_factor: float = 1.4
    k_max_factor: float = 14.0
    aesthetic_threshold: Optional[float] = 5.0
    aesthetic_model: Optional[str] = None   # LAION predictor weights; None = random (demo/tests only)
    nsfw_threshold: float = 0.5             # index tag / safety score at or above this is dropped
    drop_nsfw: bool = True
    safety_model: Optional[str] = None      # SD safety checker on downloaded images (None: tag only)
    deduplicate: bool = True
    timeout_s: float = 30.0
    retries: int = 3
    download: DownloadConfig = field(default_factory=DownloadConfig)
    # Actors kept for the whole stage (every k round): CLIP + aesthetic predictor for hits that come
    # without an aesthetic score, and the safety checker. They use a GPU when num_gpus > 0 and the
    # cluster has one, else the CPU (gpu_fallback); fractional CPUs leave room beside the download
    # actors on 2 CPUs.
    score_pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(
        num_cpus=0.25, num_gpus=0.25, batch_size=64, gpu_fallback=True))
    safety_pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(
        num_cpus=0.25, num_gpus=0.25, batch_size=32, gpu_fallback=True))

    def validate(self, key: str) -> None:
        _positive(self.images_per_class, f"{key}.images_per_class")
        if self.k_start_factor < 1 or self.k_max_factor < self.k_start_factor or self.k_step_factor <= 0:
            raise ConfigError(f"{key}: need 1 <= k_start_factor <= k_max_factor and k_step_factor > 0, got "
                              f"k_start_factor={self.k_start_factor}, k_max_factor={self.k_max_factor}, "
                              f"k_step_factor={self.k_step_factor} (paper: 1.4, 14, 1.4)")
        if self.ratio is not None and not 0 < self.ratio <= 2500:
            raise ConfigError(f"{key}.ratio is a percentage in (0, 2500], got {self.ratio}")
        if self.result_ids_factor < 1:
            raise ConfigError(f"{key}.result_ids_factor must be >= 1 (ask for more ids than images)")
        if self.backend == "knn_service" and not self.service_url:
            raise ConfigError(f"{key}.service_url is required when {key}.backend='knn_service'")


@dataclass
class FilterConfig:
    """Filters applied to added images (``raugment.filter``); each dropped row keeps its reason.

    Filters run in the order listed; a row is dropped for the first filter it fails (all scores
    are still filled). Model-backed filters load their model once per actor of ``pool`` (once per
    study when consecutive filter runs have equal settings: the actors are kept in a study).
    """

    filters: list[str] = field(default_factory=lambda: ["min_size", "nsfw", "aesthetic"])
    min_side: int = 32
    # NSFW: the Stable Diffusion safety checker of this hub id or local SD directory (None: generate.model).
    safety_model: Optional[str] = None
    # Aesthetic: the LAION aesthetic predictor head (a local path) on CLIP image embeddings.
    aesthetic_threshold: float = 5.0
    aesthetic_model: Optional[str] = None
    # CLIP image-text similarity to ``clip_prompt`` (``{name}`` = class name); no threshold = score only.
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    clip_threshold: Optional[float] = None
    clip_prompt: str = "a photo of {name}."
    device: str = "auto"
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)

    def validate(self, key: str) -> None:
        _positive(self.min_side, f"{key}.min_side")
        if len(set(self.filters)) != len(self.filters):
            raise ConfigError(f"{key}.filters lists a filter twice: {self.filters}")
        if self.clip_threshold is not None and not -1 <= self.clip_threshold <= 1:
            raise ConfigError(f"{key}.clip_threshold is a cosine in [-1, 1], got {self.clip_threshold}")
        if "{name}" not in self.clip_prompt:
            raise ConfigError(f"{key}.clip_prompt must contain {{name}}, got {self.clip_prompt!r}")


@dataclass
class DedupConfig:
    """Near-duplicate removal among added images (``raugment.dedup``) and the shared pHash settings.

    ``hash_side`` and ``pool`` also drive the hashing of the leakage audit, so that both compare
    hashes made the same way.
    """

    # <= 8 of 64 bits catches resized, re-encoded and slightly cropped copies (crops move pHash
    # most); unrelated images differ in ~32 bits. The audit's radius (< 10) is one step wider.
    max_distance: int = 8
    hash_side: int = 64
    # Optional second test: a pHash pair is a duplicate only if CLIP cosine >= clip_cosine too.
    clip_cosine: Optional[float] = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    device: str = "auto"
    # Hashing runs as Ray Data tasks (no model to hold): num_cpus and batch_size per task are
    # used, concurrency is left to Ray Data.
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    # Inputs up to this many rows are hashed in the driver: Ray Data's start-up costs more.
    local_rows: int = 2000

    def validate(self, key: str) -> None:
        if not 0 <= self.max_distance < 64:
            raise ConfigError(f"{key}.max_distance is a Hamming distance in [0, 63], got {self.max_distance}")
        if self.hash_side < 32:
            raise ConfigError(f"{key}.hash_side must be >= 32 (pHash works on 32x32), got {self.hash_side}")
        if self.clip_cosine is not None and not -1 <= self.clip_cosine <= 1:
            raise ConfigError(f"{key}.clip_cosine is a cosine in [-1, 1], got {self.clip_cosine}")


@dataclass
class AuditConfig:
    """Test-leakage audit (paper 4.5, ``raugment.audit``): Hamming distance < radius to val/test/unused."""

    radius: int = 10
    splits: list[str] = field(default_factory=lambda: ["val", "test", "unused"])
    gallery_limit: int = 500
    thumb_side: int = 128

    def validate(self, key: str) -> None:
        if not 1 <= self.radius <= 64:
            raise ConfigError(f"{key}.radius is a strict Hamming bound in [1, 64], got {self.radius}")
        bad = [s for s in self.splits if s not in ("train", "val", "test", "unused")]
        if bad or not self.splits:
            raise ConfigError(f"{key}.splits must be a non-empty subset of train/val/test/unused, got {self.splits}")
        if self.gallery_limit < 0:
            raise ConfigError(f"{key}.gallery_limit must be >= 0")
        _positive(self.thumb_side, f"{key}.thumb_side")


@dataclass
class FinetuneConfig:
    """Personalisation of the diffusion model (paper 3.1, methods 5-9), one DDP training run.

    ``method`` is a name in ``FINETUNERS`` (ft_conditioning, ft_cluster_conditioning, imagic,
    textual_inversion, pseudoword_dm). ``batch_size`` is per worker; the learning rates ``lr``
    (conditioning / pseudo-word) and ``unet_lr`` are tuned at ``base_batch_size`` and scaled by
    ``sqrt(batch_size * workers / base_batch_size)``. Training stops when the validation loss (on
    ``val_fraction`` of each class's images) has not improved by ``min_delta`` for ``patience``
    epochs, or at ``max_epochs`` (paper: 40; 3 on full ImageNet). Checkpoints: best train loss,
    best validation loss, the epochs in ``keep_epochs``, and Imagic's first ``imagic_epochs``.
    ``clusters`` is k of FT cluster conditioning (k-means on Inception-v3 features with
    ``feature_weights``: a torchvision weights name, a ``.safetensors`` file, or null = random).

    ``runner`` picks where the loop runs (same results for the same seed, so it is not part of
    the stage key): ``worker_group`` leases ``workers`` as a long-lived Ray actor group with one
    DDP process group (no Ray Train start-up; checkpoints in the stage directory, a failed group
    rebuilt up to ``workers.max_failures`` times); ``ray_train`` starts a Ray Train
    ``TorchTrainer`` for the run.
    """

    method: str = "ft_conditioning"
    model: str = "CompVis/stable-diffusion-v1-4"
    revision: Optional[str] = None
    resolution: int = 512
    lr: float = 5e-3
    unet_lr: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    base_batch_size: int = 8
    batch_size: int = 8
    max_epochs: int = 40
    patience: int = 3
    min_delta: float = 0.0
    val_fraction: float = 0.1
    clusters: int = 1
    keep_epochs: list[int] = field(default_factory=lambda: [1, 2, 3])
    imagic_epochs: int = 8
    cache_latents: bool = True
    encode_batch_size: int = 16
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0
    feature_weights: Optional[str] = "IMAGENET1K_V1"
    feature_size: int = 299
    feature_pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=32))
    keep_train_state: bool = False
    runner: Literal["worker_group", "ray_train"] = "worker_group"
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self, key: str) -> None:
        for name in ("batch_size", "base_batch_size", "max_epochs", "patience", "clusters",
                     "imagic_epochs", "encode_batch_size"):
            _positive(getattr(self, name), f"{key}.{name}")
        if self.lr <= 0 or self.unet_lr <= 0:
            raise ConfigError(f"{key}.lr and {key}.unet_lr must be > 0")
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"{key}.resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"{key}.val_fraction must be in [0, 1), got {self.val_fraction}")
        if any(e < 1 for e in self.keep_epochs):
            raise ConfigError(f"{key}.keep_epochs are 1-based epochs, got {self.keep_epochs}")
        if self.feature_size < 75:
            raise ConfigError(f"{key}.feature_size must be >= 75 (Inception-v3's minimum input)")


@dataclass
class SelectConfig:
    """Choosing a fine-tuning checkpoint by the downstream classifier (paper 3.1; ``raugment.select``).

    For each candidate checkpoint the study generates a small set (``images_per_class`` per class),
    assembles it with the original training split at ``ratio`` percent and trains a classifier
    with the ``train`` section; the checkpoint whose classifier has the best validation top-1 is
    the one the method's generation uses (ties: the earlier epoch). Candidates that share a
    snapshot are scored once. The scoring sets go straight from generation to ``assemble`` (no
    filter, dedup or leakage audit). The study runs this for methods 5-9 while
    ``study.select_checkpoint`` is true.

    Attributes:
        candidates: checkpoint names to score: ``best_train``, ``best_val``, ``epoch_001`` ...
            Empty: every checkpoint the method keeps (best train and validation loss and the
            epochs of ``finetune.keep_epochs``, Imagic's first ``finetune.imagic_epochs``) up to
            ``finetune.max_epochs``.
        images_per_class: generated images per class per candidate; null: what ``ratio`` needs
            for the largest class.
        ratio: augmentation ratio (percent) of the scoring classifiers.
        checkpoint: use this checkpoint without scoring (the planner sets it for each
            candidate's scoring chain; set it yourself to pin one).
    """

    candidates: list[str] = field(default_factory=list)
    images_per_class: Optional[int] = None
    ratio: float = 100.0
    checkpoint: Optional[str] = None

    def validate(self, key: str) -> None:
        for i, name in enumerate(self.candidates + ([self.checkpoint] if self.checkpoint else [])):
            if not _is_checkpoint_name(name):
                where = f"{key}.candidates[{i}]" if i < len(self.candidates) else f"{key}.checkpoint"
                raise ConfigError(f"{where}: {name!r} is not a checkpoint name; use best_train, best_val "
                                  "or epoch_NNN (e.g. epoch_002)")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"{key}.candidates has duplicates: {self.candidates}")
        if self.images_per_class is not None:
            _positive(self.images_per_class, f"{key}.images_per_class")
        if not 0 < self.ratio <= 2500:
            raise ConfigError(f"{key}.ratio is a percentage in (0, 2500], got {self.ratio}")


def _is_checkpoint_name(name: str) -> bool:
    """``best_train``, ``best_val`` or ``epoch_NNN`` (the names the fine-tuning stage keeps)."""
    return name in ("best_train", "best_val") or (
        name.startswith("epoch_") and len(name) == 9 and name[6:].isdigit() and int(name[6:]) >= 1)


@dataclass
class AssembleConfig:
    """Original training split + added images at an augmentation ratio (percent).

    ``sources`` names the added methods to mix (empty = every added artifact given); each class's
    quota ``round(n_train * ratio / 100)`` is split evenly between them. Generated pools are
    resampled into ``num_sets`` sets (``set_index`` picks one); retrieved pools give their top
    ranks. ``leakage: remove`` drops the audit's candidate ids first.
    """

    sources: list[str] = field(default_factory=list)
    ratio: float = 100.0
    set_index: int = 0
    num_sets: int = 5
    leakage: Literal["keep", "remove"] = "keep"

    def validate(self, key: str) -> None:
        if not 0 <= self.ratio <= 2500:
            raise ConfigError(f"{key}.ratio is a percentage in [0, 2500], got {self.ratio}")
        _positive(self.num_sets, f"{key}.num_sets")
        if not 0 <= self.set_index < self.num_sets:
            raise ConfigError(f"{key}.set_index must be in [0, {key}.num_sets={self.num_sets}), "
                              f"got {self.set_index}")


@dataclass
class TrainConfig:
    """Classifier training (paper 3, "Data augmentation and classifier training").

    Defaults are the paper's ImageNet recipe (batch 256, LR 0.1, LR / 10 after 10 epochs without a
    validation gain, stop after 20, at most 270 epochs); Caltech256 uses batch 1024, LR 0.003.
    ``batch_size`` is the global batch, split over the workers. ``repeat_sets`` and ``seeds`` make
    ``raugment train`` run the resampled sets x seeds and write mean +- standard error.

    ``runner`` picks where the loop runs (same results for the same seed): ``worker_group`` keeps
    ``workers`` as long-lived Ray actors with one DDP process group, reused by every classifier
    of a study (start-up paid once); ``ray_train`` starts a Ray Train ``TorchTrainer`` per
    classifier (Tune sweeps always use it: they report through Ray Train callbacks).

    GPU options ``amp``, ``channels_last`` and ``compile`` (``torch.compile`` of the model) default
    to ``auto``: bf16 autocast + channels-last + compile when the workers use GPUs
    (``workers.use_gpu``), none of them on CPU (see :meth:`resolved`).
    """

    model: str = "resnet50"
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_epochs: int = 270
    lr_patience: int = 10
    lr_factor: float = 0.1
    stop_patience: int = 20
    image_size: int = 224
    crop_scale_min: float = 0.08
    eval_crop: float = 0.875
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: AutoBool = "auto"
    compile: AutoBool = "auto"
    gpu_decode: bool = False
    loader_workers: int = 4
    shuffle_buffer: int = 4096
    checkpoints_to_keep: int = 2
    keep_ray_checkpoints: bool = False
    runner: Literal["worker_group", "ray_train"] = "worker_group"
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    repeat_sets: int = 1
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self, key: str) -> None:
        _positive(self.batch_size, f"{key}.batch_size")
        _positive(self.max_epochs, f"{key}.max_epochs")
        _positive(self.image_size, f"{key}.image_size")
        _positive(self.repeat_sets, f"{key}.repeat_sets")
        _positive(self.checkpoints_to_keep, f"{key}.checkpoints_to_keep")
        if self.batch_size < self.workers.num_workers:
            raise ConfigError(f"{key}.batch_size={self.batch_size} is the global batch; it must be >= "
                              f"{key}.workers.num_workers={self.workers.num_workers}")
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            raise ConfigError(f"{key}.lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.lr_patience < 1 or self.stop_patience < 1:
            raise ConfigError(f"{key}.lr_patience and {key}.stop_patience must be >= 1")
        if not 0 < self.crop_scale_min <= 1 or not 0 < self.eval_crop <= 1:
            raise ConfigError(f"{key}.crop_scale_min and {key}.eval_crop must be in (0, 1]")
        if self.loader_workers < 0:
            raise ConfigError(f"{key}.loader_workers must be >= 0 (0 = decode in the train worker)")
        if not self.seeds:
            raise ConfigError(f"{key}.seeds must list at least one seed, e.g. [0]")

    def run_device(self) -> str:
        """``"cuda"`` when the workers use GPUs, else ``"cpu"`` (Ray Train's device per worker)."""
        return "cuda" if self.workers.use_gpu else "cpu"

    def resolved(self, device: Optional[str] = None) -> "TrainConfig":
        """A copy with ``amp``, ``channels_last`` and ``compile`` concrete for ``device`` (default
        :meth:`run_device`): GPU -> bf16, channels-last, compiled (ResNet-50's fast path on
        Ampere/Hopper; bf16 needs no loss scaling); CPU -> float32, contiguous, eager."""
        device = device or self.run_device()
        return dataclasses.replace(self, amp=_auto(self.amp, device, "bf16", "none"),
                                   channels_last=_auto(self.channels_last, device, True, False),
                                   compile=_auto(self.compile, device, True, False))


@dataclass
class TuneConfig:
    """Ray Tune sweep over dotted config keys, e.g. ``{"train.lr": [0.1, 0.03]}`` (a grid).

    ``scheduler: asha`` stops weak trials early on ``metric`` per epoch (``grace_period`` epochs
    at least, ``reduction_factor`` as in ASHA); ``fifo`` runs every trial to its end.
    """

    space: dict[str, list[Any]] = field(default_factory=dict)
    num_samples: int = 1
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = 1
    grace_period: int = 5
    reduction_factor: int = 3
    trial_cpus: float = 0.01

    def validate(self, key: str) -> None:
        _positive(self.num_samples, f"{key}.num_samples")
        _positive(self.max_concurrent, f"{key}.max_concurrent")
        _positive(self.grace_period, f"{key}.grace_period")
        if self.reduction_factor < 2:
            raise ConfigError(f"{key}.reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.trial_cpus <= 0:
            raise ConfigError(f"{key}.trial_cpus must be > 0 (Ray refuses 0); try 0.01")
        for name, values in self.space.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{key}.space.{name} must be a non-empty list of values")


@dataclass
class ReportConfig:
    """The study report (HTML + Markdown + ``report.json``), one self-contained folder."""

    title: str = "raugment study"
    samples_per_cell: int = 4
    grid_classes: int = 8
    thumb_size: int = 64
    histogram_bins: int = 20
    upper_bound: Optional[dict[str, float]] = None  # row label -> top-1 %, e.g. {"20% ImageNet": 70.2}
    # A `raugment models train-mini` artifact (the demo sets it): its CLIP's precision@n and its
    # models' training cost go into the report.
    mini_models: Optional[str] = None

    def validate(self, key: str) -> None:
        _positive(self.samples_per_cell, f"{key}.samples_per_cell")
        _positive(self.grid_classes, f"{key}.grid_classes")
        _positive(self.thumb_size, f"{key}.thumb_size")
        _positive(self.histogram_bins, f"{key}.histogram_bins")


@dataclass
class StudyConfig:
    """Datasets x methods x augmentation ratios x resampled sets (x seeds) of one study.

    The planner turns this into the set of stage runs, sharing every common artifact: one
    generation pool of ``pool_factor x largest ratio`` images per class serves all ratios and sets
    (it overrides ``generate.images_per_class``), one retrieval at the largest ratio's quota serves
    the smaller ones (it overrides ``retrieve.images_per_class``).

    Attributes:
        methods: method names (``retrieval``, ``simple``, ``clip_templates``, ``ft_conditioning``,
            ...) or names of ``variants``.
        ratios: augmentation ratios in percent of each class's training images.
        sets: resampled sets per method and ratio (paper: 5); each is one classifier.
        seeds: classifier seeds; each (method, ratio, set) is trained once per seed. Empty: the
            seed of set ``s`` is ``train.seeds[0] + s``.
        baseline: also train on the original data alone (one run per set).
        datasets: name -> dotted overrides for that dataset (``{"dataset.fraction": 0.1}``); empty
            means the one dataset of the ``dataset`` section, named ``default``.
        variants: name -> ``{"method": base method, "pipeline": optional, dotted overrides...}``,
            e.g. ``ft_cluster_k5: {method: ft_cluster_conditioning, finetune.clusters: 5}``.
        pool_factor: generated images per class per added image needed by the largest ratio
            (paper: 390 per class for at most 130 training images = 3x).
        filter/dedup/audit: run these stages on added images.
        costs: per-image cost overrides for the planner (see ``raugment.planner.DEFAULT_COSTS``).
        expected: planning hints used before the dataset stage has run: ``classes``,
            ``train_images``, ``max_per_class``.
        node_gpus/node_cpus: the node that the plan's wall-time estimate is for.
        parallel: stage runs of ``parallel_stages`` kept in flight at once (each still takes
            the resources its own section asks for); other stages run one at a time, so Ray
            Data actor pools never wait on each other for CPUs.
        keep_going: a failed stage run leaves out what depends on it and the study goes on
            (the report lists it); false: the first failure ends the study.
        select_checkpoint: pick each fine-tuned method's (5-9) checkpoint by the validation
            accuracy of a classifier trained on a small set generated from it (the ``select``
            section); false: generate from the best-validation-loss checkpoint.
    """

    methods: list[str] = field(default_factory=lambda: ["retrieval", "simple"])
    ratios: list[float] = field(default_factory=lambda: [100.0])
    sets: int = 5
    seeds: list[int] = field(default_factory=list)
    baseline: bool = True
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    pool_factor: float = 3.0
    filter: bool = True
    dedup: bool = True
    audit: bool = True
    costs: dict[str, float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    node_gpus: int = 8
    node_cpus: int = 64
    parallel: int = 1
    parallel_stages: list[str] = field(default_factory=lambda: ["train"])
    keep_going: bool = True
    select_checkpoint: bool = True

    def validate(self, key: str) -> None:
        _positive(self.sets, f"{key}.sets")
        _positive(self.parallel, f"{key}.parallel")
        _positive(self.pool_factor, f"{key}.pool_factor")
        _positive(self.node_gpus, f"{key}.node_gpus")
        _positive(self.node_cpus, f"{key}.node_cpus")
        if not self.ratios:
            raise ConfigError(f"{key}.ratios is empty; give at least one ratio, e.g. [100]")
        for i, r in enumerate(self.ratios):
            if not 0 < r <= 2500:
                raise ConfigError(f"{key}.ratios[{i}] is a percentage in (0, 2500], got {r}")
        if not self.methods and not self.baseline:
            raise ConfigError(f"{key}: no methods and baseline=false leaves nothing to run")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"{key}.methods has duplicates: {self.methods}")
        for name, variant in self.variants.items():
            if not isinstance(variant, dict):
                raise ConfigError(f"{key}.variants.{name} must be a mapping of dotted overrides")
        for name, hint in self.expected.items():
            if name not in ("classes", "train_images", "max_per_class"):
                raise ConfigError(f"{key}.expected.{name}: unknown hint; known: classes, "
                                  "train_images, max_per_class")


@dataclass
class MiniConfig:
    """The mini-world and its small trained models (``raugment models train-mini``, the demo).

    The world's labelled classes and test split are the synthetic dataset's (``dataset.synthetic``,
    ``dataset.seed``); this section sets the captioned pool drawn around them and the training of
    the small CLIP and the small diffusion model on that pool.
    """

    pool_per_class: int = 100       # captioned pool images per class
    distractors: int = 60           # pool images of other colour/shape pairs
    near_duplicates: int = 2        # per class: slightly altered copies of test images put in the pool
    heldout_per_class: int = 30     # a second pool (another seed) the CLIP never sees: precision@n
    precision_n: int = 20           # n of precision@n
    # The CLIP also trains on a larger training-only pool of the same world (another seed, no
    # faults; never served or indexed): more varied data is the cure for its over-fitting on the
    # served pool. 0 + 0 trains on the served pool alone.
    # Distractors (other colour/shape pairs) are what teaches shape: a class shares its colour only
    # with them, and same-colour distractors were the CLIP's confusions (validation seeds 7, 8).
    clip_train_per_class: int = 300
    clip_train_distractors: int = 1800
    clip_shift: int = 3             # augmentation: random translation by up to this many pixels (+ flips)
    clip_steps: int = 250           # a step count, not a time limit: the same model on any machine
    clip_batch_size: int = 64
    clip_lr: float = 2e-3
    # Warm-up then cosine decay: at a constant 2e-3 one validation seed (9) collapsed blue onto green.
    clip_warmup_steps: int = 25
    clip_cosine: bool = True
    clip_caption_positives: bool = True  # same-caption pairs in a batch count as matches, not negatives
    diffusion: bool = True          # False trains only the CLIP (tests, CLIP-only experiments)
    diffusion_steps: int = 150      # UNet steps of raugment.models.mini_diffusion (its default)
    num_threads: int = 1            # torch threads while training

    def validate(self, key: str) -> None:
        for name in ("pool_per_class", "heldout_per_class", "precision_n", "clip_steps", "clip_batch_size",
                     "diffusion_steps", "num_threads"):
            _positive(getattr(self, name), f"{key}.{name}")
        _positive(self.clip_lr, f"{key}.clip_lr")
        if self.distractors < 0 or self.near_duplicates < 0:
            raise ConfigError(f"{key}.distractors and {key}.near_duplicates must be >= 0")
        for name in ("clip_train_per_class", "clip_train_distractors", "clip_shift", "clip_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")


@dataclass
class Config:
    """The whole configuration; each stage reads its own section."""

    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    mini: MiniConfig = field(default_factory=MiniConfig)


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------------


def _positive(value: int | float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if all(a is bool or typing.get_origin(a) is Literal for a in args if a is not type(None)):
            choices = [c for a in args for c in ((True, False) if a is bool else typing.get_args(a))]
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; known keys{' of ' + prefix if prefix else ''}: "
            f"{', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    obj = cls(**kwargs)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{prefix}.{f.name}" if prefix else f.name)
    if hasattr(obj, "validate"):
        obj.validate(prefix)


def from_dict(data: dict | None, cls: type = Config) -> Any:
    """Build and validate a config (or one section, via ``cls``) from plain data."""
    obj = _build(cls, dict(data or {}), "" if cls is Config else _section_name(cls))
    _validate(obj, "" if cls is Config else _section_name(cls))
    return obj


def _section_name(cls: type) -> str:
    for f in dataclasses.fields(Config):
        if f.type == cls.__name__ or f.type is cls:
            return f.name
    return cls.__name__


def to_dict(cfg: Any) -> dict:
    """Plain-data form of a config or section (what is saved and hashed)."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` overrides to plain config data (returns a new dict)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a clear error if the file is missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults <- ``base`` <- YAML file <- overrides, validated."""
    data: dict = copy.deepcopy(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides)
    return from_dict(data, Config)


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted-key overrides given as a mapping (used by sweeps)."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown key {key!r}")
        node[parts[-1]] = value
    return from_dict(data, Config)


def dump_yaml(cfg: Any) -> str:
    """YAML text of a config or section."""
    return yaml.safe_dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=False)


def canonical_json(data: Any) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace, floats as repr."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def section_hash(section: Any, inputs: dict[str, str] | None = None, length: int = 12) -> str:
    """Hash of a config section (dataclass or plain data) and its inputs' keys."""
    payload = {"config": to_dict(section) if dataclasses.is_dataclass(section) else section,
               "inputs": dict(sorted((inputs or {}).items()))}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:length]
