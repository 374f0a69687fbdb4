"""The dataset stage: protocols, disjoint splits, class names, failures, skip and resume (each source: sources/)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.artifacts import class_counts, read_classes, read_split
from raugment.core.config import ConfigError
from raugment.core.stats import round_half_up
from raugment.stages.dataset import stage as dataset
from raugment.stages.dataset.sources import imagefolder
from raugment.stages.dataset.sources.synthetic import draw

# class folder -> number of training images: imbalanced on purpose, one class with an odd count
SIZES = {"ant": 30, "bee": 20, "cat": 11}
TEST_PER_CLASS = 4


def _png(label: int, rng: np.random.Generator, size: int = 16) -> bytes:
    buf = io.BytesIO()
    draw(label, rng, size).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root: Path, sizes: dict[str, int], test: int = TEST_PER_CLASS, ext: str = ".png") -> Path:
    """``root/train/<class>/i.png`` (+ ``root/test/...`` when ``test``), or flat when test is None."""
    rng = np.random.default_rng(0)
    for label, (cls, n) in enumerate(sizes.items()):
        for split, count in (("train", n), ("test", test)):
            if count is None:
                continue
            folder = root / split / cls if test is not None else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:03d}{ext}").write_bytes(_png(label, rng))
    return root


def cfg_for(tmp_path: Path, path: Path, *overrides: str):
    return load_config(None, [f"run.root={tmp_path / 'runs'}", "run.progress=false", "dataset.source=imagefolder",
                              f"dataset.path={path}", *overrides])


def split_ids(art) -> dict[str, set[str]]:
    t = art.read("images", columns=[S.ID, S.SPLIT])
    out: dict[str, set[str]] = {}
    for i, s in zip(t.column(S.ID).to_pylist(), t.column(S.SPLIT).to_pylist()):
        out.setdefault(s, set()).add(i)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"), SIZES)


def test_subsample_proportions_and_disjoint_splits(tmp_path, tree):
    art = dataset.run(cfg_for(tmp_path, tree, "dataset.fraction=0.25"))
    classes = read_classes(art).to_pylist()
    assert [c[S.CLASS_ID] for c in classes] == list(SIZES)  # labels in sorted folder order
    expected = {label: round_half_up(0.25 * n) for label, n in enumerate(SIZES.values())}
    assert expected == {0: 8, 1: 5, 2: 3}  # 7.5 -> 8 and 2.75 -> 3: round half up, imbalance kept
    assert class_counts(art, "train") == expected
    assert class_counts(art, "val") == expected  # a disjoint val of the same per-class size
    assert class_counts(art, "unused") == {lab: n - 2 * expected[lab] for lab, n in enumerate(SIZES.values())}
    assert class_counts(art, "test") == {0: TEST_PER_CLASS, 1: TEST_PER_CLASS, 2: TEST_PER_CLASS}
    assert [c[S.COUNT_TRAIN] for c in classes] == [8, 5, 3]

    ids = split_ids(art)
    assert set(ids) == {"train", "val", "unused", "test"}
    for a in ids:
        for b in ids:
            assert a == b or not ids[a] & ids[b], (a, b)
    # every training-pool file is in exactly one of train/val/unused; test files come from test/
    t = art.read("images", columns=[S.SPLIT, S.PARAMS])
    paths = Counter((s, json.loads(p)["path"].split("/")[0]) for s, p in zip(t.column(S.SPLIT).to_pylist(),
                                                                            t.column(S.PARAMS).to_pylist()))
    assert sum(n for (s, role), n in paths.items() if role == "train") == sum(SIZES.values())
    assert {s for (s, role) in paths if role == "test"} == {"test"}
    stats = art.stats
    assert stats["counts"]["train"] == 16 and stats["counts"]["classes"] == 3 and stats["failures"] == {}


def test_full_protocol_trains_on_all_but_the_same_val(tmp_path, tree):
    sub = dataset.run(cfg_for(tmp_path, tree, "dataset.fraction=0.25"))
    full = dataset.run(cfg_for(tmp_path, tree, "dataset.fraction=0.25", "dataset.protocol=full"))
    assert full.key != sub.key
    sub_ids, full_ids = split_ids(sub), split_ids(full)
    assert full_ids["val"] == sub_ids["val"]
    assert full_ids["train"] == sub_ids["train"] | sub_ids["unused"]
    assert "unused" not in full_ids


def test_split_80_10_10_sizes(tmp_path):
    flat = make_tree(tmp_path / "flat", {"a": 20, "b": 11, "c": 3}, test=None)
    art = dataset.run(cfg_for(tmp_path, flat, "dataset.protocol=split_80_10_10"))
    assert class_counts(art, "train") == {0: 16, 1: 9, 2: 1}
    assert class_counts(art, "val") == {0: 2, 1: 1, 2: 1}
    assert class_counts(art, "test") == {0: 2, 1: 1, 2: 1}
    ids = split_ids(art)
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])


def test_synset_folders_get_wordnet_names(tmp_path):
    root = make_tree(tmp_path / "inet", {"n01440764": 4, "n01491361": 4}, test=2)
    art = dataset.run(cfg_for(tmp_path, root, "dataset.fraction=0.25"))
    classes = read_classes(art).to_pylist()
    assert [c[S.CLASS_NAME] for c in classes] == ["tench, Tinca tinca", "tiger shark, Galeocerdo cuvieri"]
    assert classes[1][S.HYPERNYM] == "requiem shark" and classes[1][S.DEFINITION].startswith("large dangerous")
    train = read_split(art, "train", columns=[S.CLASS_NAME, S.LABEL])
    assert train.column_names == [S.CLASS_NAME, S.LABEL]
    assert set(train.column(S.CLASS_NAME).to_pylist()) == {c[S.CLASS_NAME] for c in classes}
    folder = dataset.run(cfg_for(tmp_path, root, "dataset.fraction=0.25", "dataset.class_names=folder"))
    assert read_classes(folder).column(S.CLASS_NAME).to_pylist() == ["n01440764", "n01491361"]


def test_wordnet_names_refuse_other_folders(tmp_path, tree):
    with pytest.raises(ConfigError, match=r"dataset\.class_names=wordnet.*'ant'"):
        dataset.run(cfg_for(tmp_path, tree, "dataset.class_names=wordnet"))
    # auto: synset-shaped ids outside the 1000 classes keep their folder name
    rows = dataset.build_classes(["n01440764", "n99999999"], "auto", {})
    assert [r.class_name for r in rows] == ["tench, Tinca tinca", "n99999999"]


def test_corrupt_files_are_recorded_not_fatal(tmp_path):
    root = make_tree(tmp_path / "bad", {"ant": 6, "bee": 6}, test=2)
    (root / "train" / "ant" / "zz_garbage.png").write_bytes(b"not an image at all")
    good = (root / "train" / "bee" / "000.png").read_bytes()
    (root / "train" / "bee" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "bee" / "notes.txt").write_text("not listed: no image extension")
    art = dataset.run(cfg_for(tmp_path, root, "dataset.protocol=full", "dataset.fraction=0.2"))
    fails = art.read("failures").to_pylist()
    assert sorted(f[S.REASON] for f in fails) == ["corrupt", "not_an_image"]
    assert all(f[S.ID].startswith("orig-") and "zz_" in f[S.DETAIL] for f in fails)
    stats = art.stats
    assert stats["failures"] == {"corrupt": 1, "not_an_image": 1} and stats["ignored_files"] == 1
    # the other 12 training-pool images and the 4 test images all made it
    total = sum(stats["counts"][s] for s in ("train", "val", "test"))
    assert total == 12 + 4 == art.read("images", columns=[S.ID]).num_rows


def test_a_class_of_only_corrupt_files_is_refused_like_an_empty_one(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "bad", {"ant": 4, "bee": 4}, test=1)
    good = (root / "train" / "ant" / "000.png").read_bytes()
    for i, data in enumerate([b"not an image", good[: len(good) // 2], b""]):
        (root / "train" / "cat" / f"{i}.png").parent.mkdir(exist_ok=True)
        (root / "train" / "cat" / f"{i}.png").write_bytes(data)
    with pytest.raises(ConfigError, match=r"dataset\.path: class 'cat' \(.*train/cat\) has no usable training "
                                          r"images: (none of the \d files|the one file) of its train split "
                                          r"do(es not)? decode \(.*exclude_classes"):
        dataset.run(cfg_for(tmp_path, root, "dataset.fraction=0.3"))
    assert not (tmp_path / "runs" / "dataset").exists()   # refused before any work
    art = dataset.run(cfg_for(tmp_path, root, "dataset.fraction=0.3", "dataset.exclude_classes=[cat]"))
    assert read_classes(art).column(S.CLASS_ID).to_pylist() == ["ant", "bee"]
    # files that break between that check and the read: still no stage that looks complete
    monkeypatch.setattr(dataset, "check_trainable", lambda *args: None)
    with pytest.raises(ConfigError, match=r"classes \['cat'\] have no usable training images"):
        dataset.run(cfg_for(tmp_path, root, "dataset.fraction=0.3"))
    assert len(list((tmp_path / "runs" / "dataset").glob("*/_SUCCESS"))) == 1   # the exclude_classes run


def test_class_names_that_differ_only_in_case_are_refused(tmp_path):
    root = make_tree(tmp_path / "cats", {"Cat": 3, "cat": 3, "dog": 3}, test=1)
    with pytest.raises(ConfigError, match=r"classes \['Cat', 'cat'\].*differ only in case.*rename one folder"):
        dataset.run(cfg_for(tmp_path, root, "dataset.fraction=0.3"))
    assert not (tmp_path / "runs" / "dataset").exists()


def test_rerun_skips_and_a_new_setting_reruns(tmp_path, tree, monkeypatch, caplog):
    cfg = cfg_for(tmp_path, tree)
    art = dataset.run(cfg)
    stamp = (art.path / "_SUCCESS").stat().st_mtime_ns
    def no_listing(*args):
        raise AssertionError("a skipped stage must not walk the tree")

    monkeypatch.setattr(imagefolder, "_list_class_folders", no_listing)
    with caplog.at_level(logging.INFO):
        again = dataset.run(cfg)
    assert again.path == art.path and (art.path / "_SUCCESS").stat().st_mtime_ns == stamp
    assert "already complete" in caplog.text
    monkeypatch.undo()
    other = dataset.run(cfg_for(tmp_path, tree, "dataset.seed=1"))
    assert other.path != art.path and split_ids(other)["train"] != split_ids(art)["train"]


def test_killed_run_resumes_without_duplicates(tmp_path, tree, monkeypatch):
    cfg = cfg_for(tmp_path, tree, "dataset.shard_size=7")
    art = dataset.run(cfg)
    shards = art.files("images")
    assert len(shards) > 3
    all_ids = art.read("images", columns=[S.ID]).column(S.ID).to_pylist()
    # Simulate a kill: not complete, one shard never written.
    (art.path / "_SUCCESS").unlink()
    shards[1].unlink()
    read = []
    real = dataset.read_shard
    monkeypatch.setattr(dataset, "read_shard", lambda shard, *a, **k: read.append(shard.name) or real(shard, *a, **k))
    again = dataset.run(cfg)
    assert read == [shards[1].name[len("part-"):-len(".parquet")]]  # only the missing shard
    ids = again.read("images", columns=[S.ID]).column(S.ID).to_pylist()
    assert sorted(ids) == sorted(all_ids) and len(set(ids)) == len(ids)
    assert again.stats["counts"]["unused"] == sum(SIZES.values()) - 2 * (3 + 2 + 1)  # fraction 0.1: k = 3, 2, 1


def test_keeps_bytes_when_possible_and_resizes_otherwise(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "big"
    for cls in ("a", "b"):
        for split, n in (("train", 4), ("test", 1)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    keep = dataset.run(cfg_for(tmp_path, root, "dataset.image_format=PNG", "dataset.fraction=0.25"))
    row = read_split(keep, "train").to_pylist()[0]
    assert row[S.IMAGE] == (root / json.loads(row[S.PARAMS])["path"]).read_bytes()
    small = dataset.run(cfg_for(tmp_path, root, "dataset.max_side=20", "dataset.fraction=0.25"))
    rows = read_split(small, "train").to_pylist()
    assert {(r[S.WIDTH], r[S.HEIGHT]) for r in rows} == {(20, 12)}
    img = Image.open(io.BytesIO(rows[0][S.IMAGE]))
    assert img.format == "JPEG" and img.size == (20, 12)


@pytest.mark.parametrize("overrides, match", [
    (["dataset.path={missing}"], r"dataset\.path.*not a directory"),
    (["dataset.fraction=1.0"], r"dataset\.fraction=1\.0 .* leaves class 'ant' \(30 images\) with no val"),
    (["dataset.exclude_classes=[zebra]"], r"dataset\.exclude_classes.*zebra"),
    (["dataset.protocol=split_80_10_10"], r"split_80_10_10 makes its own test split"),
    (["dataset.source=nope"], r"dataset\.source.*known: imagefolder, parquet, synthetic"),
])
def test_errors_before_any_work(tmp_path, tree, overrides, match):
    cfg = cfg_for(tmp_path, tree, *[o.format(missing=tmp_path / "missing") for o in overrides])
    with pytest.raises(ConfigError, match=match):
        dataset.run(cfg)
    assert not (tmp_path / "runs" / "dataset").exists()


def test_exclude_classes(tmp_path, tree):
    art = dataset.run(cfg_for(tmp_path, tree, "dataset.exclude_classes=[bee]"))
    assert read_classes(art).column(S.CLASS_ID).to_pylist() == ["ant", "cat"]
    assert read_classes(art).column(S.LABEL).to_pylist() == [0, 1]  # labels stay contiguous


def test_synthetic_source_and_cli(tmp_path, caplog):
    from raugment.cli import main

    args = ["dataset", "--set", f"run.root={tmp_path}", "--set", "run.progress=false",
            "--set", "dataset.synthetic.num_classes=3", "--set", "dataset.synthetic.train_per_class=10",
            "--set", "dataset.synthetic.test_per_class=2", "--set", "dataset.synthetic.size=16",
            "--set", "dataset.fraction=0.2"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "train=6, val=6, test=6, unused=18" in caplog.text
    art = dataset.run(load_config(None, [a for a in args[2::2]]))
    assert read_classes(art).column(S.CLASS_NAME).to_pylist() == ["red circle", "blue square", "green triangle"]
    assert len(list((tmp_path / "synthetic").glob("*/_SUCCESS"))) == 1


def test_import_is_cheap():
    code = ("import sys, raugment.stages.dataset.stage, raugment.stages.dataset.sources.synthetic, "
            "raugment.stages.dataset.classnames; "
            "print(sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
