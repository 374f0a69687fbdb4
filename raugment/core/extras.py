"""Lazy imports of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the pip extra that provides it
EXTRAS = {
    "diffusers": "generate",
    "transformers": "generate",
    "accelerate": "generate",
    "open_clip": "retrieve",
    "faiss": "retrieve",
    "aiohttp": "retrieve",
    "imagehash": "filter",
    "sklearn": "finetune",
    "matplotlib": "report",
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise ImportError saying which ``raugment[extra]`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0], "all")
        raise ImportError(
            f"{module} is needed here; install it with: pip install 'raugment[{extra}]' ({exc})"
        ) from exc
