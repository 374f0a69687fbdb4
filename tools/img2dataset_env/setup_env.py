"""img2dataset's side environment for ``benchmarks/download.py`` (``make bench`` builds it first).

img2dataset 1.47.0 installs only with ``pip install --no-deps`` beside the project's pins, so it
lives in its own venv, ``$RAUGMENT_SIDE_ENVS/venv-img2dataset`` (built once from ``lock.txt`` beside
this file, stamped, locked against concurrent builds, reused: see ``tools/side_env.py``).

    python tools/img2dataset_env/setup_env.py      # builds or reuses it; prints its python
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
LOCK = HERE / "lock.txt"
NAME = "venv-img2dataset"
# albumentations asks the network for a newer version on import unless told not to.
ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}
CHECK = "import img2dataset, cv2, albumentations, exifread, webdataset, wandb, fire"


def load_side_env() -> ModuleType:
    """``tools/side_env.py`` as a module (``tools/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("raugment_side_env", HERE.parent / "side_env.py")
    assert spec is not None and spec.loader is not None
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


def ensure_img2dataset_env(root: Path | None = None) -> tuple[Path, float | None]:
    """(venv, seconds spent building it or None when reused)."""
    return load_side_env().ensure_env(NAME, LOCK, CHECK, root=root, env=ENV)


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    venv, took = ensure_img2dataset_env()
    logging.info("img2dataset environment %s (%s)", venv, "reused" if took is None else f"built in {took:.0f} s")
    print(python(venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
