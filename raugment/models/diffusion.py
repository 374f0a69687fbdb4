"""Stable Diffusion: the one loading path for hub ids and local bundles, and the tiny bundle.

Everything that runs a diffusion model (generation, fine-tuning) loads it through
:func:`load_pipeline` or :func:`load_components`, so a hub id such as
``CompVis/stable-diffusion-v1-4`` and a directory written by :func:`write_tiny_sd` take exactly
the same code path (``from_pretrained``). GPU options (dtype, SDPA, channels_last,
``torch.compile``, VAE slicing) are switched here from config.

:func:`write_tiny_sd` writes a random-weight pipeline in the real diffusers layout
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
``safety_checker/``, ``feature_extractor/``). Its tokenizer is CLIP's real BPE tokenizer, built
offline from the vocabulary file that open_clip ships, so prompts tokenize exactly as with the real
model. :class:`ScriptedSafetyChecker` is the real ``StableDiffusionSafetyChecker`` computation
with a scripted verdict, so tests and demos can drive the pipeline's own NSFW path.

torch/diffusers/transformers are imported inside functions: importing this module stays cheap
(until :class:`ScriptedSafetyChecker` is first touched, which needs diffusers).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from raugment.core.extras import require

log = logging.getLogger(__name__)

PipelineKind = Literal["text2img", "img2img"]

# kind -> diffusers pipeline class (both read the same on-disk bundle)
PIPELINE_CLASSES: dict[str, str] = {
    "text2img": "StableDiffusionPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
}

# config name -> diffusers scheduler class; swapped in with ``from_config`` so the model's own
# noise schedule (betas, offsets) is kept.
SCHEDULERS: dict[str, str] = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}

DTYPES = ("float32", "float16", "bfloat16")

# SD v1.4's scheduler settings (scheduler/scheduler_config.json of the real model).
SD14_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "clip_sample": False}

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _offline(model: str) -> bool:
    """Local directories and ``HF_HUB_OFFLINE=1`` never touch the network."""
    return Path(model).is_dir() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def torch_dtype(name: str):
    """``"float16"`` -> ``torch.float16``; a ValueError naming the accepted names."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    return getattr(torch, name)


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the scheduler registered as ``name``, keeping its config."""
    diffusers = require("diffusers")
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(sorted(SCHEDULERS))}")
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_pipeline(model: str, *, revision: str | None = None, kind: PipelineKind = "text2img",
                  dtype: str = "float32", device: str = "cpu", scheduler: str | None = None,
                  safety_checker: bool = True, sdpa: bool = True, channels_last: bool = False,
                  compile: bool = False, vae_slicing: bool = False) -> Any:
    """Load a Stable Diffusion pipeline from a hub id or a local bundle directory.

    Args:
        model: hub id (``CompVis/stable-diffusion-v1-4``) or a directory in the diffusers layout.
        revision: hub revision (commit, branch or tag); ignored for local directories.
        kind: ``"text2img"`` or ``"img2img"`` (Boomerang); both read the same bundle.
        dtype: ``float32``, ``float16`` or ``bfloat16`` (half precision only makes sense on GPU).
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        scheduler: a name in :data:`SCHEDULERS`; ``None`` keeps the bundle's scheduler.
        safety_checker: keep the bundle's safety checker (the paper drops NSFW samples).
        sdpa: PyTorch scaled-dot-product attention in the UNet and VAE (else the classic one).
        channels_last: UNet in channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the UNet (worth it for long runs; first call is slow).
        vae_slicing: decode the batch one image at a time (less GPU memory at large batches).

    Returns:
        A diffusers pipeline on ``device`` with its progress bar disabled.
    """
    if not isinstance(channels_last, bool):  # an unresolved "auto" (GenerateConfig.resolved)
        raise ValueError(f"channels_last must be true or false here, got {channels_last!r}")
    diffusers = require("diffusers")
    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"pipeline kind {kind!r} is not one of {list(PIPELINE_CLASSES)}")
    cls = getattr(diffusers, PIPELINE_CLASSES[kind])
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "local_files_only": _offline(model)}
    if revision and not Path(model).is_dir():
        kwargs["revision"] = revision
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(model, **kwargs)
    if scheduler:
        set_scheduler(pipe, scheduler)
    set_attention(pipe, sdpa)
    pipe = pipe.to(device)
    if channels_last:
        import torch

        pipe.unet.to(memory_format=torch.channels_last)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if compile:
        import torch

        pipe.unet = torch.compile(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_attention(pipe: Any, sdpa: bool) -> None:
    """SDPA (``AttnProcessor2_0``) or the classic attention in the UNet and VAE."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def load_components(model: str, *, revision: str | None = None, dtype: str = "float32",
                    device: str = "cpu") -> dict[str, Any]:
    """The trainable parts of a bundle, for fine-tuning (fine-tuning methods 5-9).

    Returns:
        ``{"unet", "vae", "text_encoder", "tokenizer", "noise_scheduler"}``; the noise scheduler is
        a ``DDPMScheduler`` built from the bundle's scheduler config (the training objective).
    """
    diffusers = require("diffusers")
    transformers = require("transformers")
    kw: dict[str, Any] = {"local_files_only": _offline(model)}
    if revision and not Path(model).is_dir():
        kw["revision"] = revision
    td = torch_dtype(dtype)
    return {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=td, **kw).to(device),
        "vae": diffusers.AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=td, **kw).to(device),
        "text_encoder": transformers.CLIPTextModel.from_pretrained(
            model, subfolder="text_encoder", dtype=td, **kw).to(device),
        "tokenizer": transformers.CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw),
        "noise_scheduler": diffusers.DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw),
    }


# --------------------------------------------------------------------------------------------
# NSFW scores
# --------------------------------------------------------------------------------------------


class SafetyScores:
    """Records the safety checker's NSFW score of every image the pipeline checks.

    diffusers returns only a flag per image; the paper's provenance wants the score. A forward
    hook on the checker's projection captures the image embeddings and scores them the way
    ``StableDiffusionSafetyChecker.forward`` does: ``max(cos(image, concept) - threshold)`` over
    the 17 concepts (> 0 means flagged; the special-care adjustment is left out).
    """

    def __init__(self, checker: Any):
        self.checker = checker
        self.last: list[float] = []
        self._handle = checker.visual_projection.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        import torch.nn.functional as F

        emb = F.normalize(output.float(), dim=-1)
        concepts = F.normalize(self.checker.concept_embeds.float(), dim=-1)
        scores = emb @ concepts.T - self.checker.concept_embeds_weights.float()
        self.last = scores.max(dim=1).values.cpu().tolist()

    def pop(self, n: int) -> list[float | None]:
        """The scores of the last check (``None`` each when no check ran)."""
        out, self.last = self.last, []
        if len(out) != n:
            return [None] * n
        return list(out)

    def close(self) -> None:
        self._handle.remove()


def _scripted_checker_class():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    class ScriptedSafetyChecker(StableDiffusionSafetyChecker):
        """The real safety checker whose verdict is scripted by its config (tests and demos).

        The full ``StableDiffusionSafetyChecker`` computation runs (CLIP vision tower, concept
        distances); then, instead of its thresholds, every ``flag_every``-th image this instance
        has checked is flagged and blacked out, just as the real checker does. ``flag_every=1``
        flags everything (a class that cannot be filled); ``0`` flags nothing.
        """

        @property
        def flag_every(self) -> int:
            return int(getattr(self.config, "flag_every", 0) or 0)

        def forward(self, clip_input, images):
            import numpy as np
            import torch

            images, _ = super().forward(clip_input, images)
            flags = []
            for i in range(len(images)):
                self._seen = getattr(self, "_seen", 0) + 1
                flag = self.flag_every > 0 and self._seen % self.flag_every == 0
                if flag:
                    images[i] = torch.zeros_like(images[i]) if torch.is_tensor(images[i]) else np.zeros(images[i].shape)
                flags.append(flag)
            return images, flags

    ScriptedSafetyChecker.__module__ = __name__
    return ScriptedSafetyChecker


def __getattr__(name: str) -> Any:
    # diffusers resolves a saved component by (module, class name): keep the class reachable as
    # ``raugment.models.diffusion.ScriptedSafetyChecker`` without importing diffusers at import.
    if name == "ScriptedSafetyChecker":
        cls = _scripted_checker_class()
        globals()[name] = cls
        return cls
    if name == "PreTrainedModel":
        # diffusers picks a component's load method by looking up base classes on its module
        return require("transformers").PreTrainedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def script_safety_checker(bundle: str | Path, flag_every: int) -> None:
    """Make a bundle's safety checker flag every ``flag_every``-th image (0: none, 1: all).

    Keeps the checker's weights; rewrites ``safety_checker/`` with :class:`ScriptedSafetyChecker`
    and points ``model_index.json`` at it. Loading such a bundle runs the pipeline's own checker
    path with a verdict a test can predict.
    """
    transformers = require("transformers")
    bundle = Path(bundle)
    cls = __getattr__("ScriptedSafetyChecker")
    config = transformers.CLIPConfig.from_pretrained(bundle / "safety_checker")
    config.flag_every = int(flag_every)
    base = cls.from_pretrained(bundle / "safety_checker", config=config)
    base.save_pretrained(bundle / "safety_checker")
    index_path = bundle / "model_index.json"
    index = json.loads(index_path.read_text())
    index["safety_checker"] = [__name__, "ScriptedSafetyChecker"]
    index_path.write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------
# Tiny bundle
# --------------------------------------------------------------------------------------------


def write_clip_tokenizer(out: str | Path) -> Path:
    """Write CLIP's real BPE tokenizer (``vocab.json`` + ``merges.txt``) built from open_clip's file.

    open_clip ships ``bpe_simple_vocab_16e6.txt.gz``: its first 48,894 merges, plus the 256 byte
    symbols with and without ``</w>`` and the two specials, give CLIP's 49,408-entry vocabulary in
    CLIP's order, so ids match the real tokenizer. Loaded with ``CLIPTokenizer.from_pretrained``
    (transformers 5's ``CLIPTokenizer(vocab_file=...)`` silently ignores files).
    """
    transformers = require("transformers")
    open_clip_tok = require("open_clip.tokenizer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip_tok.default_bpe()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the slice CLIP itself uses
    byte_symbols = list(open_clip_tok.bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += [CLIP_BOS, CLIP_EOS]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer.from_pretrained(out, model_max_length=77, pad_token=CLIP_EOS)
    tok.save_pretrained(out)
    return out


# Architectures: "tiny" for tests and the demo (UNet ~1 M parameters on 8x8 latents = 64 px, a
# 4-level VAE with SD's 8x down-sampling, a 2-layer text encoder over the full CLIP vocabulary, a
# tiny CLIP vision tower in the safety checker); "sd14" is SD v1.4's real architecture (UNet
# 860 M, VAE 84 M, CLIP ViT-L/14 text encoder 123 M, ViT-L/14 safety checker) for honest GPU
# throughput with random weights.
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=16,
                     cross_attention_dim=32, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        "vae": dict(sample_size=64, layers_per_block=1, block_out_channels=(16, 16, 32, 32), norm_num_groups=8),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32),
        "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8),
        "checker": dict(projection_dim=16),
    },
    "sd14": {
        "unet": dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                     cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(sample_size=512, layers_per_block=2, block_out_channels=(128, 256, 512, 512)),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768, hidden_act="quick_gelu"),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu"),
        "checker": dict(projection_dim=768),
    },
}


def build_random_sd(tokenizer_dir: str | Path, arch: str = "tiny", seed: int = 0) -> Any:
    """A random-weight Stable Diffusion v1 pipeline of architecture ``arch`` (:data:`ARCHITECTURES`).

    The scheduler is SD v1.4's PNDM; the safety checker has random concept directions and
    thresholds of 1, which a cosine never exceeds, so it flags nothing.
    """
    import torch

    diffusers = require("diffusers")
    transformers = require("transformers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown SD architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    a = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **a["unet"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, **a["vae"])
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **a["text"]))
    checker_config = transformers.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 64,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},  # the checker never uses it
        vision_config=a["vision"], **a["checker"])
    safety_checker = StableDiffusionSafetyChecker(checker_config)
    with torch.no_grad():
        safety_checker.concept_embeds.normal_()
        safety_checker.special_care_embeds.normal_()
        safety_checker.concept_embeds_weights.fill_(1.0)
        safety_checker.special_care_embeds_weights.fill_(1.0)
    side = a["vision"]["image_size"]
    feature_extractor = transformers.CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    scheduler = diffusers.PNDMScheduler.from_config(SD14_SCHEDULER)
    return diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=safety_checker, feature_extractor=feature_extractor, requires_safety_checker=True)


def write_random_sd(out: str | Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD bundle of ``arch`` to ``out`` (``save_pretrained``, safetensors)."""
    out = Path(out)
    tok_dir = write_clip_tokenizer(out / "tokenizer")
    build_random_sd(tok_dir, arch, seed=seed).save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_sd(out: Path, seed: int = 0) -> Path:
    """Write the tiny random-weight SD bundle to ``out``; ``raugment models tiny DIR`` (part ``sd``)."""
    return write_random_sd(out, "tiny", seed=seed)
