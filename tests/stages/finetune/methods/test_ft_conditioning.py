"""FT conditioning (``ft_conditioning``, method 5): initialised from ②, the section's kept epochs, its cost."""

from __future__ import annotations

import pytest
import torch

from raugment.config import load_config
from raugment.lib.finetuned.families import CondRow, encode_prompts
from raugment.lib.prompts import simple_nows_prompt
from raugment.stages.finetune.methods import get_method

ROWS = [CondRow(0, 0, "tiger shark, Galeocerdo cuvieri", 0, 3), CondRow(1, 1, "axolotl, mud puppy", 0, 2)]


def test_conditioning_is_initialised_from_the_no_whitespace_simple_prompt(comps, one_thread):
    table = get_method("ft_conditioning").init_table(comps, ROWS)
    assert table.shape == (2, 77, comps["text_encoder"].config.hidden_size)
    expected = encode_prompts(comps["text_encoder"], comps["tokenizer"], [simple_nows_prompt(ROWS[1].class_name)])
    torch.testing.assert_close(table[1], expected[0])
    assert not torch.allclose(table[0], table[1])


def test_keeps_the_epochs_of_the_section_and_trains_only_the_table():
    method = get_method("ft_conditioning")
    assert method.keep_epochs(load_config().finetune) == [1, 2, 3]
    assert method.keep_epochs(load_config(None, ["finetune.keep_epochs=[2, 5]"]).finetune) == [2, 5]
    assert not method.trains_unet and not method.pseudowords and method.table_key == "conditioning"


def test_cost_is_the_papers_380_v100_hours_on_10_percent_imagenet():
    assert get_method("ft_conditioning").gpu_s_per_image == pytest.approx(380 * 3600 / 126_861)
