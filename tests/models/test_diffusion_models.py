"""The tiny SD bundle is in the real diffusers layout and loads through the one loading path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from raugment.models.diffusion import load_components, load_pipeline, script_safety_checker

PROMPTS = [
    "A photo of tiger shark, Galeocerdo cuvieri.",
    "a bad photo of a desktopcomputer.",
    "A photo of multiple different sharks in a coffee shop, Ünïcode 123!",
]


def test_bundle_layout(tiny_sd):
    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker",
                 "feature_extractor"):
        assert part in index and (tiny_sd / part).is_dir(), part
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert (tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_sd / "text_encoder" / "model.safetensors").is_file()
    assert (tiny_sd / "tokenizer" / "merges.txt").is_file()
    assert json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"


def test_tokenizer_matches_open_clip(tiny_sd):
    open_clip = pytest.importorskip("open_clip")
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    theirs = open_clip.get_tokenizer("ViT-L-14")
    assert len(ours) == 49408
    for prompt in PROMPTS:
        a = ours(prompt).input_ids
        b = [t for t in theirs([prompt])[0].tolist() if t != 0]  # open_clip pads with 0
        assert a == b, prompt
        assert a[0] == 49406 and a[-1] == 49407


def test_text2img_deterministic_and_seeded(tiny_sd):
    import torch

    pipe = load_pipeline(str(tiny_sd), scheduler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"

    def gen(seeds):
        out = pipe(["A photo of cat."] * len(seeds), num_inference_steps=3, height=64, width=64,
                   generator=[torch.Generator().manual_seed(s) for s in seeds])
        return out.images, out.nsfw_content_detected

    (a0, a1), flags = gen([1, 2])
    (b0, b1), _ = gen([1, 2])
    (c0,), _ = gen([1])
    assert a0.size == (64, 64)
    assert flags == [False, False]  # the tiny checker's thresholds flag nothing
    assert np.array_equal(np.asarray(a0), np.asarray(b0))
    assert np.array_equal(np.asarray(a1), np.asarray(b1))
    # another batch size changes float summation order, hence at most a grey level or two
    assert np.abs(np.asarray(a0, dtype=int) - np.asarray(c0, dtype=int)).max() <= 3
    assert np.abs(np.asarray(a0, dtype=int) - np.asarray(a1, dtype=int)).max() > 30


def test_options_and_img2img(tiny_sd, tmp_path):
    import torch
    from PIL import Image

    bundle = tmp_path / "sd"
    shutil.copytree(tiny_sd, bundle)
    script_safety_checker(bundle, flag_every=2)
    pipe = load_pipeline(str(bundle), kind="img2img", sdpa=False, channels_last=True, vae_slicing=True)
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(pipe.safety_checker).__name__ == "ScriptedSafetyChecker"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = pipe([""] * 4, image=[image] * 4, strength=0.5, guidance_scale=1.0, num_inference_steps=4,
               generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert out.nsfw_content_detected == [False, True, False, True]
    assert np.asarray(out.images[1]).max() == 0  # flagged images are blacked out, as upstream
    assert np.asarray(out.images[0]).max() > 0

    plain = load_pipeline(str(bundle), safety_checker=False)
    assert plain.safety_checker is None


def test_load_components(tiny_sd):
    parts = load_components(str(tiny_sd))
    assert type(parts["noise_scheduler"]).__name__ == "DDPMScheduler"
    assert parts["unet"].config.cross_attention_dim == parts["text_encoder"].config.hidden_size
    assert parts["tokenizer"]("a photo").input_ids[0] == 49406


def test_bad_options(tiny_sd):
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(str(tiny_sd), dtype="float8")
    with pytest.raises(ValueError, match="kind"):
        load_pipeline(str(tiny_sd), kind="inpaint")
    with pytest.raises(ValueError, match="known: .*pndm"):
        load_pipeline(str(tiny_sd), scheduler="nope")


def test_full_size_architecture_is_sd14(tiny_sd):
    """``sd14``: the real SD v1.4 architecture (built on the meta device: no memory, no weights)."""
    import torch

    from raugment.models.diffusion import build_random_sd

    with torch.device("meta"):
        pipe = build_random_sd(tiny_sd / "tokenizer", "sd14")
    millions = {name: round(sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6, 1)
                for name in ("unet", "vae", "text_encoder")}
    assert millions == {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1}
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.cross_attention_dim == 768
    with pytest.raises(ValueError, match="known: tiny, sd14"):
        build_random_sd(tiny_sd / "tokenizer", "sd3")
