"""Pseudo-word + DM (``pseudoword_dm``, method 9): textual inversion with the UNet trained, its cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raugment.lib.finetuned.families import CondRow, build_trainable, trainable_state
from raugment.stages.finetune.methods import get_method


def test_the_unet_trains_with_the_pseudo_words(comps, one_thread):
    method = get_method("pseudoword_dm")
    assert method.pseudowords and method.trains_unet and method.table_key == "embeddings"
    rows = [CondRow(0, 0, "tiger shark", 0, 1, "<raug-0>")]
    net = build_trainable(method, comps, method.init_table(comps, rows))
    assert net.unet is comps["unet"] and all(p.requires_grad for p in net.unet.parameters())
    state = trainable_state(net, method)
    assert "embeddings" in state and any(k.startswith("unet.") for k in state)
    ids = method.prompt_ids(comps, 3, np.random.default_rng(0))
    assert ids.shape == (3, comps["tokenizer"].model_max_length) and isinstance(ids, torch.Tensor)


def test_cost_is_the_papers_720_v100_hours_on_10_percent_imagenet():
    assert get_method("pseudoword_dm").gpu_s_per_image == pytest.approx(720 * 3600 / 126_861)
