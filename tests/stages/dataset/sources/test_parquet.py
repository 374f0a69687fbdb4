"""The ``parquet`` source: image bytes (or Hugging Face structs) and a class column, split values."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.artifacts import class_counts, read_classes, read_split
from raugment.core.config import ConfigError
from raugment.stages.dataset import stage as dataset
from raugment.stages.dataset.sources.parquet import split_roles
from tests.stages.dataset.test_dataset import _png


def contract_dataset(root: Path) -> tuple[dict, dict[str, int]]:
    """(``dataset`` keys, class id -> training-pool images) of a tiny dataset of this kind."""
    rng = np.random.default_rng(1)
    labels = [0] * 6 + [1] * 5 + [2] * 4 + [0, 1, 2]
    splits = ["train"] * 15 + ["test"] * 3
    pq.write_table(pa.table({"image": [_png(lab, rng) for lab in labels], "label": labels, "split": splits}),
                   root / "tiny.parquet", row_group_size=4)
    return {"path": str(root / "tiny.parquet")}, {"0": 6, "1": 5, "2": 4}


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_dataset_through_the_stage(tmp_path, struct):
    rng = np.random.default_rng(0)
    labels = [0] * 10 + [1] * 6 + [0] * 2 + [1] * 2
    splits = ["train"] * 16 + ["val"] * 4  # ImageNet style: val becomes our test split
    images = [_png(lab, rng) for lab in labels]
    images[3] = b"junk"
    column = (pa.array([{"bytes": b, "path": None} for b in images]) if struct else pa.array(images, pa.binary()))
    table = pa.table({"image": column, "label": labels, "split": splits,
                      "class_name": ["red circle" if lab == 0 else "blue square" for lab in labels]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=5)
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.progress=false", "dataset.source=parquet",
                             f"dataset.path={tmp_path / 'data.parquet'}", "dataset.fraction=0.2"])
    art = dataset.run(cfg)
    classes = read_classes(art).to_pylist()
    assert [(c[S.CLASS_ID], c[S.CLASS_NAME]) for c in classes] == [("0", "red circle"), ("1", "blue square")]
    assert class_counts(art, "test") == {0: 2, 1: 2}
    train, val = class_counts(art, "train"), class_counts(art, "val")
    # class 0: 10 rows -> k = 2 each for train and val, less the junk row; class 1: 6 rows -> k = 1
    assert (train[0] + val[0], train[1], val[1]) == (3, 1, 1)
    assert art.stats["failures"] == {"not_an_image": 1}
    stored = {r[S.ID]: r[S.IMAGE] for r in read_split(art, "test", columns=[S.ID, S.IMAGE]).to_pylist()}
    assert len(stored) == 4 and all(Image.open(io.BytesIO(b)).size == (16, 16) for b in stored.values())


def test_parquet_split_values():
    # "test" wins; without it ImageNet's "val" is the test split; other values are skipped
    assert split_roles({"train", "val", "test"}) == ({None, "train"}, "test")
    assert split_roles({"train", "validation"}) == ({None, "train"}, "validation")
    assert split_roles({None}) == ({None, "train"}, None)


def test_split_values():
    # "test" wins; without it ImageNet's "val" is the test split; other values are skipped
    assert split_roles({"train", "val", "test"}) == ({None, "train"}, "test")
    assert split_roles({"train", "validation"}) == ({None, "train"}, "validation")
    assert split_roles({None}) == ({None, "train"}, None)


def test_named_columns_and_errors_naming_the_key(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["ant"] * 4 + ["bee"] * 4
    pq.write_table(pa.table({"pixels": [_png(i % 2, rng) for i in range(8)], "kind": labels,
                             "part": ["train"] * 3 + ["test"] + ["train"] * 3 + ["test"]}), tmp_path / "d.parquet")

    def cfg(*more):
        return load_config(None, [f"run.root={tmp_path / 'runs'}", "run.progress=false", "dataset.source=parquet",
                                  f"dataset.path={tmp_path / 'd.parquet'}", "dataset.fraction=0.3", *more])

    with pytest.raises(ConfigError, match=r"dataset\.image_column: 'image' is not a column"):
        dataset.run(cfg())
    with pytest.raises(ConfigError, match=r"dataset\.label_column: no class column"):
        dataset.run(cfg("dataset.image_column=pixels"))
    art = dataset.run(cfg("dataset.image_column=pixels", "dataset.label_column=kind", "dataset.split_column=part"))
    assert read_classes(art).column(S.CLASS_ID).to_pylist() == ["ant", "bee"]
    assert class_counts(art, "test") == {0: 1, 1: 1}
