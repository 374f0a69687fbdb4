"""Typed configuration machinery: sections as dataclasses, YAML + ``--set a.b=c`` overrides.

Each stage package owns its section (``raugment/stages/<stage>/config.py``); ``raugment.config``
lists them all in :class:`raugment.config.Config`. This module holds what every section uses: the
errors, loading and validation, hashing, the resource sections (actor pools, worker groups), the
``run`` and ``cluster`` sections, and :func:`with_plugins`, which adds the settings that a stage's
plug-ins declare to its section. Standard library + PyYAML only: ``raugment --help`` and config
validation never import torch or Ray. Unknown keys, wrong types and bad values raise
:class:`ConfigError` naming the dotted key and the fix, before any work starts.

A stage's output directory is keyed by the hash of its section (plus its inputs' keys), see
:func:`section_hash` and :mod:`raugment.core.storage`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class InputError(ValueError):
    """An input file or directory is missing, unreadable or malformed; the message names it and the fix."""


class PreflightError(ConfigError):
    """Several problems found by one preflight (each a :class:`ConfigError` or :class:`InputError`),
    reported together so that one run of ``--dry-run`` lists all of them."""

    def __init__(self, problems: list[ValueError]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problems: "
                         + "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1)))

    @staticmethod
    def raise_if(problems: list[ValueError]) -> None:
        """Raise the one problem as it is, or several as one :class:`PreflightError`."""
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise PreflightError(problems)


DIFFUSERS_HINT = "expected a diffusers model directory; `raugment models tiny DIR` writes a tiny one in DIR/sd"


def looks_local(ref: str) -> bool:
    """Whether a model reference is a local path rather than a hub id (``org/name``)."""
    p = Path(ref).expanduser()
    return p.exists() or p.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1


def check_local_model(ref: str | None, key: str, marker: str, hint: str = "", hub_file: str | None = None) -> None:
    """A model reference must be loadable without surprises mid-run.

    A local path must be there and hold ``marker``; a hub id (``org/name``) must be in the local
    Hugging Face cache when the hub is offline (:func:`check_hub_cached`, file ``hub_file``,
    default ``marker``). Online, a hub id resolves (and downloads) when the model is loaded.
    """
    if not ref:
        return
    if not looks_local(ref):
        check_hub_cached(ref, key, hub_file or marker)
        return
    p = Path(ref).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {ref!r} does not exist{'; ' + hint if hint else ''}")
    if marker and p.is_dir() and not (p / marker).exists():
        raise ConfigError(f"{key}: {ref!r} has no {marker}{'; ' + hint if hint else ''}")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the Hugging Face hub (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as ``huggingface_hub`` resolves it from the environment now
    (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def check_hub_cached(repo_id: str, key: str, filename: str) -> None:
    """Offline, a hub id must have ``filename`` in the local cache (no network is asked).

    Without it the model would fail to load inside a Ray actor, mid-run, with a remote traceback;
    here it is one line naming ``key`` before anything starts. Online, nothing is checked.
    """
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache))
    if not isinstance(found, str):
        raise ConfigError(f"{key}: hub model {repo_id!r} is not in the local Hugging Face cache ({cache}: no "
                          f"{filename}) and HF_HUB_OFFLINE=1 forbids downloading it; download it once with "
                          f"`hf download {repo_id}` where the hub is reachable, or set {key} to a local "
                          "directory")


# GPU options that default to "auto": resolved from the device a stage's workers will run on
# (``"cuda..."`` -> the GPU setting, anything else -> the CPU one) by each section's
# ``resolved(device)``, so one config is fast on a GPU and exact on a CPU.
AUTO = "auto"
AutoBool = bool | Literal["auto"]


def on_gpu(device: str) -> bool:
    """Whether a torch device string names a GPU (``cuda``, ``cuda:1``)."""
    return str(device).startswith("cuda")


def resolve_auto(value: Any, device: str, gpu: Any, cpu: Any) -> Any:
    """``value``, or for ``auto`` the GPU or CPU setting of ``device``."""
    return (gpu if on_gpu(device) else cpu) if value == AUTO else value


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@dataclass
class ActorPoolConfig:
    """Resources of one actor pool: a ``cluster.ActorGroup`` (generate, filter, index, retrieval's
    pools: ``concurrency`` actors) or a Ray Data ``map_batches`` actor pool (Inception features);
    ``batch_size`` is the items per model call.

    On a 2-CPU box an actor pool that holds every CPU starves its own read tasks (Ray
    hangs silently), hence fractional CPUs by default. Inside a study a group is kept between stage runs
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
        positive(self.concurrency, f"{key}.concurrency")
        at_most(self.concurrency, MAX_ACTORS, f"{key}.concurrency", ACTORS_REASON)
        positive(self.batch_size, f"{key}.batch_size")
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
        positive(self.num_workers, f"{key}.num_workers")
        at_most(self.num_workers, MAX_ACTORS, f"{key}.num_workers", ACTORS_REASON)
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

    def validate(self, key: str) -> None:
        levels = [n for n in logging.getLevelNamesMapping() if n not in ("WARN", "FATAL", "NOTSET")]
        if self.log_level.upper() not in levels:
            raise ConfigError(f"{key}.log_level: {self.log_level!r} is not a logging level; use one of "
                              f"{', '.join(levels)}")
        # The first part of the path that exists must be a directory (the rest is created).
        root = Path(self.root).expanduser()
        for part in (root, *root.parents):
            if part.exists():
                if not part.is_dir():
                    raise ConfigError(f"{key}.root: {str(part)!r} is a file, not a directory; point "
                                      f"{key}.root at a directory (it is created if missing)")
                break


@dataclass
class ClusterConfig:
    """How to reach Ray. ``address=None`` starts (or joins, under ``ray job submit``) a cluster."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    temp_dir: str | None = None
    include_dashboard: bool = True
    object_store_memory: int | None = None
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


# --------------------------------------------------------------------------------------------
# Plug-in settings: a plug-in declares its own keys; its stage's section carries them
# --------------------------------------------------------------------------------------------

S = TypeVar("S", bound="PluginSettings")


class PluginSettings:
    """Base of the config keys one plug-in declares (a dataclass; every field has a default).

    A plug-in module defines ``@dataclass class Settings(PluginSettings)`` and names it on its
    registered class (``settings = Settings``); :func:`with_plugins` adds those fields to its
    stage's section, so they are written flat in YAML (``filter.aesthetic_threshold``), checked,
    hashed and listed like the section's own keys. A ``validate(self, key)`` method checks them.
    The plug-in reads them with ``Settings.of(section)`` and changes them with
    ``Settings.replace_in(section, key=value)``.
    """

    @classmethod
    def of(cls: type[S], section: Any) -> S:
        """``section`` typed as these settings (it carries them when its stage composed them)."""
        if not isinstance(section, cls):
            raise TypeError(f"{type(section).__name__} does not carry the keys of {cls.__qualname__}; "
                            "declare the section with @with_plugins(<the plug-in registry>)")
        return section

    @classmethod
    def replace_in(cls, section: C, **changes: Any) -> C:
        """A copy of ``section`` with some of these settings' keys changed (``dataclasses.replace``).

        Type checkers see a section as its own fields only, so ``dataclasses.replace(section,
        <plug-in key>=...)`` does not check; this does, at run time: only these settings' keys.
        """
        cls.of(section)
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cast(Any, cls))})
        if unknown:
            raise TypeError(f"{cls.__qualname__} declares no key(s) {unknown}")
        return cast(C, dataclasses.replace(cast(Any, section), **changes))


def with_plugins(registry: Any) -> Callable[[type], type]:
    """Class decorator for a stage's section: add the settings of every plug-in in ``registry``.

    The result is a dataclass with the section's fields plus each plug-in's (same class name and
    module, so it pickles by reference); ``validate`` runs the section's and every plug-in's.
    Two plug-ins declaring the same key, or a plug-in repeating a section key, is an error at import.
    """
    def compose(base: type) -> type:
        settings = list(registry.settings())
        if not settings:
            return base
        owner = {f.name: base.__qualname__ for f in dataclasses.fields(base)}
        for s in settings:
            for f in dataclasses.fields(s):
                if f.name in owner:
                    raise TypeError(f"{s.__module__}.{s.__qualname__} declares {f.name!r}, which "
                                    f"{owner[f.name]} declares already; rename one of them")
                owner[f.name] = f"{s.__module__}.{s.__qualname__}"
        parts = (base, *settings)

        def validate(self: Any, key: str) -> None:
            for part in parts:
                check = part.__dict__.get("validate")
                if check is not None:
                    check(self, key)

        composed = dataclasses.make_dataclass(base.__name__, [], bases=(*reversed(settings), base),
                                              namespace={"validate": validate, "__section_base__": base,
                                                         "__doc__": base.__doc__})
        composed.__module__, composed.__qualname__ = base.__module__, base.__qualname__
        return composed

    return compose


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------------


def positive(value: int | float, key: str) -> None:
    """A ConfigError naming ``key`` unless ``value`` > 0."""
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def at_most(value: int | float, limit: int | float, key: str, reason: str) -> None:
    """A ConfigError naming ``key``, the bound and why, unless ``value`` <= ``limit``."""
    if value > limit:
        raise ConfigError(f"{key} must be <= {limit} ({reason}), got {value}")


def no_duplicates(values: list[Any], key: str, reason: str) -> None:
    """A ConfigError naming ``key`` and the repeated values if ``values`` has any twice."""
    seen: set[Any] = set()
    repeated: list[Any] = []
    for v in values:
        (repeated if v in seen else []).append(v)
        seen.add(v)
    if repeated:
        raise ConfigError(f"{key} lists {', '.join(map(repr, dict.fromkeys(repeated)))} more than once "
                          f"({reason}); list each once")


# Actors of one pool or workers of one group: one process each, far beyond any cluster this runs on.
MAX_ACTORS = 4096
ACTORS_REASON = "one process each; more than any cluster has slots for"
# Image sides for models (generation, training): beyond this only a typo (and memory).
MAX_IMAGE_SIDE = 4096

# Resampled sets / repeats per method and ratio: each is a trained classifier (the paper: 5).
MAX_SETS = 100
SETS_REASON = "each set trains one more classifier per method and ratio; the paper uses 5"


def _check_finite(value: Any, key: str) -> None:
    """A ConfigError naming ``key`` for a NaN or infinite float anywhere in ``value``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number; give a finite value")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        _check_finite(value, key)  # e.g. dotted overrides of study.variants / tune.space values
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a section class (never an instance)
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
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):  # NaN trains at chance; inf crashes deep inside a stage
            raise ConfigError(f"{key}: {value} is not a finite number; give a finite value")
        return number
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


# section class -> its key in the whole config (``raugment.config`` fills this in)
SECTION_NAMES: dict[type, str] = {}


def section_name(cls: type) -> str:
    """The key of section class ``cls`` in the whole config ("" for the whole config itself)."""
    return SECTION_NAMES.get(getattr(cls, "__section_base__", cls), cls.__name__)


def from_dict(data: dict | None, cls: type) -> Any:
    """Build and validate a config (or one section, via ``cls``) from plain data."""
    prefix = section_name(cls)
    obj = _build(cls, dict(data or {}), prefix)
    _validate(obj, prefix)
    return obj


def to_dict(cfg: Any) -> dict:
    """Plain-data form of a config or section (what is saved and hashed)."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01). Values are parsed as YAML (:class:`StrictLoader`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except StrictYAMLError as exc:
        raise ConfigError(f"override {key}: {exc}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {yaml_problem(exc)}") from None
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


class StrictYAMLError(yaml.YAMLError):
    """YAML that parses but that a config refuses: a repeated key, an anchor or alias, a merge key."""

    def __init__(self, problem: str, mark: Any):
        self.problem, self.mark = problem, mark
        super().__init__(f"line {mark.line + 1}: {problem}" if mark is not None else problem)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what is only ever a mistake or an attack in a config.

    * a key given twice in one mapping, at any depth (PyYAML keeps the last one silently: a
      second ``lr:`` or a second ``study:`` section replaced the first);
    * anchors, aliases and merge keys (``&a``, ``*a``, ``<<``): a config has no use for them, and
      nested aliases expand exponentially (under 1 KB of YAML took 35 s and 700 MB at 7 levels).
      They are refused when composed, before anything is expanded.

    Errors are :class:`StrictYAMLError` with the line.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise StrictYAMLError(f"YAML anchors and aliases ({sign}{anchor}) are not accepted in a config; "
                                  "write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise StrictYAMLError("YAML merge keys (<<) are not accepted in a config; write the keys "
                                          "out", key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # unhashable: SafeLoader's own error names it
                    continue
                if seen is not None:
                    raise StrictYAMLError(f"key {key!r} is given twice (first on line {seen + 1}); keep one",
                                          key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """Parse config YAML with :class:`StrictLoader` (``yaml.load``, never an unsafe loader)."""
    return yaml.load(text, Loader=StrictLoader)


def yaml_problem(exc: BaseException) -> str:
    """One line from a YAML error: where (line, column) and what."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return " ".join(str(exc).split())


def read_yaml(path: str | Path) -> dict:
    """Read a config YAML mapping (:class:`StrictLoader`); a clear one-line error naming the file if
    it is missing, not UTF-8, not valid YAML, repeats a key, uses anchors, or is not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                         f"offset {exc.start}); re-encode it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        data = load_yaml_text(text) or {}
    except StrictYAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} {exc}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    return data


def load_data(path: str | Path | None = None, overrides: list[str] | None = None,
              base: dict | None = None) -> dict:
    """Plain config data: ``base`` <- YAML file <- overrides (not validated yet)."""
    data: dict = copy.deepcopy(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    return apply_overrides(data, overrides)


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def with_overrides(cfg: C, overrides: dict[str, Any]) -> C:
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
    return from_dict(data, type(cfg))


def dump_yaml(cfg: Any) -> str:
    """YAML text of a config or section."""
    return yaml.dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, Dumper=_NoAliasDumper,
                     sort_keys=False)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value seen twice out twice: what ``raugment config`` prints reads back (no aliases)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def canonical_json(data: Any) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace, floats as repr."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def section_hash(section: Any, inputs: dict[str, str] | None = None, length: int = 12) -> str:
    """Hash of a config section (dataclass or plain data) and its inputs' keys."""
    payload = {"config": to_dict(section) if dataclasses.is_dataclass(section) else section,
               "inputs": dict(sorted((inputs or {}).items()))}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:length]
