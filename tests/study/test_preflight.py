"""Preflight as a user meets it (issue 18): ``--dry-run`` runs the real run's checks and lists every
problem; a dataset path beside the synthetic source; model references that are not there."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raugment import cli
from raugment.config import load_config
from raugment.core.config import ConfigError, PreflightError
from tests.test_bad_inputs import make_folder


class RayStarted(BaseException):
    """Raised where a stage would start Ray."""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A valid study YAML: a tiny ImageFolder and a stand-in diffusers directory."""
    base = tmp_path_factory.mktemp("preflight")
    folder = make_folder(base / "data")
    sd = base / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text("{}")
    cfg = {
        "run": {"root": str(base / "runs"), "progress": False},
        "cluster": {"num_cpus": 2, "num_gpus": 0},
        "dataset": {"source": "imagefolder", "path": str(folder), "protocol": "subsample", "fraction": 0.5},
        "generate": {"model": str(sd), "pool": {"num_gpus": 0}},
        "finetune": {"model": str(sd)},
        "index": {"source": "images", "path": str(folder / "train")},
        "retrieve": {"backend": "local"},
        "filter": {"filters": ["min_size"]},
        "train": {"model": "tiny_cnn", "batch_size": 8, "workers": {"num_workers": 1}},
        "study": {"methods": ["simple", "retrieval"], "ratios": [100], "sets": 1,
                  "expected": {"classes": 2, "train_images": 4, "max_per_class": 2}},
    }
    path = base / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tripwire(monkeypatch):
    import ray

    def refuse(*_a, **_k):
        raise RayStarted("Ray would start here")

    monkeypatch.setattr("raugment.runtime.cluster.init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


TWO_PROBLEMS = ["study.methods=[simple, retreival]", "dataset.path=/nowhere/imagenet"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_dry_run_runs_preflight_and_lists_every_problem(study, tmp_path, capsys):
    root = tmp_path / "runs"
    rc = cli.main(["run", str(study), "--dry-run", "--set", f"run.root={root}", *_sets(TWO_PROBLEMS)])
    out = capsys.readouterr()
    assert rc == 2
    assert "study.methods[1]: unknown method 'retreival'" in out.err
    assert "dataset.path: '/nowhere/imagenet' does not exist" in out.err
    assert "2 problem(s)" in out.err
    assert not root.exists()


def test_dry_run_still_prints_the_plan_when_the_data_is_not_there(study, tmp_path, capsys):
    rc = cli.main(["run", str(study), "--dry-run", "--set", f"run.root={tmp_path / 'r'}",
                   "--set", "dataset.path=/nowhere/imagenet"])
    out = capsys.readouterr()
    assert rc == 2 and "total" in out.out and "classifiers" in out.out
    assert "dataset.path" in out.err


def test_dry_run_of_a_valid_study_exits_0(study, tmp_path, capsys):
    rc = cli.main(["run", str(study), "--dry-run", "--set", f"run.root={tmp_path / 'r'}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "total" in out.out and "problem" not in out.err


def test_the_real_run_refuses_the_same_problems_together_before_ray(study, tmp_path, tripwire):
    from raugment.study.executor import preflight

    cfg = load_config(str(study), [f"run.root={tmp_path / 'r'}", *TWO_PROBLEMS])
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    messages = [str(p) for p in err.value.problems]
    assert len(messages) == 2
    assert "retreival" in messages[0] and "dataset.path" in messages[1]
    assert not (tmp_path / "r").exists()


def test_dataset_path_with_the_synthetic_source_is_refused():
    with pytest.raises(ConfigError, match=r"dataset.path='/my/imagenet' is set, but dataset.source='synthetic'"
                                          r".*dataset.source=imagefolder"):
        load_config(None, ["dataset.path=/my/imagenet"])
    with pytest.raises(ConfigError, match=r"dataset.test_path"):
        load_config(None, ["dataset.test_path=/my/imagenet/val"])
    assert load_config(None, ["dataset.source=imagefolder", "dataset.path=/my/imagenet"]).dataset.path
