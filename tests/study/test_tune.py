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


def test_a_train_trial_refuses_keys_it_never_reads(dataset, tmp_path):
    """Sweeping the fine-tuning LR with the assemble -> train trial would give identical trials."""
    with pytest.raises(ConfigError, match=r"tune\.space\.finetune\.lr: a tune\.pipeline=train trial.*never "
                                          r"reads it.*tune\.pipeline=study"):
        tune.run(_cfg(tmp_path, "tune.space={finetune.lr: [0.001, 0.01]}"), dataset)
    assert not (tmp_path / "tune").exists()


def test_a_study_trial_runs_the_methods_graph_with_the_swept_key(fake_stages, tmp_path, monkeypatch):
    from collections import Counter

    from raugment.core.config import with_overrides
    from raugment.core.storage import run_stage
    from raugment.stages.finetune.methods.ft_cluster_conditioning import Settings
    from raugment.stages.train import stage as train_stage
    from tests.study.test_study import FakeStages

    class Stages(FakeStages):
        def __init__(self):
            super().__init__()
            self.clusters = []

        def finetune(self, cfg, dataset):
            self.clusters.append(Settings.of(cfg.finetune).clusters)
            return run_stage(cfg.run.root, "finetune", cfg.finetune, {"dataset": dataset}, lambda r: None)

        def generate(self, cfg, dataset, finetune):
            return run_stage(cfg.run.root, "generate", cfg.generate, {"dataset": dataset, "finetune": finetune},
                             lambda r: self._images(r, cfg.generate.method, "added", 4))

    stages = fake_stages(Stages())
    seen = []

    def train(cfg, dataset, manifest, callbacks=()):
        seen.append(list(callbacks))
        stages.calls.append("train")
        return stages.train(cfg, dataset, manifest)

    monkeypatch.setattr(train_stage, "run", train)
    cfg = _cfg(tmp_path, "study.methods=[ft_cluster_conditioning]", "study.ratios=[100]",
               "study.select_checkpoint=false", "tune.pipeline=study", "tune.space={finetune.clusters: [1, 5]}")
    data = stages.dataset(cfg)
    tune._check_space(cfg, {"dataset": data}, tune.study_pipeline)
    got = {k: tune.study_pipeline(with_overrides(cfg, {"finetune.clusters": k}), {"dataset": data}) for k in (1, 5, 5)}
    assert stages.clusters == [1, 5, 5]  # each trial fine-tunes with its own k (a repeat is skipped by its key)
    assert Counter(stages.calls) == {"finetune": 3, "generate": 3, "filter": 3, "dedup": 3,
                                     "audit": 3, "assemble": 3, "train": 3}
    assert got[1][S.RUN_PATH] != got[5][S.RUN_PATH] and S.VAL_TOP1_BEST in got[1]
    assert seen == [[], [], []]  # outside a Tune session; inside, only this classifier reports
    for bad, match in (("study.methods=[simple, ft_conditioning]", "one method in study.methods"),
                       ("study.ratios=[100, 200]", "one ratio"),
                       ("tune.space={study.sets: [1, 2]}", r"tune\.space\.study\.sets")):
        with pytest.raises(ConfigError, match=match):
            tune._check_space(with_overrides(cfg, {bad.split("=")[0]: _value(bad)}), {"dataset": data},
                              tune.study_pipeline)


def _value(override):
    import yaml

    return yaml.safe_load(override.split("=", 1)[1])
