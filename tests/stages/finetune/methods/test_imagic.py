"""Imagic (``imagic``, method 7): trains the UNet, keeps its first ``imagic_epochs``, its cost."""

from __future__ import annotations

import pytest

from raugment.config import load_config
from raugment.core.config import ConfigError
from raugment.stages.finetune.config import FinetuneConfig
from raugment.stages.finetune.methods import get_method
from raugment.stages.finetune.policy import EpochRecord, checkpoint_tags


def test_imagic_keeps_its_first_eight_epochs():
    cfg = FinetuneConfig()
    assert get_method("imagic").keep_epochs(cfg) == list(range(1, 9))
    assert get_method("ft_conditioning").keep_epochs(cfg) == [1, 2, 3]
    hist = [EpochRecord(e, 1.0 / e, 1.0 / e) for e in range(1, 11)]
    assert set(checkpoint_tags(hist, get_method("imagic").keep_epochs(cfg))) == set(range(1, 9)) | {10}


def test_imagic_epochs_is_its_key():
    assert get_method("imagic").keep_epochs(load_config(None, ["finetune.imagic_epochs=3"]).finetune) == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"finetune\.imagic_epochs must be > 0"):
        load_config(None, ["finetune.imagic_epochs=0"])


def test_trains_the_unet_with_a_conditioning_table_and_costs_552_hours():
    method = get_method("imagic")
    assert method.trains_unet and method.table_key == "conditioning"
    assert method.gpu_s_per_image == pytest.approx(552 * 3600 / 126_861)
