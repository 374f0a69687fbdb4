"""The select stage: pointers keyed by snapshot, the choice by validation top-1, and the generator
following a pointer to its snapshot."""

import json

import pytest

from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.core.storage import run_stage, write_text_atomic
from raugment.lib.finetuned.artifact import SELECTED, read_pointer, resolve, write_selected
from raugment.stages.select import stage as select
from tests.helpers.finetuned import make_finetune


def _cfg(root, *overrides):
    return load_config(None, [f"run.root={root}", *overrides])


def _classifier(root, name, val_top1):
    """A train artifact stand-in holding only the validation top-1 the select stage reads."""
    body = lambda r: write_text_atomic(json.dumps({S.VAL_TOP1_BEST: val_top1}), r.path / "results.json")  # noqa: E731
    return run_stage(root, "train", {"fake": name}, {}, body)


def test_pointers_are_keyed_by_snapshot_and_resolve_to_it(tmp_path):
    ft = make_finetune(tmp_path)
    best_val = select.run(_cfg(tmp_path, "select.checkpoint=best_val"), ft)
    epoch_1 = select.run(_cfg(tmp_path, "select.checkpoint=epoch_001"), ft)
    epoch_2 = select.run(_cfg(tmp_path, "select.checkpoint=epoch_002"), ft)
    # best_val is epoch 1: one artifact, so what is generated and trained from it runs once
    assert best_val.path == epoch_1.path != epoch_2.path
    artifact, snapshot, name = resolve(epoch_2.path)
    assert artifact == ft.path and snapshot == ft.path / "checkpoints" / "epoch_002" and name == "epoch_002"
    # the fine-tuning artifact's own selected.json is not a pointer
    write_selected(ft.path, "best_val")
    assert read_pointer(ft.path) is None and read_pointer(epoch_2.path)["epoch"] == 2


def test_a_checkpoint_the_run_did_not_keep_points_at_best_val(tmp_path, caplog):
    ft = make_finetune(tmp_path, {1: ["best_val", "best_train", "epoch_001"]})  # stopped after epoch 1
    art = select.run(_cfg(tmp_path, "select.checkpoint=epoch_003"), ft)
    assert json.loads((art.path / SELECTED).read_text())["checkpoint"] == "best_val"
    assert "kept no checkpoint 'epoch_003'" in caplog.text
    with pytest.raises(ConfigError, match="select.checkpoint"):
        select.run(_cfg(tmp_path), ft)


@pytest.mark.parametrize("planted, chosen", [
    ({"best_train": 0.5, "best_val": 0.4, "epoch_001": 0.4, "epoch_002": 0.8, "epoch_003": 0.5}, "epoch_002"),
    # a tie keeps the earlier epoch (2 before 3)
    ({"best_train": 0.8, "best_val": 0.4, "epoch_001": 0.4, "epoch_002": 0.8, "epoch_003": 0.8}, "epoch_002"),
    ({"best_train": 0.1, "best_val": 0.9, "epoch_001": 0.9, "epoch_002": 0.3, "epoch_003": 0.1}, "best_val"),
])
def test_the_choice_is_the_argmax_of_validation_top1(tmp_path, planted, chosen):
    ft = make_finetune(tmp_path)
    scores = {name: _classifier(tmp_path, name, v) for name, v in planted.items()}
    scores["epoch_009"] = _classifier(tmp_path, "epoch_009", 1.0)  # not kept: never chosen
    art = select.run(_cfg(tmp_path), ft, scores)
    got = json.loads((art.path / SELECTED).read_text())
    assert got["checkpoint"] == chosen and got["not_kept"] == ["epoch_009"]
    assert {c["name"]: c["val_top1"] for c in got["candidates"]} == planted
    assert [c["name"] for c in got["candidates"] if c["chosen"]] == [chosen]
    assert all(c["classifier"].startswith("train/") for c in got["candidates"])  # relative to the root
    assert art.stats["counts"]["snapshots_scored"] == 3
    _, snapshot, name = resolve(art.path)  # the generator follows the choice
    assert name == chosen and snapshot.name == f"epoch_{got['epoch']:03d}"


def test_bad_select_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"select\.candidates\[1\]"):
        _cfg(tmp_path, "select.candidates=[best_val, epoch_2]")
    with pytest.raises(ConfigError, match=r"select\.candidates has duplicates"):
        _cfg(tmp_path, "select.candidates=[best_val, best_val]")
    with pytest.raises(ConfigError, match=r"select\.ratio"):
        _cfg(tmp_path, "select.ratio=0")
    with pytest.raises(ConfigError, match=r"select\.images_per_class"):
        _cfg(tmp_path, "select.images_per_class=0")
