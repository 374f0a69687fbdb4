"""The ``synthetic`` source: names, purity of draw(), folder layout, imbalance, learnability, the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raugment.config import from_dict, load_config
from raugment.core.artifacts import read_classes
from raugment.core.config import ConfigError
from raugment.stages.dataset import stage as dataset
from raugment.stages.dataset.classnames import folder_class_name
from raugment.stages.dataset.sources.synthetic import (
    COLOURS,
    SHAPES,
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    SyntheticSource,
    check_config,
    class_sizes,
    draw,
    draw_named,
    write_imagefolder,
)
from raugment.study.planner import expected_size


def contract_dataset(root: Path) -> tuple[dict, dict[str, int]]:
    """(``dataset`` keys, class id -> training-pool images) of a tiny dataset of this kind."""
    syn = {"num_classes": 3, "train_per_class": 6, "test_per_class": 2, "size": 16, "imbalance": 0.5}
    return {"synthetic": syn}, {"000.red_circle": 6, "001.blue_square": 4, "002.green_triangle": 3}


def test_class_names_are_readable_and_unique():
    assert len(SYNTHETIC_CLASSES) >= 10
    assert len(set(SYNTHETIC_CLASSES)) == len(SYNTHETIC_CLASSES)
    for name in SYNTHETIC_CLASSES:
        colour, shape = name.split(" ")
        assert colour in COLOURS and shape in SHAPES
    # the first classes differ in colour and in shape: the easy demo default
    first = [n.split(" ") for n in SYNTHETIC_CLASSES[:8]]
    assert len({c for c, _ in first}) == 8 and len({s for _, s in first}) == 8


def test_draw_is_pure_and_sized():
    a = draw(3, np.random.default_rng(7), 40)
    b = draw(3, np.random.default_rng(7), 40)
    c = draw(3, np.random.default_rng(8), 40)
    assert a.size == (40, 40) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_draw_named_accepts_distractors_and_rejects_junk():
    name = "green circle"
    assert name not in SYNTHETIC_CLASSES[:4]
    assert draw_named(name, np.random.default_rng(0), 16).size == (16, 16)
    with pytest.raises(ValueError, match="colour"):
        draw_named("plaid circle", np.random.default_rng(0))
    with pytest.raises(ValueError, match="class_index"):
        draw(len(SYNTHETIC_CLASSES), np.random.default_rng(0))


def test_shape_colour_shows_in_pixels():
    # the shape is drawn in its colour: the most saturated pixels of "red circle" are reddish
    img = np.asarray(draw(SYNTHETIC_CLASSES.index("red circle"), np.random.default_rng(1), 32), float)
    sat = img.max(-1) - img.min(-1)
    top = img[sat >= np.quantile(sat, 0.9)]
    assert top[:, 0].mean() > top[:, 1].mean() + 60 and top[:, 0].mean() > top[:, 2].mean() + 60


def test_write_imagefolder_layout_and_imbalance(tmp_path):
    cfg = SyntheticConfig(num_classes=3, train_per_class=10, test_per_class=4, size=16, imbalance=0.5)
    out = write_imagefolder(tmp_path / "syn", cfg, seed=1)
    assert class_sizes(cfg) == [10, 8, 5]  # linear falloff to (1 - imbalance) of the first
    for split, expected in (("train", [10, 8, 5]), ("test", [4, 4, 4])):
        folders = sorted(p for p in (out / split).iterdir())
        assert [folder_class_name(p.name) for p in folders] == SYNTHETIC_CLASSES[:3]
        assert [len(list(p.glob("*.png"))) for p in folders] == expected
    # deterministic: the same seed writes the same bytes
    again = write_imagefolder(tmp_path / "again", cfg, seed=1)
    first = sorted((out / "train").rglob("*.png"))[0]
    assert first.read_bytes() == (again / first.relative_to(out)).read_bytes()


def test_check_config_names_the_key():
    with pytest.raises(ConfigError, match=r"dataset\.synthetic\.num_classes"):
        check_config(SyntheticConfig(num_classes=len(SYNTHETIC_CLASSES) + 1))
    with pytest.raises(ConfigError, match=r"imbalance"):
        check_config(SyntheticConfig(imbalance=1.0))


def _pixels(num_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label in range(num_classes):
        rng = np.random.default_rng([seed, label])
        for _ in range(per_class):
            xs.append(np.asarray(draw(label, rng, 32).resize((8, 8)), float).ravel() / 255.0)
            ys.append(label)
    return np.array(xs), np.array(ys)


@pytest.mark.parametrize("num_classes, min_accuracy", [(4, 0.8), (8, 0.55)])
def test_synthetic_data_is_learnable(num_classes, min_accuracy):
    """Logistic regression on 8x8 pixels beats chance (1/num_classes) by a wide margin."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    x_train, y_train = _pixels(num_classes, 30, seed=0)
    x_test, y_test = _pixels(num_classes, 20, seed=1)
    model = linear_model.LogisticRegression(max_iter=2000).fit(x_train, y_train)
    accuracy = model.score(x_test, y_test)
    assert min_accuracy >= 3 / num_classes  # the bar itself is >= 3x chance
    assert accuracy >= min_accuracy


def test_the_source_draws_once_under_the_run_root_and_needs_no_path(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.progress=false", "dataset.synthetic.num_classes=3",
                             "dataset.synthetic.train_per_class=10", "dataset.synthetic.test_per_class=2",
                             "dataset.synthetic.size=16", "dataset.fraction=0.2"])
    assert cfg.dataset.source == "synthetic" and cfg.dataset.path is None
    listing = SyntheticSource.listing(cfg.dataset, tmp_path)
    assert {c: len(refs) for c, refs in listing.train.items()} == {
        "000.red_circle": 10, "001.blue_square": 10, "002.green_triangle": 10}
    assert {c: len(refs) for c, refs in listing.test.items()} == {c: 2 for c in listing.train}
    art = dataset.run(cfg)
    assert read_classes(art).column("class_name").to_pylist() == ["red circle", "blue square", "green triangle"]
    assert len(list((tmp_path / "synthetic").glob("*/_SUCCESS"))) == 1     # drawn once, listed twice


def test_expected_class_sizes_size_a_study_before_the_data_exists():
    cfg = from_dict({"dataset": {"synthetic": {"num_classes": 3, "train_per_class": 10, "imbalance": 0.5},
                                 "fraction": 0.5}})
    assert SyntheticSource.expected_class_sizes(cfg.dataset) == [10, 8, 5]
    size = expected_size(cfg)
    assert (size.classes, size.train_images, size.max_per_class) == (3, 5 + 4 + 2, 5)   # round(4.0), round(2.5)
