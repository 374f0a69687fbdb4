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
