"""Textual inversion (``textual_inversion``, method 8): a pseudo-word per class from its last word, its cost."""

from __future__ import annotations

import pytest
import torch

from raugment.lib.finetuned.families import CondRow, init_token_ids
from raugment.stages.finetune.methods import get_method

ROWS = [CondRow(0, 0, "tiger shark, Galeocerdo cuvieri", 0, 3), CondRow(1, 1, "axolotl, mud puppy", 0, 2)]


def test_pseudoword_init_picks_the_last_word_and_averages_split_tokens(comps, one_thread):
    tok = comps["tokenizer"]
    weight = comps["text_encoder"].get_input_embeddings().weight
    shark = init_token_ids(tok, "tiger shark, Galeocerdo cuvieri")
    assert shark == tok("shark", add_special_tokens=False).input_ids and len(shark) == 1
    axolotl = init_token_ids(tok, "axolotl, mud puppy")
    assert len(axolotl) > 1  # CLIP's BPE splits it into several tokens
    table = get_method("textual_inversion").init_table(comps, ROWS)
    torch.testing.assert_close(table[0], weight[shark[0]].detach())
    torch.testing.assert_close(table[1], weight[axolotl].detach().mean(0))


def test_only_the_pseudo_words_train_and_it_costs_368_hours():
    method = get_method("textual_inversion")
    assert method.pseudowords and not method.trains_unet and method.table_key == "embeddings"
    assert method.gpu_s_per_image == pytest.approx(368 * 3600 / 126_861)
