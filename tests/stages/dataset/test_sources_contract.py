"""The contract of every registered dataset source (one parametrised case per name).

A new source gets these checks for free; its own test module
(``tests/stages/dataset/sources/test_<name>.py``) provides ``contract_dataset(root) -> (keys, sizes)``:
it writes a tiny dataset of its kind under ``root`` and returns the ``dataset`` keys that read it
and the training-pool images of each class id.
"""

from __future__ import annotations

import pytest

from raugment.config import from_dict
from raugment.core.artifacts import read_classes
from raugment.core.config import ConfigError
from raugment.core.imageio import decode_image
from raugment.stages.dataset import stage as dataset
from raugment.stages.dataset.config import DatasetConfig
from raugment.stages.dataset.sources import DATASETS, DatasetSource, source_class
from raugment.study.planner import expected_size
from tests.helpers.plugin_contract import generic_checks, plugin_test_module

NAMES = DATASETS.names()
PACKAGE = "raugment.stages.dataset.sources"


def _config(name, tmp_path):
    keys, sizes = plugin_test_module("tests.stages.dataset.sources", name).contract_dataset(tmp_path)
    cfg = from_dict({"run": {"root": str(tmp_path / "runs"), "progress": False},
                     "dataset": {"source": name, "fraction": 0.25, **keys}})
    return cfg, sizes


def test_the_registry_finds_every_source():
    assert {"imagefolder", "parquet", "synthetic"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_generic_contract(name):
    generic_checks(DATASETS, PACKAGE, "dataset", DatasetConfig, DatasetSource, name)


@pytest.mark.parametrize("name", NAMES)
def test_lists_the_classes_and_images_of_a_tiny_dataset(name, tmp_path):
    cfg, sizes = _config(name, tmp_path)
    listing = source_class(name).listing(cfg.dataset, tmp_path / "runs")
    assert {c: len(refs) for c, refs in listing.train.items()} == sizes
    assert all(refs == sorted(refs) for refs in listing.train.values())
    for refs in [*listing.train.values(), *(listing.test or {}).values()]:
        assert decode_image(listing.reader.read(refs[0])).size[0] > 0
    art = dataset.run(cfg)                  # the stage reads it: the same class set
    assert sorted(read_classes(art).column("class_id").to_pylist()) == sorted(sizes)


@pytest.mark.parametrize("name", NAMES)
def test_path_and_expected_sizes_are_what_the_source_declares(name, tmp_path):
    cls = source_class(name)
    if cls.needs_path:
        with pytest.raises(ConfigError, match=rf"dataset\.path is required when dataset\.source='{name}'"):
            from_dict({"dataset": {"source": name}})
    else:
        assert from_dict({"dataset": {"source": name}}).dataset.path is None
    cfg, sizes = _config(name, tmp_path)
    expected = cls.expected_class_sizes(cfg.dataset)
    assert expected is None or sorted(expected) == sorted(sizes.values())
    if expected is None:                   # the planner needs the study's hints then
        with pytest.raises(ConfigError, match=r"study\.expected"):
            expected_size(cfg)
    else:
        assert expected_size(cfg).classes == len(sizes)


def test_an_unknown_source_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"dataset\.source: unknown dataset source 'hdf5'; known: imagefolder"):
        source_class("hdf5")
