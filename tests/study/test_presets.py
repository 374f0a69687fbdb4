"""The shipped presets follow the paper (Burg et al. 2023, section 3) where they run its study."""

from __future__ import annotations

import pytest

from raugment.config import load_config
from raugment.stages.finetune.methods.ft_cluster_conditioning import Settings as ClusterSettings
from tests import REPO

CONFIGS = REPO / "jobs" / "configs"
PAPER_PRESETS = ("imagenet10.yaml", "imagenet_full.yaml", "caltech256.yaml")


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_the_aesthetic_filter_judges_retrieved_images_only(name):
    cfg = load_config(CONFIGS / name)
    if "aesthetic" in cfg.filter.filters:
        assert cfg.filter.only_on.get("aesthetic") == ["retrieved"]


def test_imagenet10_runs_ft_cluster_conditioning_with_the_papers_best_k():
    cfg = load_config(CONFIGS / "imagenet10.yaml")
    assert "ft_cluster_conditioning" in cfg.study.methods
    assert ClusterSettings.of(cfg.finetune).clusters == 5


@pytest.mark.parametrize("name, key, values", [
    ("tune_ft_clusters.yaml", "finetune.clusters", [1, 5, 10, 15]),  # the paper's sweep of k
    ("tune_ft_lr.yaml", "finetune.lr", None),
])
def test_shipped_finetuning_sweeps_run_the_study_graph_of_imagenet10(fake_stages, name, key, values):
    from raugment.core.config import to_dict
    from raugment.study import tune

    cfg = load_config(CONFIGS / name)
    study = load_config(CONFIGS / "imagenet10.yaml")
    assert cfg.tune.pipeline == "study" and list(cfg.tune.space) == [key]
    if values is not None:
        assert cfg.tune.space[key] == values
    else:
        assert len(cfg.tune.space[key]) >= 3 and study.finetune.lr in cfg.tune.space[key]
    for section in to_dict(study):
        if section not in ("study", "tune", "report"):
            assert to_dict(getattr(cfg, section)) == to_dict(getattr(study, section)), section
    tune._check_space(cfg, {"dataset": None}, tune.study_pipeline)  # one method, one ratio: it plans
