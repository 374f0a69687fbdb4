"""The mini diffusion model: deterministic, in the SD layout, and its images show their class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raugment.demo import mini_diffusion as md
from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES

CLASSES = SYNTHETIC_CLASSES[:4]  # the demo's classes


@pytest.fixture(scope="session")
def mini_pool(session_dir):
    from raugment.demo.corpus import build_corpus

    return build_corpus(session_dir / "mini_pool", CLASSES, per_class=100, distractors=60, seed=0)


@pytest.fixture(scope="session")
def mini_sd(mini_pool, session_dir):
    """The mini model at its default step counts (trained once per session)."""
    return md.train_mini_diffusion(mini_pool, session_dir / "mini_sd", seed=0)


@pytest.fixture(scope="session")
def small_pool(session_dir):
    from raugment.demo.corpus import build_corpus

    return build_corpus(session_dir / "small_pool", CLASSES, per_class=8, distractors=4, seed=1)


def _weights(bundle):
    from safetensors.torch import load_file

    return {part: load_file(str(bundle / part / "diffusion_pytorch_model.safetensors")) for part in ("unet", "vae")}


def _same(a, b) -> bool:
    import torch

    return all(a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) for k in a[p]) for p in a)


def test_bad_input_is_refused_before_work(tmp_path, small_pool):
    with pytest.raises(ValueError, match="build the pool first"):
        md.train_mini_diffusion(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="size must be a positive multiple of 16"):
        md.train_mini_diffusion(small_pool, tmp_path / "out", size=40)
    with pytest.raises(ValueError, match="max_steps"):
        md.train_mini_diffusion(small_pool, tmp_path / "out", max_steps=0)
    with pytest.raises(ValueError, match="text_init must be one of bag, random"):
        md.train_mini_diffusion(small_pool, tmp_path / "out", text_init="clip")
    assert not (tmp_path / "out").exists()


def test_deterministic_for_seed_and_steps(small_pool, tmp_path):
    a = md.train_mini_diffusion(small_pool, tmp_path / "a", seed=3, max_steps=2, vae_steps=2)
    b = md.train_mini_diffusion(small_pool, tmp_path / "b", seed=3, max_steps=2, vae_steps=2)
    c = md.train_mini_diffusion(small_pool, tmp_path / "c", seed=4, max_steps=2, vae_steps=2)
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), _weights(c))
    # the directory is replaced whole, and no temp directory is left beside it
    md.train_mini_diffusion(small_pool, tmp_path / "a", seed=4, max_steps=2, vae_steps=2)
    assert _same(_weights(tmp_path / "a"), _weights(c))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_bag_of_words_init_tells_the_class_prompts_apart(tmp_path):
    """CLIP's random init encodes the demo's class prompts almost alike; the bag of words does not."""
    import torch

    from raugment.lib.prompts import simple_nows_prompt
    from raugment.models.diffusion import build_random_sd, write_clip_tokenizer

    pipe = build_random_sd(write_clip_tokenizer(tmp_path / "tok"), "tiny", seed=0)
    te, tok = pipe.text_encoder, pipe.tokenizer
    probe = [simple_nows_prompt(name) for name in CLASSES]
    assert md.prompt_similarity(te, tok, probe) > 0.95
    md.bag_of_words_init(te, tok, seed=0)
    assert md.prompt_similarity(te, tok, probe) < 0.7
    # every padding position holds the whole prompt (its bag of words: order barely counts) ...
    ids = tok(["a red circle", "circle a red", "a blue circle", ""], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    with torch.no_grad():
        h = torch.nn.functional.normalize(te(ids).last_hidden_state, dim=-1)
    assert float((h[0, 10:] @ h[0, -1]).min()) > 0.99
    assert float(h[0, -1] @ h[1, -1]) > 0.99
    assert float(h[0, -1] @ h[2, -1]) < 0.9  # ... and one word changes it
    assert float(h[3].abs().max()) == 0.0  # "" (classifier-free guidance's prompt) encodes to zeros


def test_bundle_loads_through_the_sd_path(mini_sd):
    import torch

    from raugment.models.diffusion import load_components, load_pipeline

    index = json.loads((mini_sd / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor"):
        assert part in index and (mini_sd / part).is_dir(), part
    info = md.read_info(mini_sd)
    assert info["unet_steps"] == md.DEFAULT_STEPS and info["pool_rows"] == 460

    pipe = load_pipeline(str(mini_sd))
    gen = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = pipe(["A photo of redcircle."] * 2, num_inference_steps=5, height=32, width=32, generator=gen)
    assert [im.size for im in out.images] == [(32, 32)] * 2
    again = pipe(["A photo of redcircle."], num_inference_steps=5, height=32, width=32,
                 generator=[torch.Generator().manual_seed(1)]).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(out.images[0]))

    img2img = load_pipeline(str(mini_sd), kind="img2img")
    res = img2img(["A photo of bluesquare."], image=out.images[0], strength=0.5, num_inference_steps=10,
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert res.size == (32, 32)

    comps = load_components(str(mini_sd))
    assert comps["vae"].config.scaling_factor == pytest.approx(info["scaling_factor"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    dist = comps["vae"].encode(x).latent_dist
    assert dist.mean.shape == (2, 4, 8, 8)
    assert float(dist.std.max()) < 1e-5  # a point distribution: fine-tuning's cached latents are exact
    # the scaled pool latents have about unit spread, as SD's scaling_factor intends
    assert 0.01 < float(dist.mean.std()) * info["scaling_factor"] < 100
    # the saved text encoder is the bag of words the UNet was trained with (recorded cosine)
    from raugment.lib.prompts import simple_nows_prompt

    assert info["text_init"] == "bag"
    probe = [simple_nows_prompt(name) for name in CLASSES]
    cosine = md.prompt_similarity(comps["text_encoder"], comps["tokenizer"], probe)
    assert cosine == pytest.approx(info["class_prompt_cosine"], abs=1e-3) and cosine < 0.7


@pytest.mark.parametrize("name", ["ft_conditioning", "ft_cluster_conditioning", "imagic", "textual_inversion",
                                  "pseudoword_dm"])
def test_finetuning_methods_fine_tune_the_mini_model(mini_sd, name):
    """Methods 5-9 train on the mini bundle as on SD v1.4: the loss falls on a repeated batch."""
    import torch

    from raugment.lib.finetuned.families import CondRow, build_trainable
    from raugment.models.diffusion import load_components
    from raugment.stages.finetune.methods import get_method

    comps = load_components(str(mini_sd))
    rows = [CondRow(0, 0, "red circle", 0, 2), CondRow(1, 1, "blue square", 0, 2)]
    method = get_method(name)
    net = build_trainable(method, comps, method.init_table(comps, rows))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    ids = method.prompt_ids(comps, 4, np.random.default_rng(0))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3 if method.trains_unet else 2e-2)
    losses = []
    for _ in range(8):
        loss = net(latents, noise, t, torch.tensor([0, 1, 0, 1]), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def recognised(mini_sd):
    """(the judge's accuracy on real draws, recognisability of the mini model's generations)."""
    import torch

    from raugment.lib.loader import build_transform
    from raugment.stages.dataset.sources.synthetic import draw_named

    judge = md.train_reference_classifier(CLASSES, seed=0)
    rng = np.random.default_rng(99)
    transform = build_transform(32, train=False)
    real = torch.stack([transform(draw_named(CLASSES[i % 4], rng, 32)) for i in range(80)])
    with torch.no_grad():
        real_acc = float((judge(real).argmax(1) == torch.arange(80) % 4).float().mean())
    return real_acc, md.recognisability(mini_sd, judge, CLASSES, ("simple_nows", "clip_templates"), n=16, seed=0)


def test_generated_images_are_recognised_above_chance(recognised):
    """A classifier trained on real draws classifies prompted generations above chance."""
    real_acc, res = recognised
    assert real_acc >= 0.9  # the judge itself knows the classes
    assert res["chance"] == 0.25
    assert set(res["prompts"]["simple_nows"]["per_class"]) == set(CLASSES)
    # 64 images per prompt builder: at chance (0.25) the accuracy's s.d. is 0.054, so 0.35 is
    # 1.8 s.d. above it (measured 2026-11-24: 0.406 simple_nows, 0.484 CLIP templates)
    for builder in ("simple_nows", "clip_templates"):
        assert res["prompts"][builder]["accuracy"] >= 0.35, (builder, res)


@pytest.mark.xfail(strict=True, reason="the goal, not met: measured 2026-11-24 (seed 0, n=16/class, 20 PNDM "
                   "steps, guidance 4): 0.406 (simple_nows) and 0.484 (clip_templates) on 4 classes, chance 0.25; "
                   "was 0.375 / 0.359 with CLIP's random text init and a 150-step VAE")
def test_generated_images_are_recognised_at_twice_chance(recognised):
    _, res = recognised
    assert res["prompts"]["simple_nows"]["accuracy"] >= 2 * res["chance"], res
    assert res["prompts"]["clip_templates"]["accuracy"] >= 2 * res["chance"], res


def test_untrained_generator_is_not_recognised(tiny_sd):
    """The same measurement on the random-weight tiny SD stays near chance (the test can fail)."""
    judge = md.train_reference_classifier(CLASSES, seed=0, steps=100)
    res = md.recognisability(tiny_sd, judge, CLASSES, ("simple_nows",), n=8, seed=0, steps=4)
    assert res["prompts"]["simple_nows"]["accuracy"] <= 0.5
