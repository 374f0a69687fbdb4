"""The stage contract: Parquet shards + ``stats.json`` + ``_SUCCESS``, keyed by config and inputs.

Layout of one stage output::

    <root>/<stage>/<key>/
        config.yaml            resolved config section + input keys (written first)
        <table>/part-*.parquet one or more tables of shards ("images", "failures", "classes", ...)
        stats.json             counts, failures by reason, wall/CPU/GPU seconds: totals, and
                               ``usage`` by where they were spent (driver, actors, workers)
        _SUCCESS               written last; only its presence means "complete"

``key`` = hash(config section, inputs' keys): change a setting and only what depends on it re-runs.
Every shard is written to a hidden temporary name and renamed into place, so a killed stage leaves
either whole shards or nothing; a re-run deletes stray temporaries and (for resumable stages) skips
items whose ids are already in finished shards.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import resource
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raugment.core.config import InputError, dump_yaml, section_hash, to_dict

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
STATS = "stats.json"
CONFIG = "config.yaml"
TMP_PREFIX = ".tmp-"


def _cpu_seconds() -> float:
    self_ = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


_CHARGE_LOCK = threading.Lock()
# The stage run whose body this thread (context) is executing: actor pools and worker groups
# charge the CPU/GPU seconds their processes measured to it (:func:`charge`).
_CURRENT_RUN: contextvars.ContextVar[StageRun | None] = contextvars.ContextVar("raugment_stage_run",
                                                                                default=None)


def charge(where: str, cpu_s: float, gpu_s: float = 0.0, calls: int = 1) -> bool:
    """Charge device-seconds measured in another process (a Ray actor, a DDP rank) to the stage
    run in progress in this thread; False (nothing recorded) outside a stage run."""
    run = _CURRENT_RUN.get()
    if run is None:
        return False
    run.stats.charge(where, cpu_s, gpu_s, calls)
    return True


@dataclass
class Stats:
    """What a stage did: counts, failures by reason, time. Saved as ``stats.json``."""

    counts: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # where the CPU/GPU seconds were spent: "driver" (this process), "actors" (actor-pool calls),
    # "workers" (DDP worker-group ranks), "tasks" (Ray Data callables) -> {cpu_s, gpu_s, calls}
    usage: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += int(n)

    def charge(self, where: str, cpu_s: float, gpu_s: float = 0.0, calls: int = 1) -> None:
        """Add device-seconds spent by ``where`` (its own process's measurement) to the totals."""
        with _CHARGE_LOCK:
            self.cpu_s += max(0.0, float(cpu_s))
            self.gpu_s += max(0.0, float(gpu_s))
            u = self.usage.setdefault(where, {"cpu_s": 0.0, "gpu_s": 0.0, "calls": 0})
            u["cpu_s"] += max(0.0, float(cpu_s))
            u["gpu_s"] += max(0.0, float(gpu_s))
            u["calls"] += int(calls)

    def fail(self, reason: str, n: int = 1) -> None:
        self.failures[reason] += int(n)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "failures": dict(self.failures),
                "wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3),
                "gpu_s": round(self.gpu_s, 3),
                "usage": {k: {"cpu_s": round(v["cpu_s"], 3), "gpu_s": round(v["gpu_s"], 3),
                              "calls": int(v["calls"])} for k, v in sorted(self.usage.items())},
                **self.extra}

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "nothing counted"
        fails = sum(self.failures.values())
        reasons = ", ".join(f"{k}={v}" for k, v in self.failures.most_common(5))
        return f"{counts}; {fails} failed{' (' + reasons + ')' if fails else ''}; {self.wall_s:.1f} s"


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` through a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}.parquet"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def write_text_atomic(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Fill a temporary sibling directory; on success it replaces ``final`` (an old one is removed).

    A writer killed half-way leaves only a ``.tmp-*`` directory, which a stage's restart clean-up
    removes; ``final`` is either the old complete directory or the new one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def read_parquet(path: str | Path, columns: list[str] | None = None, *, fix: str = "",
                 filters: Any = None) -> pa.Table:
    """``pq.read_table`` whose failure on a corrupt or truncated file names the file and the fix.

    Raises:
        InputError: the file cannot be read as Parquet (or lacks a requested column).
    """
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read Parquet file {str(path)!r}: {exc}"
                         f"{'; ' + fix if fix else ''}") from None


def read_parquet_schema(path: str | Path, *, fix: str = "") -> pa.Schema:
    """``pq.read_schema`` with the same clear error as :func:`read_parquet`."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read Parquet file {str(path)!r}: {exc}"
                         f"{'; ' + fix if fix else ''}") from None


def _parts(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("part-*.parquet") if not p.name.startswith(TMP_PREFIX))


@dataclass(frozen=True)
class Artifact:
    """A finished stage output (or a directory being written by a running stage)."""

    stage: str
    key: str
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        """An existing complete artifact directory; an error if it is not complete."""
        p = Path(path).resolve()
        if not (p / SUCCESS).exists():
            raise ValueError(f"{p} is not a complete stage output (no {SUCCESS}); re-run its stage")
        art = cls(stage=p.parent.name, key=p.name, path=p)
        art.check_shards()
        return art

    def check_shards(self) -> None:
        """Read every Parquet footer: a truncated or corrupt shard is named before any work.

        Raises:
            InputError: naming the shard, the artifact and what to do.
        """
        for f in sorted(self.path.glob("*.parquet")) + sorted(self.path.glob("*/part-*.parquet")):
            if f.name.startswith(TMP_PREFIX):
                continue
            try:
                pq.read_metadata(f)
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"artifact {self.path}: shard {f.relative_to(self.path)} is corrupt or "
                                 f"truncated ({exc}); {self.repair_hint}") from None

    @property
    def repair_hint(self) -> str:
        """What to do about a damaged shard of this artifact (the end of the error naming it)."""
        return (f"delete the stage directory {self.path} (or, to keep the rest, that file and {SUCCESS}) "
                f"and re-run stage {self.stage!r}")

    @property
    def complete(self) -> bool:
        return (self.path / SUCCESS).exists()

    def files(self, table: str = "images") -> list[Path]:
        return _parts(self.path / table)

    def has(self, table: str) -> bool:
        return bool(self.files(table)) or (self.path / f"{table}.parquet").exists()

    def read(self, table: str = "images", columns: list[str] | None = None,
             schema: pa.Schema | None = None) -> pa.Table:
        """All shards of ``table`` as one Arrow table (empty table of ``schema`` if none)."""
        # A damaged shard (a disk that filled up, a copy cut short) is named with what to do.
        fix = self.repair_hint
        single = self.path / f"{table}.parquet"
        if single.exists():
            return read_parquet(single, columns, fix=fix)
        files = self.files(table)
        if not files:
            if schema is None:
                raise FileNotFoundError(f"{self.path} has no table {table!r}")
            s = schema if columns is None else pa.schema([schema.field(c) for c in columns])
            return s.empty_table()
        return pa.concat_tables([read_parquet(f, columns, fix=fix) for f in files],
                                promote_options="default")

    @property
    def stats(self) -> dict[str, Any]:
        p = self.path / STATS
        return json.loads(p.read_text()) if p.exists() else {}

    def __str__(self) -> str:
        return str(self.path)


class StageRun:
    """An in-progress stage: where to write, what is already done, its stats."""

    def __init__(self, root: str | Path, stage: str, section: Any,
                 inputs: Mapping[str, Artifact | str] | None = None):
        self.stage = stage
        self.section = section
        self.inputs = {k: (v.key if isinstance(v, Artifact) else str(v)) for k, v in (inputs or {}).items()}
        self.input_paths = {k: str(v.path) for k, v in (inputs or {}).items() if isinstance(v, Artifact)}
        self.key = section_hash(section, self.inputs)
        # Absolute, because Ray workers (Train V2 ones in particular) run in other directories.
        self.root = Path(root).resolve()
        self.path = self.root / stage / self.key
        self.stats = Stats()
        self._counter = 0
        self._t0 = time.perf_counter()
        self._cpu0 = _cpu_seconds()

    @property
    def artifact(self) -> Artifact:
        return Artifact(self.stage, self.key, self.path)

    @property
    def complete(self) -> bool:
        return (self.path / SUCCESS).exists()

    def prepare(self, resumable: bool) -> None:
        """Make the directory ready: drop temporaries; a non-resumable stage starts empty."""
        if self.path.exists() and not resumable:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in sorted(self.path.rglob(f"{TMP_PREFIX}*"), reverse=True):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        meta = {"stage": self.stage, "key": self.key, "inputs": self.inputs,
                "input_paths": self.input_paths,
                "config": to_dict(self.section) if hasattr(self.section, "__dataclass_fields__") else self.section}
        write_text_atomic(dump_yaml(meta), self.path / CONFIG)

    def write(self, table: pa.Table, name: str = "images", shard: str | None = None) -> Path:
        """Write one shard of table ``name``; ``shard`` names it (stable names make retries idempotent)."""
        if shard is None:
            shard = f"{os.getpid()}-{self._counter:05d}-{uuid.uuid4().hex[:8]}"
            self._counter += 1
        return write_parquet_atomic(table, self.path / name / f"part-{shard}.parquet")

    def write_single(self, table: pa.Table, name: str) -> Path:
        """Write a small table as one file ``<name>.parquet`` (class tables, summaries)."""
        return write_parquet_atomic(table, self.path / f"{name}.parquet")

    def done_ids(self, name: str = "images", column: str = "id") -> set[str]:
        """Ids in already finished shards of ``name`` (for resumable stages)."""
        ids: set[str] = set()
        for f in _parts(self.path / name):
            ids.update(pq.read_table(f, columns=[column]).column(column).to_pylist())
        return ids

    def finish(self) -> Artifact:
        """Write ``stats.json`` and then ``_SUCCESS``; after this the artifact counts as complete."""
        self.stats.wall_s = time.perf_counter() - self._t0
        self.stats.charge("driver", _cpu_seconds() - self._cpu0, 0.0, calls=0)
        write_text_atomic(json.dumps(self.stats.to_dict(), indent=2, sort_keys=True), self.path / STATS)
        write_text_atomic(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n", self.path / SUCCESS)
        return self.artifact


def run_stage(root: str | Path, stage: str, section: Any,
              inputs: Mapping[str, Artifact | str] | None,
              body: Callable[[StageRun], None], *, resumable: bool = False,
              force: bool = False) -> Artifact:
    """Run ``body`` as stage ``stage`` unless an output with the same key is complete.

    Args:
        root: the run root (``cfg.run.root``).
        stage: stage name, also the directory under ``root``.
        section: the stage's config section (a dataclass) or plain data to hash.
        inputs: the artifacts (or literal keys) this stage reads; their keys enter the hash.
        body: writes shards through the given :class:`StageRun` and fills its ``stats``.
        resumable: keep finished shards of an interrupted earlier attempt (``body`` then skips
            ids from :meth:`StageRun.done_ids`); otherwise start from an empty directory.
        force: re-run even if complete.
    """
    run = StageRun(root, stage, section, inputs)
    with _key_lock(run.path):
        if run.complete and not force:
            # Footers only (cheap): a shard damaged since is named now, not deep in a later stage.
            run.artifact.check_shards()
            log.info("stage %s [%s] already complete, skipping (%s)", stage, run.key, run.path)
            return run.artifact
        if run.complete:
            (run.path / SUCCESS).unlink()
        run.prepare(resumable=resumable)
        log.info("stage %s [%s] starting -> %s", stage, run.key, run.path)
        token = _CURRENT_RUN.set(run)
        try:
            body(run)
        finally:
            _CURRENT_RUN.reset(token)
        artifact = run.finish()
        log.info("stage %s [%s] done: %s", stage, run.key, run.stats.summary())
        return artifact


_KEY_LOCKS: dict[Path, threading.RLock] = {}
_KEY_LOCKS_GUARD = threading.Lock()


def _key_lock(path: Path) -> threading.RLock:
    """One lock per stage directory in this process: two threads that reach the same key (a study
    whose checkpoint candidates share a snapshot, trained in parallel) run it once; the second
    waits and then finds it complete."""
    with _KEY_LOCKS_GUARD:
        return _KEY_LOCKS.setdefault(path, threading.RLock())


def latest(root: str | Path, stage: str) -> Artifact | None:
    """The most recently completed output of ``stage`` under ``root`` (for CLI conveniences)."""
    base = Path(root).resolve() / stage
    done = [p for p in base.glob("*") if (p / SUCCESS).exists()] if base.is_dir() else []
    if not done:
        return None
    newest = max(done, key=lambda p: (p / SUCCESS).stat().st_mtime)
    return Artifact(stage, newest.name, newest)

