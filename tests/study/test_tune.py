import sys

import pytest

from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.study import tune
from tests.helpers.train_data import make_dataset


def _cfg(root, *extra):
    return load_config(overrides=[
        f"run.root={root}", "run.progress=false", "train.model=tiny_cnn", "train.image_size=32",
        "train.batch_size=16", "train.max_epochs=1", "train.loader_workers=0",
        "train.workers.num_workers=1", "assemble.ratio=0", *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tune"), [12] * 3, val=3, test=3)


def fake_pipeline(cfg, inputs):
    """A pipeline that trains nothing: proves the trial's overrides and inputs reach it."""
    assert inputs["dataset"].complete
    return {S.VAL_TOP1_BEST: 1.0 - cfg.train.lr, S.TEST_TOP1: cfg.assemble.ratio / 1000,
            "momentum_seen": cfg.train.momentum}


def test_space_errors_name_the_key_before_any_work(dataset, tmp_path):
    with pytest.raises(ConfigError, match="tune.space is empty"):
        tune.run(_cfg(tmp_path), dataset)
    with pytest.raises(ConfigError, match="train.lrr"):
        tune.run(_cfg(tmp_path, "tune.space={train.lrr: [0.1]}"), dataset)
    with pytest.raises(ConfigError, match="train.lr"):
        tune.run(_cfg(tmp_path, "tune.space={train.lr: [fast]}"), dataset)
    assert not (tmp_path / "tune").exists()


@pytest.mark.timeout(300)
def test_custom_pipeline_gets_each_trials_overrides(ray_session, dataset, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    cfg = _cfg(tmp_path, "tune.space={train.lr: [0.1, 0.3], assemble.ratio: [100]}",
               "train.momentum=0.5", "tune.max_concurrent=2")
    art = tune.run(cfg, dataset, pipeline=fake_pipeline)
    rows = sorted(tune.read_results(art).to_pylist(), key=lambda r: r["train.lr"])
    assert [r["train.lr"] for r in rows] == [0.1, 0.3]
    assert [r[S.VAL_TOP1_BEST] for r in rows] == pytest.approx([0.9, 0.7])
    assert {r["assemble.ratio"] for r in rows} == {100} and {r[S.TEST_TOP1] for r in rows} == {0.1}
    assert {r["status"] for r in rows} == {"complete"}
    assert '"train.lr": 0.1' in (art.path / "best.json").read_text()


@pytest.mark.timeout(420)
def test_lr_sweep_of_two_trials_completes_on_two_cpus(ray_session, dataset, tmp_path):
    cfg = _cfg(tmp_path, "tune.space={train.lr: [0.05, 0.01]}", "tune.max_concurrent=2",
               "tune.scheduler=asha", "tune.grace_period=1")
    art = tune.run(cfg, dataset)
    rows = tune.read_results(art).to_pylist()
    assert sorted(r["train.lr"] for r in rows) == [0.01, 0.05]
    assert {r["status"] for r in rows} <= {"complete", "stopped"}
    done = [r for r in rows if r["status"] == "complete"]
    assert done and all(0 <= r[S.TEST_TOP1] <= 1 and r[S.EPOCHS_RUN] == 1 for r in done)
    # each trial's train run is a normal stage artifact the report can open
    assert all((tmp_path / "train").glob("*/results.json"))
