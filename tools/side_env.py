"""Side virtual environments: tools that cannot be installed beside the project's pins, built once and reused.

clip-retrieval (``tools/clip_retrieval``) and img2dataset (``tools/img2dataset_env``) pin numpy<2,
pyarrow<16 or declare bounds that do not resolve beside Ray 2.60, so each gets its own venv, made
from a lock file with ``pip install --no-deps -r <lock>`` (no resolver run: nothing can drag in
another torch or numpy, and it takes seconds instead of minutes of backtracking).

Where: ``$RAUGMENT_SIDE_ENVS/<name>/`` (the Makefile exports it; ``~/.cache/raugment`` when unset),
outside the clone, so fresh clones and CI runs on the same machine reuse it.

Reuse and rebuild, safely under concurrency:

* A stamp file (``.raugment-installed``, the lock file's hash) is written last, only after the
  environment's import check passed. Stamp equal to the lock's hash: reused, nothing else done.
* Otherwise the builder takes an exclusive ``fcntl.flock`` on ``<root>/<name>.lock`` (waiting up to
  the build timeout), checks the stamp again (another process may have just finished it: then it is
  reused, not rebuilt), removes whatever is there (a killed or failed install has no stamp) and
  builds it. Two test sessions or ``make bench`` runs at once therefore build it once.
* A changed lock file changes the hash, so the next call rebuilds.

Used as a module (``load_side_env()`` in the two tools loads it by path; ``tools/`` is no package)::

    venv, took = ensure_env("venv-img2dataset", LOCK, check="import img2dataset")
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STAMP = ".raugment-installed"
DEFAULT_TIMEOUT_S = 2400.0

Installer = Callable[[Path, Path, float], None]
"""``install(venv, lock, deadline)``: build the environment at ``venv`` (empty) by ``time.monotonic()`` deadline."""


def side_envs_root() -> Path:
    """``$RAUGMENT_SIDE_ENVS``, or ``~/.cache/raugment`` when unset or empty."""
    value = os.environ.get("RAUGMENT_SIDE_ENVS")
    return Path(value) if value else Path.home() / ".cache" / "raugment"


def lock_hash(lock: Path) -> str:
    """The stamp's content: a hash of the lock file's bytes."""
    return hashlib.sha256(Path(lock).read_bytes()).hexdigest()[:16]


def is_current(venv: Path, lock: Path) -> bool:
    """True when ``venv`` carries the stamp of this very lock file (a complete, up-to-date build)."""
    stamp = Path(venv) / STAMP
    try:
        return stamp.read_text().strip() == lock_hash(lock)
    except OSError:
        return False


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created), waited for up to ``timeout_s``; TimeoutError after that."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} stayed locked for {timeout_s:.0f} s (another build?)") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def pip_installer(check: str, env: dict[str, str] | None = None) -> Installer:
    """The real build: ``python -m venv``, ``pip install --no-deps -r lock``, then ``python -c check``."""

    def install(venv: Path, lock: Path, deadline: float) -> None:
        def step(cmd: list[str]) -> None:
            left = max(1.0, deadline - time.monotonic())
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=left,
                                 env=None if env is None else {**os.environ, **env})
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")

        # The base interpreter, not the project venv's (a venv made from a venv works, but explicit).
        base = getattr(sys, "_base_executable", None) or sys.executable
        step([base, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        step([py, "-m", "pip", "install", "-q", "--no-deps", "-r", str(lock)])
        step([py, "-c", check])

    return install


def ensure_env(name: str, lock: Path, check: str = "", *, root: Path | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, installer: Installer | None = None,
               env: dict[str, str] | None = None) -> tuple[Path, float | None]:
    """The side environment ``<root>/<name>`` built from ``lock``; also the seconds building took (None: reused).

    Args:
        name: the environment's directory name under ``root``.
        lock: a pip requirements file of exact pins, installed with ``--no-deps``.
        check: Python code that must run in the new environment before it is stamped (its imports).
        root: where environments live (default :func:`side_envs_root`).
        timeout_s: bound on waiting for another builder plus building.
        installer: the build step (default :func:`pip_installer`); tests pass a fake.
        env: extra environment variables for the build's commands.
    """
    lock = Path(lock)
    venv = (root or side_envs_root()) / name
    if is_current(venv, lock):
        return venv, None
    t0 = time.monotonic()
    with file_lock(venv.parent / f"{name}.lock", timeout_s):
        if is_current(venv, lock):   # another process built it while this one waited
            return venv, None
        shutil.rmtree(venv, ignore_errors=True)   # no stamp: never finished, or an older lock
        venv.parent.mkdir(parents=True, exist_ok=True)
        build = installer or pip_installer(check, env)
        build(venv, lock, t0 + timeout_s)
        (venv / STAMP).write_text(lock_hash(lock))   # last: only a complete environment has it
    took = time.monotonic() - t0
    log.info("side environment %s built in %.0f s at %s", name, took, venv)
    return venv, took
