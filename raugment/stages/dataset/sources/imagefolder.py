"""``imagefolder`` source: class folders of image files.

Layouts: ``path/train/<class>/...`` plus ``path/test/<class>/...`` (or ``path/val``, as ImageNet's
val folder is our test split; or ``dataset.test_path``), or a flat ``path/<class>/...`` (then the
test split is ``dataset.test_path``, or the protocol makes one). Class ids are the folder names;
files are found recursively below each class folder (hidden ones skipped) and kept by extension
(:data:`IMAGE_EXTENSIONS`; others are counted as ignored). Refs are
``<role>/<path relative to that role's root>`` with roles ``train`` and ``test``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from raugment.core.config import ConfigError
from raugment.stages.dataset.sources import DATASETS, DatasetSource, Listing

if TYPE_CHECKING:
    from raugment.stages.dataset.config import DatasetConfig

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})


class FolderReader:
    """Refs are ``<role>/<path relative to that role's root>``, roles "train" and "test"."""

    def __init__(self, roots: dict[str, Path]):
        self.roots = roots

    def read(self, ref: str) -> bytes:
        role, _, rel = ref.partition("/")
        return (self.roots[role] / rel).read_bytes()


def _list_class_folders(root: Path, key: str) -> dict[str, list[str]]:
    """``root/<class>/**/<image>`` -> class folder name -> sorted paths relative to ``root``."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(f"{key}: {root} has no class folders; expected {root}/<class>/<image files>")
    out: dict[str, list[str]] = {}
    for name in classes:
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, root)
            files.extend(os.path.join(rel_dir, f) for f in filenames if not f.startswith("."))
        out[name] = sorted(files)
    return out


def _keep_images(tree: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
    kept = {c: [f for f in fs if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS] for c, fs in tree.items()}
    ignored = sum(len(fs) for fs in tree.values()) - sum(len(fs) for fs in kept.values())
    return kept, ignored


def list_imagefolder(cfg: DatasetConfig, run_root: Path) -> Listing:
    """List an ImageFolder tree (``train/`` + ``test/``|``val/``, or flat class folders)."""
    root = Path(cfg.path or "")
    if not root.is_dir():
        raise ConfigError(f"dataset.path: {str(root)!r} is not a directory")
    train_root = root / "train" if (root / "train").is_dir() else root
    test_root: Path | None
    if cfg.test_path:
        test_root = Path(cfg.test_path)
        if not test_root.is_dir():
            raise ConfigError(f"dataset.test_path: {cfg.test_path!r} is not a directory")
    elif train_root != root:
        test_root = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    else:
        test_root = None
    train, ignored = _keep_images(_list_class_folders(train_root, "dataset.path"))
    roots = {"train": train_root}
    test = None
    if test_root is not None:
        test, ignored_test = _keep_images(_list_class_folders(test_root, "dataset.test_path"))
        ignored += ignored_test
        roots["test"] = test_root
        test = {c: [f"test/{f}" for f in fs] for c, fs in test.items()}
    train = {c: [f"train/{f}" for f in fs] for c, fs in train.items()}
    return Listing(train=train, test=test, reader=FolderReader(roots), ignored=ignored,
                   folders={c: str(train_root / c) for c in train})


@DATASETS.register("imagefolder")
class ImageFolderSource(DatasetSource):
    """Class folders of image files under ``dataset.path`` (and ``dataset.test_path``)."""

    @classmethod
    def listing(cls, section: DatasetConfig, run_root: Path) -> Listing:
        return list_imagefolder(section, run_root)
