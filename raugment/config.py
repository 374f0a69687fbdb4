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
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@dataclass
class ActorPoolConfig:
    """Resources of one Ray Data actor pool (``map_batches`` with a callable class).

    On a 2-CPU box an actor pool that holds every CPU starves its own read tasks (STACK-NOTES,
    hang 1), hence fractional CPUs by default.
    """

    concurrency: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    batch_size: int = 8

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


@dataclass
class SyntheticConfig:
    """The embedded demo dataset: procedurally drawn shapes a small CNN can learn."""

    num_classes: int = 4
    train_per_class: int = 60
    test_per_class: int = 20
    size: int = 32
    imbalance: float = 0.0  # 0 = balanced; 0.5 = last class has half the images of the first


@dataclass
class DatasetConfig:
    """The target dataset and its splits (paper section 3, "Dataset")."""

    source: Literal["synthetic", "imagefolder", "parquet"] = "synthetic"
    path: Optional[str] = None
    test_path: Optional[str] = None
    protocol: Literal["subsample", "split_80_10_10", "full"] = "subsample"
    fraction: float = 0.1
    class_names: Literal["auto", "wordnet", "folder"] = "auto"
    exclude_classes: list[str] = field(default_factory=list)
    max_side: Optional[int] = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, key: str) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{key}.fraction must be in (0, 1], got {self.fraction}")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"{key}.path is required when {key}.source={self.source!r}")


@dataclass
class GenerateConfig:
    """Diffusion generation (paper 3.1, prompt conditioning and Boomerang)."""

    method: str = "simple"
    model: str = "CompVis/stable-diffusion-v1-4"
    revision: Optional[str] = None
    images_per_class: int = 390
    num_sets: int = 5
    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "pndm"
    boomerang_strength: float = 0.2
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"
    sdpa: bool = True
    channels_last: bool = False
    compile: bool = False
    vae_slicing: bool = False
    safety_checker: bool = True
    max_attempts_per_image: int = 10
    conditioning: Optional[str] = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(num_gpus=1.0, batch_size=8))

    def validate(self, key: str) -> None:
        _positive(self.images_per_class, f"{key}.images_per_class")
        _positive(self.steps, f"{key}.steps")
        _positive(self.num_sets, f"{key}.num_sets")
        for dim in ("height", "width"):
            v = getattr(self, dim)
            if v <= 0 or v % 8:
                raise ConfigError(f"{key}.{dim} must be a positive multiple of 8, got {v}")
        if not 0 < self.boomerang_strength <= 1:
            raise ConfigError(f"{key}.boomerang_strength must be in (0, 1]")


@dataclass
class IndexConfig:
    """Building a local CLIP kNN index over a captioned pool."""

    source: Literal["images", "embeddings"] = "images"
    path: Optional[str] = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    index_type: str = "Flat"
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=64))


@dataclass
class DownloadConfig:
    """Untrusted downloads (DESIGN section 8)."""

    actors: int = 2
    num_cpus: float = 0.25
    concurrency_per_actor: int = 32
    batch_size: int = 64
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_redirects: int = 5
    allow_private: bool = False
    resize_max_side: Optional[int] = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    user_agent: str = "raugment/0.1 (+research data augmentation)"


@dataclass
class RetrieveConfig:
    """CLIP kNN retrieval with quota-driven growth of k (paper 3.1, "Laion nearest neighbor")."""

    backend: str = "local"
    index: Optional[str] = None
    service_url: Optional[str] = None
    indice_name: str = "laion5B-L-14"
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    prompt: str = "simple_nows"
    images_per_class: int = 130
    k_start_factor: float = 1.4
    k_max_factor: float = 14.0
    k_growth: float = 2.0
    aesthetic_threshold: Optional[float] = 5.0
    drop_nsfw: bool = True
    deduplicate: bool = True
    timeout_s: float = 30.0
    retries: int = 3
    download: DownloadConfig = field(default_factory=DownloadConfig)

    def validate(self, key: str) -> None:
        _positive(self.images_per_class, f"{key}.images_per_class")
        if self.k_start_factor < 1 or self.k_max_factor < self.k_start_factor:
            raise ConfigError(f"{key}: need 1 <= k_start_factor <= k_max_factor")


@dataclass
class FilterConfig:
    """Filters applied to added images; each dropped row keeps its reason."""

    filters: list[str] = field(default_factory=lambda: ["nsfw", "aesthetic", "min_size"])
    aesthetic_threshold: float = 5.0
    clip_threshold: Optional[float] = None
    min_side: int = 32
    safety_model: Optional[str] = None
    clip_model: Optional[str] = None
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)


@dataclass
class DedupConfig:
    """Near-duplicate removal among added images (64-bit pHash, Hamming <= max_distance)."""

    max_distance: int = 4
    hash_side: int = 64
    clip_cosine: Optional[float] = None


@dataclass
class AuditConfig:
    """Test-leakage audit (paper 4.5): Hamming distance < radius to val/test/unused images."""

    radius: int = 10
    splits: list[str] = field(default_factory=lambda: ["val", "test", "unused"])
    remove_candidates: bool = False
    gallery_limit: int = 500


@dataclass
class FinetuneConfig:
    """Personalisation of the diffusion model (paper 3.1, methods 5-9)."""

    method: str = "ft_conditioning"
    model: str = "CompVis/stable-diffusion-v1-4"
    revision: Optional[str] = None
    resolution: int = 512
    lr: float = 5e-3
    base_batch_size: int = 8
    batch_size: int = 8
    max_epochs: int = 40
    patience: int = 3
    val_fraction: float = 0.1
    clusters: int = 1
    keep_epochs: list[int] = field(default_factory=lambda: [1, 2, 3])
    cache_latents: bool = True
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    workers: WorkersConfig = field(default_factory=WorkersConfig)


@dataclass
class AssembleConfig:
    """Original training split + added images at an augmentation ratio (percent)."""

    sources: list[str] = field(default_factory=list)
    ratio: float = 100.0
    set_index: int = 0
    leakage: Literal["keep", "remove"] = "keep"

    def validate(self, key: str) -> None:
        if not 0 <= self.ratio <= 2500:
            raise ConfigError(f"{key}.ratio is a percentage in [0, 2500], got {self.ratio}")


@dataclass
class TrainConfig:
    """Classifier training (paper 3, "Data augmentation and classifier training")."""

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
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    gpu_decode: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self, key: str) -> None:
        _positive(self.batch_size, f"{key}.batch_size")
        _positive(self.max_epochs, f"{key}.max_epochs")
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0, got {self.lr}")


@dataclass
class TuneConfig:
    """Ray Tune sweep over dotted config keys, e.g. ``{"train.lr": [0.1, 0.03]}``."""

    space: dict[str, list[Any]] = field(default_factory=dict)
    num_samples: int = 1
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = 1


@dataclass
class ReportConfig:
    """The study report (HTML + Markdown)."""

    title: str = "raugment study"
    samples_per_cell: int = 4
    upper_bound: Optional[dict[str, float]] = None


@dataclass
class StudyConfig:
    """Methods x ratios x resampled sets of one study (issue: the study)."""

    methods: list[str] = field(default_factory=lambda: ["retrieval", "simple"])
    ratios: list[float] = field(default_factory=lambda: [100.0])
    sets: int = 5
    baseline: bool = True
    costs: dict[str, float] = field(default_factory=dict)


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
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


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
