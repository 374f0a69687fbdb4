"""Preflight as a user meets it (issue 18): ``--dry-run`` runs the real run's checks and lists every
problem; a dataset path beside the synthetic source; model references that are not there."""

from __future__ import annotations

from pathlib import Path

import pytest

from raugment import cli
from raugment.config import load_config
from raugment.core.config import ConfigError, PreflightError
from tests.helpers.studies import valid_study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A valid study YAML: a tiny ImageFolder and a stand-in diffusers directory."""
    return valid_study(tmp_path_factory.mktemp("preflight"), ["simple", "retrieval"],
                       expected={"classes": 2, "train_images": 4, "max_per_class": 2})["study"]


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


def _hub_cache(root: Path, repo: str, files: list[str]) -> Path:
    """A Hugging Face hub cache holding ``files`` of ``repo`` (the layout huggingface_hub reads)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123abcd")
    for name in files:
        path = repo_dir / "snapshots" / "0123abcd" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    return root


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = _hub_cache(tmp_path / "hub", "org/sd", ["model_index.json", "safety_checker/config.json"])
    _hub_cache(cache, "org/no-checker", ["model_index.json"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_an_uncached_hub_id_is_refused_offline_naming_the_key(study, tmp_path, offline_cache, monkeypatch):
    from raugment.study.executor import preflight_problems

    def problems(*overrides):
        cfg = load_config(str(study), [f"run.root={tmp_path / 'r'}", "study.methods=[simple, ft_conditioning]",
                                       "filter.filters=[nsfw, min_size]", *overrides])
        return [str(p) for p in preflight_problems(cfg)[1]]

    assert problems("generate.model=org/sd", "finetune.model=org/sd") == []
    found = problems("generate.model=org/missing", "finetune.model=org/sd")
    assert any(p.startswith("generate.model: hub model 'org/missing' is not in the local Hugging Face cache")
               and "hf download org/missing" in p for p in found), found
    assert any(p.startswith("filter.safety_model (unset: generate.model's)") for p in found), found
    found = problems("generate.model=org/sd", "finetune.model=org/gone", "filter.safety_model=org/no-checker")
    assert any(p.startswith("finetune.model: hub model 'org/gone'") for p in found), found
    assert any(p.startswith("filter.safety_model: hub model 'org/no-checker'")
               and "safety_checker/config.json" in p for p in found), found
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")   # online: a hub id resolves (downloads) when loaded
    assert problems("generate.model=org/missing", "finetune.model=org/gone") == []


def test_retrieve_safety_model_hub_id_is_checked_offline(offline_cache):
    from raugment.config import from_dict
    from raugment.stages.retrieve.stage import check_models

    def rcfg(model):
        return from_dict({"retrieve": {"aesthetic_model": "random", "safety_model": model}}).retrieve

    check_models(rcfg("org/sd"))
    with pytest.raises(ConfigError, match=r"retrieve.safety_model: hub model 'org/missing' is not in the local"):
        check_models(rcfg("org/missing"))


def test_a_stage_s_config_and_resource_problems_are_both_listed(study, tmp_path):
    from raugment.study.executor import preflight_problems

    cfg = load_config(str(study), [f"run.root={tmp_path / 'r'}", "generate.model=/nowhere/sd",
                                   "generate.pool.num_gpus=1"])
    found = [str(p) for p in preflight_problems(cfg)[1]]
    assert any(p.startswith("generate.model: '/nowhere/sd' does not exist") for p in found), found
    assert any(p.startswith("generate.pool asks for 1 GPUs") for p in found), found
