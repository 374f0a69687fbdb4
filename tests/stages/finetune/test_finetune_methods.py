"""The five methods on the tiny SD bundle: initialisation, loss falls, pseudo-word injection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raugment.lib.finetuned.methods import (
    PLACEHOLDER,
    CondRow,
    build_personaliser,
    encode_prompts,
    encode_with_pseudowords,
    get_method,
    init_token_ids,
    load_trainable_state,
    placeholder_id,
    tokenize,
    trainable_state,
)
from raugment.lib.prompts import simple_nows_prompt

METHODS = ["ft_conditioning", "ft_cluster_conditioning", "imagic", "textual_inversion", "pseudoword_dm"]
ROWS = [CondRow(0, 0, "tiger shark, Galeocerdo cuvieri", 0, 3), CondRow(1, 1, "axolotl, mud puppy", 0, 2)]


@pytest.fixture(autouse=True)
def one_thread():
    """Two intra-op threads on a loaded 2-core box spin against each other (measured ~100x slower
    per step at load 15); one thread keeps these steps at tens of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def comps(tiny_sd):
    from raugment.models.diffusion import load_components

    return load_components(str(tiny_sd))


def test_conditioning_is_initialised_from_the_no_whitespace_simple_prompt(comps):
    table = get_method("ft_conditioning").init_table(comps, ROWS)
    assert table.shape == (2, 77, comps["text_encoder"].config.hidden_size)
    expected = encode_prompts(comps["text_encoder"], comps["tokenizer"], [simple_nows_prompt(ROWS[1].class_name)])
    torch.testing.assert_close(table[1], expected[0])
    assert not torch.allclose(table[0], table[1])


def test_pseudoword_init_picks_the_last_word_and_averages_split_tokens(comps):
    tok = comps["tokenizer"]
    weight = comps["text_encoder"].get_input_embeddings().weight
    shark = init_token_ids(tok, "tiger shark, Galeocerdo cuvieri")
    assert shark == tok("shark", add_special_tokens=False).input_ids and len(shark) == 1
    axolotl = init_token_ids(tok, "axolotl, mud puppy")
    assert len(axolotl) > 1  # CLIP's BPE splits it into several tokens
    table = get_method("textual_inversion").init_table(comps, ROWS)
    torch.testing.assert_close(table[0], weight[shark[0]].detach())
    torch.testing.assert_close(table[1], weight[axolotl].detach().mean(0))


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


@pytest.mark.parametrize("name", METHODS)
def test_each_method_loss_falls_on_a_repeated_tiny_batch(comps, name):
    method = get_method(name)
    net = build_personaliser(method, comps, method.init_table(comps, ROWS))
    trainable = [p for p in net.parameters() if p.requires_grad]
    expected = 1 if not method.trains_unet else 1 + len(list(comps["unet"].parameters()))
    assert len(trainable) == expected  # only the table (and the UNet when the method trains it)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    rows = torch.tensor([0, 1, 0, 1])
    ids = method.prompt_ids(comps, 4, np.random.default_rng(0))
    frozen_te = comps["text_encoder"].get_input_embeddings().weight.clone()
    opt = torch.optim.Adam(trainable, lr=1e-3 if method.trains_unet else 2e-2)
    losses = []
    for _ in range(8):
        loss = net(latents, noise, t, rows, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(comps["text_encoder"].get_input_embeddings().weight, frozen_te)
    # the saved state round-trips into a fresh module
    state = trainable_state(net, method)
    fresh = build_personaliser(method, comps, torch.zeros_like(net.table))
    load_trainable_state(fresh, method, state)
    torch.testing.assert_close(fresh.table, net.table)


def test_inception_features_are_pool_features(tiny_sd):
    from PIL import Image

    from raugment.core import schema
    from raugment.core.imageio import encode_image
    from raugment.stages.finetune.kmeans import InceptionFeatures

    imgs = [encode_image(Image.new("RGB", (32, 32), c), "PNG") for c in ("red", "blue", "green")]
    out = InceptionFeatures(weights=None, size=75, device="cpu")(
        {schema.ID: np.array(["a", "b", "c"]), schema.LABEL: np.array([0, 0, 1]), schema.IMAGE: imgs})
    feats = np.stack(out["features"])
    assert feats.shape == (3, 2048)
    assert not np.allclose(feats[0], feats[1])
