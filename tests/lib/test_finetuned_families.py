"""The learned-table families on the tiny SD bundle: pseudo-word injection, init words, family by key."""

from __future__ import annotations

import pytest
import torch

from raugment.lib.finetuned.families import (
    FAMILIES,
    PLACEHOLDER,
    ConditioningFamily,
    PseudowordFamily,
    encode_with_pseudowords,
    family_of,
    init_word,
    placeholder_id,
    tokenize,
)


@pytest.fixture()
def comps(tiny_sd):
    from raugment.models.diffusion import load_components

    return load_components(str(tiny_sd))


def test_placeholder_token_carries_the_learned_vector(comps):
    tok, te = comps["tokenizer"], comps["text_encoder"]
    ids = tokenize(tok, [f"a photo of a {PLACEHOLDER}"] * 2)
    vectors = torch.randn(2, te.config.hidden_size)
    with torch.no_grad():
        out = encode_with_pseudowords(te, ids, placeholder_id(tok), vectors)
        plain = te(ids).last_hidden_state
    assert not torch.allclose(out, plain)                 # the vector changed the encoding
    assert not torch.allclose(out[0], out[1])             # and each prompt got its own
    torch.testing.assert_close(out[:, :5], plain[:, :5])  # causal: tokens before "*" unchanged
    assert te.get_input_embeddings()._forward_hooks == {}  # the hook is removed afterwards


def test_init_word_is_the_last_word_of_the_first_lemma():
    assert init_word("tiger shark, Galeocerdo cuvieri") == "shark"
    assert init_word("Granny_Smith") == "Smith"
    assert init_word("axolotl, mud puppy, Ambystoma mexicanum") == "axolotl"
    with pytest.raises(ValueError):
        init_word(" , x")


def test_a_snapshot_key_names_its_family():
    assert set(FAMILIES) == {"conditioning", "embeddings"}
    assert type(family_of("conditioning")) is ConditioningFamily and not family_of("conditioning").pseudowords
    assert type(family_of("embeddings")) is PseudowordFamily and family_of("embeddings").pseudowords
    with pytest.raises(ValueError, match=r"'lora'.*known: conditioning, embeddings"):
        family_of("lora")


def test_the_families_know_no_method():
    for family in FAMILIES.values():
        assert family.name == "" and family.trains_unet is False
