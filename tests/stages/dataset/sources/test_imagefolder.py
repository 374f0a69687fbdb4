"""The ``imagefolder`` source: train/test (or val) trees, flat trees, a separate test path, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from raugment.core.artifacts import class_counts
from raugment.core.config import ConfigError
from raugment.stages.dataset import stage as dataset
from raugment.stages.dataset.sources.imagefolder import ImageFolderSource
from tests.stages.dataset.test_dataset import cfg_for, make_tree


def contract_dataset(root: Path) -> tuple[dict, dict[str, int]]:
    """(``dataset`` keys, class id -> training-pool images) of a tiny dataset of this kind."""
    make_tree(root, {"ant": 6, "bee": 5, "cat": 4}, test=2)
    return {"path": str(root)}, {"ant": 6, "bee": 5, "cat": 4}


def test_tree_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no class folders"):
        dataset.run(cfg_for(tmp_path, tmp_path / "empty"))
    flat = make_tree(tmp_path / "flat", {"a": 5}, test=None)
    with pytest.raises(ConfigError, match=r"needs a test split.*dataset\.test_path"):
        dataset.run(cfg_for(tmp_path, flat))
    tiny = make_tree(tmp_path / "tiny", {"a": 5, "b": 2}, test=None)
    with pytest.raises(ConfigError, match=r"split_80_10_10 leaves class 'b' \(2 images\) with no train"):
        dataset.run(cfg_for(tmp_path, tiny, "dataset.protocol=split_80_10_10"))
    # the same flat tree works with its test split given separately
    tests = make_tree(tmp_path / "elsewhere", {"a": 2}, test=None)
    art = dataset.run(cfg_for(tmp_path, flat, f"dataset.test_path={tests}", "dataset.fraction=0.2"))
    assert class_counts(art, "test") == {0: 2} and class_counts(art, "train") == {0: 1}


def test_listing_of_a_val_folder_nested_files_and_non_images(tmp_path):
    root = make_tree(tmp_path / "inet", {"ant": 3, "bee": 2}, test=1)
    (root / "test").rename(root / "val")                   # ImageNet's val folder is the test split
    (root / "train" / "ant" / "deeper").mkdir()
    (root / "train" / "ant" / "000.png").rename(root / "train" / "ant" / "deeper" / "000.png")
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    (root / "train" / "bee" / ".hidden.png").write_bytes(b"skipped")
    (root / "train" / ".cache").mkdir()
    listing = ImageFolderSource.listing(cfg_for(tmp_path, root).dataset, tmp_path / "runs")
    assert listing.train == {"ant": ["train/ant/001.png", "train/ant/002.png", "train/ant/deeper/000.png"],
                             "bee": ["train/bee/000.png", "train/bee/001.png"]}
    assert listing.test == {"ant": ["test/ant/000.png"], "bee": ["test/bee/000.png"]}
    assert listing.ignored == 1
    assert listing.reader.read("train/ant/deeper/000.png") == (root / "train/ant/deeper/000.png").read_bytes()
    assert listing.reader.read("test/bee/000.png") == (root / "val/bee/000.png").read_bytes()
    flat = ImageFolderSource.listing(cfg_for(tmp_path, root / "train").dataset, tmp_path / "runs")
    assert flat.test is None and sorted(flat.train) == ["ant", "bee"]
