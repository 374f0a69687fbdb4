"""Run the real clip-retrieval ``clip back`` from its own virtual environment (slow tests, manual checks).

Why a separate environment: clip-retrieval 2.45.0 pins numpy<2, pyarrow<16, open-clip-torch<3,
sentence-transformers<3 and fire<0.6; Ray 2.60 needs pyarrow>=17, so
it cannot live in the project's ``.venv``.

How the environment is made (:func:`ensure_venv`), and why:

* ``lock.txt`` beside this file pins every package pip's resolver chose for
  ``pip install clip-retrieval==2.45.0`` with ``torch==2.14.1``/``torchvision==0.29.1`` held
  fixed (resolved 2026-11-24 with ``pip install --dry-run -c constraints``). Those two torch
  versions are the wheels on local disk; any other torch version downloads gigabytes.
* One deliberate change to that set: ``setuptools==69.5.1`` instead of the resolved 84.x.
  clip-anytorch (imported by clip back through all_clip) does ``from pkg_resources import
  packaging``, and setuptools 84 no longer ships ``pkg_resources``; nothing declares the bound.
* It is installed with ``pip install --no-deps -r lock.txt``: the resolver took 4.5 min on this
  machine to find that set (it backtracks through clip-retrieval's many upper bounds), and with
  ``--no-deps`` nothing can drag in a different torch or numpy.
* It is built and reused by ``tools/side_env.py`` (shared with img2dataset's environment):
  ``$RAUGMENT_SIDE_ENVS/venv-clip-retrieval`` (``~/.cache/raugment`` when unset), stamped with the
  lock's hash only after ``import clip_retrieval.clip_back`` works, built under a file lock so
  concurrent sessions build it once; a changed lock rebuilds it.

How the server is started (:class:`ClipBack`):

* Offline flags: ``--enable_mclip_option False`` (M-CLIP downloads from the hub),
  ``--provide_aesthetic_embeddings False`` (fetched from GitHub), ``--use_jit False``.
* The CLIP: clip back loads ``open_clip:<arch>/<checkpoint>`` through all_clip, which splits on
  ``/``; open_clip 2.32 (the version clip-retrieval allows) has no ``local-dir:`` models, so the
  index's CLIP directory (``open_clip_config.json`` + ``open_clip_model.safetensors``, the
  :func:`raugment.models.clip.save_clip` layout) is registered as an architecture by writing its
  ``model_cfg`` into the side environment's ``open_clip/model_configs/`` (:func:`register_clip`),
  and the checkpoint is the safetensors file itself (open_clip 2.32 loads ``.safetensors``
  directly), given as ``open_clip:<arch>//<absolute path>``. No conversion of the weights.
* It binds 0.0.0.0 (it has no flag for the address); every request here goes to 127.0.0.1. It
  runs in its own process group and is stopped by signalling that group (TERM, then KILL), with
  bounded waits everywhere.

Usage from the command line (a manual check)::

    python tools/clip_retrieval/clip_back.py EXPORT_DIR CLIP_DIR [--port 1234]
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
LOCK = HERE / "lock.txt"
NAME = "venv-clip-retrieval"
CHECK = "import clip_retrieval.clip_back, open_clip, faiss"
INSTALL_TIMEOUT_S = 2400


def _side_env() -> ModuleType:
    """``tools/side_env.py`` as a module (``tools/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("raugment_side_env", HERE.parent / "side_env.py")
    assert spec is not None and spec.loader is not None
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


def ensure_venv(root: Path | None = None, timeout_s: float = INSTALL_TIMEOUT_S) -> tuple[Path, float | None]:
    """The side environment's directory, built when missing or stale; also the seconds building took (None: reused)."""
    venv, took = _side_env().ensure_env(NAME, LOCK, CHECK, root=root, timeout_s=timeout_s,
                                        env={"NO_ALBUMENTATIONS_UPDATE": "1"})
    if took is not None:
        log.info("clip-retrieval environment created in %.0f s at %s", took, venv)
    return venv, took


def _site_packages(venv: Path) -> Path:
    found = sorted((venv / "lib").glob("python*/site-packages"))
    if not found:
        raise RuntimeError(f"{venv} has no lib/python*/site-packages")
    return found[0]


def register_clip(venv: Path, clip_dir: str | Path) -> str:
    """Register a local CLIP directory as an open_clip architecture in the side env; returns ``--clip_model``.

    The architecture is named by a hash of its config, so two different models never share a name
    and re-registering the same one is a no-op.
    """
    clip_dir = Path(clip_dir).resolve()
    config = json.loads((clip_dir / "open_clip_config.json").read_text())
    model_cfg = config["model_cfg"]
    arch = "raugment-" + hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:10]
    target = _site_packages(venv) / "open_clip" / "model_configs" / f"{arch}.json"
    if not target.is_file():
        target.write_text(json.dumps(model_cfg, indent=2))
    weights = clip_dir / "open_clip_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    return f"open_clip:{arch}/{weights}"   # weights is absolute: "<arch>//abs/path" after the join


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ClipBack:
    """``clip-retrieval back`` over an exported index, as a context manager.

    Args:
        venv: the side environment (:func:`ensure_venv`).
        indices_json: ``indices.json`` written by ``raugment index export-clip-back``.
        clip_model: the ``--clip_model`` value (:func:`register_clip`).
        log_path: where the server's stdout/stderr go (read on failure).
        port: port to bind (0 = a free one).
        start_timeout_s: how long to wait for ``/indices-list`` to answer.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
    """

    def __init__(self, venv: Path, indices_json: str | Path, clip_model: str, log_path: str | Path,
                 port: int = 0, start_timeout_s: float = 300.0):
        self.venv = Path(venv)
        self.indices_json = str(Path(indices_json).resolve())
        self.clip_model = clip_model
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "clip-retrieval"), "back", "--indices_paths", self.indices_json,
                "--port", str(self.port), "--clip_model", self.clip_model, "--enable_mclip_option", "False",
                "--provide_aesthetic_embeddings", "False", "--use_jit", "False"]

    def __enter__(self) -> ClipBack:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                    "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1",
                    "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(Path(self.indices_json).parent), start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clip back exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/indices-list", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"clip back did not answer on {self.url} within {self.start_timeout_s:.0f} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """Signal the server's process group (TERM, then KILL), bounded."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", help="a `raugment index export-clip-back` output directory")
    p.add_argument("clip_dir", help="the index's CLIP directory (open_clip_config.json + safetensors)")
    p.add_argument("--port", type=int, default=1234)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    venv, took = ensure_venv()
    log.info("environment %s (%s)", venv, "reused" if took is None else f"created in {took:.0f} s")
    with ClipBack(venv, Path(args.export_dir) / "indices.json", register_clip(venv, args.clip_dir),
                  Path(args.export_dir) / "clip_back.log", port=args.port) as srv:
        log.info("clip back on %s (binds 0.0.0.0); Ctrl-C stops it", srv.url)
        with contextlib.suppress(KeyboardInterrupt):
            srv.proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
