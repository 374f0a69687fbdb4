"""A small text-conditioned Stable Diffusion trained on a captioned pool in seconds on one CPU core.

The demo's mini-world needs a generator whose images show the class its prompt names, so that
"prompted generation" in the study means something; a random-weight SD only makes noise.
:func:`train_mini_diffusion` trains one on the pool's (image, caption) pairs and writes it in the
real diffusers Stable Diffusion layout, so it loads through the project's one SD path
(:func:`raugment.models.diffusion.load_pipeline` / ``load_components``) like SD v1.4.

How it stays within tens of CPU seconds:

1. **VAE**: a small ``AutoencoderKL`` with 4x down-sampling (32 px -> 8x8x4 latents, no attention),
   trained for reconstruction on the latent mean (:data:`VAE_STEPS`: at 150 steps it still drew
   every class as an orange or brown blob; a classifier trained on real images recognised 0.66 of
   its reconstructions, 0.95 at 300 steps, which bounds what the UNet's images can show). Its
   log-variance output is then pinned
   to the floor diffusers clamps it to (``quant_conv`` rows zeroed, bias -30), so the latent
   distribution is a point: encoding is deterministic, as fine-tuning's cached latents assume.
   ``scaling_factor`` is set SD's way, to 1 / std of the pool's latents.
2. **Text encoder**: the tiny ``CLIPTextModel`` of :func:`~raugment.models.diffusion.build_random_sd`
   (2 layers, width 32), initialised as a bag of random word vectors (:func:`bag_of_words_init`)
   and frozen; the pool's captions are encoded once before training. CLIP's random init encodes
   the class prompts almost alike (mean pairwise cosine 0.995: the 70-odd padding positions the
   UNet reads are the same for every prompt), the bag of words at 0.50. Training the whole
   encoder jointly with the UNet instead made it collapse (cosine -> 1.0, measured on branch
   ``h/diffix``).
3. **UNet**: a ``UNet2DConditionModel`` whose cross-attention sits only in the mid block (the
   lowest resolution), plus diffusers' ``addition_embed_type="text"`` (the prompt's token states,
   attention-pooled, added to the time embedding of every ResNet): the class is a global property
   of these images, and 77-token attention at full latent resolution would dominate a CPU step.
   Trained with SD's DDPM objective
   (:func:`raugment.lib.finetuned.families.denoising_loss`, SD v1.4's noise schedule), captions
   dropped to "" for 10 % of samples so classifier-free guidance works.

Everything else (tokenizer = CLIP's real BPE, PNDM scheduler with SD v1.4's config, the tiny
safety checker that flags nothing) is the tiny bundle's. Training is deterministic for a seed and
step count (one torch thread). :func:`recognisability` measures what matters: a classifier trained
on real images classifies the generated images, per prompt method and per class, against chance.
Measured at the defaults (demo pool, seed 0, 16 images per class, 20 PNDM steps, guidance 4):
0.41 (simple_nows) and 0.48 (CLIP templates) on 4 classes, chance 0.25 (CLIP's random text init
with a 150-step VAE: 0.38 / 0.36 at 300 UNet steps). ``benchmarks/mini_diffusion.py`` measures it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raugment.core.extras import require

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# UNet steps of the default training (batch UNET_BATCH; the demo's mini.diffusion_steps); the VAE
# gets VAE_STEPS of its own.
DEFAULT_STEPS = 150
VAE_STEPS = 300
VAE_BATCH = 32
UNET_BATCH = 64
VAE_LR = 3e-3
UNET_LR = 4e-3
UNCOND_RATE = 0.1          # share of captions replaced by "" (classifier-free guidance)
DOWN = 4                   # VAE down-sampling factor (two stride-2 stages)
INFO_FILE = "mini_diffusion.json"
TEXT_INITS = ("bag", "random")   # how the text encoder is initialised (see bag_of_words_init)

MINI_ARCH: dict[str, dict[str, Any]] = {
    "vae": dict(latent_channels=4, layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False,
                block_out_channels=(8, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3),
    "unet": dict(in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                 block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3,
                 up_block_types=("UpBlock2D",) * 3,
                 # the pooled prompt also shifts every ResNet's time embedding: a global class
                 # signal at all resolutions, learnt in far fewer steps than cross-attention alone
                 addition_embed_type="text", addition_embed_type_num_heads=4),
}
# The UNet halves the latent twice more: image sides must divide by this.
SIZE_MULTIPLE = DOWN * 2 ** (len(MINI_ARCH["unet"]["block_out_channels"]) - 1)
LOGVAR_FLOOR = -30.0       # diffusers clamps the VAE's log-variance to [-30, 20]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _check_args(pool_file: Path, max_steps: int, vae_steps: int, size: int, num_threads: int,
                text_init: str) -> None:
    if not pool_file.is_file():
        raise ValueError(f"train_mini_diffusion: {pool_file} does not exist; build the pool first "
                         "(raugment.demo.corpus.build_corpus)")
    if max_steps < 1 or vae_steps < 1:
        raise ValueError(f"train_mini_diffusion: max_steps and vae_steps must be >= 1, got {max_steps}, {vae_steps}")
    if size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
        raise ValueError(f"train_mini_diffusion: size must be a positive multiple of {SIZE_MULTIPLE} "
                         f"(VAE x{DOWN}, then the UNet's levels), got {size}")
    if num_threads < 1:
        raise ValueError(f"train_mini_diffusion: num_threads must be >= 1, got {num_threads}")
    if text_init not in TEXT_INITS:
        raise ValueError(f"train_mini_diffusion: text_init must be one of {', '.join(TEXT_INITS)}, got {text_init!r}")


def _pool_tensors(pool_dir: Path, size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The pool's images as a float tensor in [-1, 1] (N, 3, size, size), their captions and the
    pool's target classes (``pool.json``; empty if it has none)."""
    import torch
    from PIL import Image

    from raugment.core import schema
    from raugment.core.imageio import decode_image
    from raugment.demo.corpus import read_corpus

    table = read_corpus(pool_dir)
    if table.num_rows == 0:
        raise ValueError(f"train_mini_diffusion: the pool in {pool_dir} has no rows")
    arrays = []
    for data in table.column(schema.IMAGE).to_pylist():
        img = decode_image(data).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(img, np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    info = pool_dir / "pool.json"
    classes = json.loads(info.read_text()).get("classes", []) if info.is_file() else []
    return pixels.contiguous(), [c or "" for c in table.column(schema.CAPTION).to_pylist()], classes


def _train_vae(pixels: torch.Tensor, steps: int, gen: torch.Generator, size: int) -> tuple[Any, float]:
    """A small AutoencoderKL trained for reconstruction; returns it (eval) and its last loss."""
    import torch
    import torch.nn.functional as F

    diffusers = require("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, sample_size=size, **MINI_ARCH["vae"])
    opt = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    loss = torch.zeros(())
    for _ in range(steps):
        x = pixels[torch.randint(0, len(pixels), (VAE_BATCH,), generator=gen)]
        loss = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        # A point distribution: sample() == mean up to exp(-15), as encode in fine-tuning expects.
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = LOGVAR_FLOOR
    return vae.eval().requires_grad_(False), float(loss.detach())


def _encode(vae: Any, pixels: torch.Tensor, batch: int = 128) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def bag_of_words_init(text_encoder: Any, tokenizer: Any, seed: int) -> None:
    """Initialise a ``CLIPTextModel`` in place as a bag of random word vectors.

    CLIP's random init leaves the prompt's words at a few of the 77 positions the UNet reads and
    fills the rest (the end-of-text padding) with states all prompts share, so the class prompts
    come out nearly identical (mean pairwise cosine ~0.99 over positions). Here every word gets a
    random unit-scale vector; the special tokens (start, end = padding) and the positions get the
    zero vector; each layer's attention is uniform over the positions before (query projection 0)
    and passes values through unchanged (value and output projections = identity, MLP output 0).
    Each position then holds the normalised sum of the word vectors up to it, so the padding
    positions hold the whole prompt and ``""`` encodes to zeros. No word carries any meaning yet:
    what a word looks like is learnt by the UNet from the pool's captions.
    """
    import torch

    emb = text_encoder.embeddings
    gen = torch.Generator().manual_seed(seed)
    dim = emb.token_embedding.weight.shape[1]
    with torch.no_grad():
        emb.token_embedding.weight.copy_(torch.randn(emb.token_embedding.weight.shape, generator=gen))
        for special in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}:
            emb.token_embedding.weight[special] = 0.0
        emb.position_embedding.weight.zero_()
        for layer in text_encoder.encoder.layers:
            attn = layer.self_attn
            attn.q_proj.weight.zero_()
            attn.q_proj.bias.zero_()
            for proj in (attn.v_proj, attn.out_proj):
                proj.weight.copy_(torch.eye(dim))
                proj.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of ``texts`` padded to 77, as the pipeline tokenises prompts."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _text_states(text_encoder: Any, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden states of ``texts`` (77 tokens each, as the pipeline pads)."""
    import torch

    ids = _token_ids(tokenizer, texts)
    with torch.no_grad():
        return torch.cat([text_encoder(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])


def prompt_similarity(text_encoder: Any, tokenizer: Any, prompts: Sequence[str]) -> float:
    """Mean pairwise cosine of ``prompts``' encodings (last hidden states averaged over the 77 positions).

    The diagnostic of a text encoder that cannot tell prompts apart: near 1, every prompt
    conditions the UNet alike.
    """
    import torch.nn.functional as F

    h = F.normalize(_text_states(text_encoder, tokenizer, prompts).mean(1), dim=1)
    sim = h @ h.T
    k = len(prompts)
    return float((sim.sum() - sim.diagonal().sum()) / max(k * (k - 1), 1))


def _train_unet(latents: torch.Tensor, states: torch.Tensor, caption_idx: torch.Tensor, empty_idx: int,
                steps: int, gen: torch.Generator, cross_dim: int) -> tuple[Any, float]:
    """The UNet trained with SD's denoising loss on scaled latents; returns it (eval) and a smoothed loss."""
    import torch

    diffusers = require("diffusers")
    from raugment.lib.finetuned.families import denoising_loss
    from raugment.models.diffusion import SD14_SCHEDULER

    unet = diffusers.UNet2DConditionModel(sample_size=latents.shape[-1], cross_attention_dim=cross_dim,
                                          **MINI_ARCH["unet"])
    sched = diffusers.DDPMScheduler.from_config(SD14_SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.0)
    n_train = int(sched.config.num_train_timesteps)
    smooth = None
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (UNET_BATCH,), generator=gen)
        cap = caption_idx[idx].clone()
        cap[torch.rand(UNET_BATCH, generator=gen) < UNCOND_RATE] = empty_idx
        noise = torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, n_train, (UNET_BATCH,), generator=gen)
        loss = denoising_loss(unet, sched, latents[idx], noise, t, states[cap])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
    return unet.eval().requires_grad_(False), float(smooth or 0.0)


def train_mini_diffusion(pool_dir: str | Path, out_dir: str | Path, *, seed: int = 0,
                         max_steps: int = DEFAULT_STEPS, size: int = 32, num_threads: int = 1,
                         vae_steps: int = VAE_STEPS, text_init: str = "bag") -> Path:
    """Train the mini text-to-image model on a captioned pool; write an SD pipeline directory.

    Args:
        pool_dir: a directory with ``pool.parquet`` (``schema.POOL``; rows with a ``fault`` are
            ordinary training images here).
        out_dir: the pipeline directory to write (replaced atomically: a killed run leaves no
            half model, only a ``.tmp-*`` sibling).
        seed: the only source of randomness (weights, batches, noise).
        max_steps: UNet training steps (batch :data:`UNET_BATCH`).
        size: image side the model is trained for (and should generate at); a multiple of
            :data:`SIZE_MULTIPLE`. Pool images of another size are resized.
        num_threads: torch threads while training (1 makes the result reproducible).
        vae_steps: VAE training steps (batch :data:`VAE_BATCH`).
        text_init: ``"bag"`` (:func:`bag_of_words_init`) or ``"random"`` (CLIP's random init, the
            tiny bundle's; kept to measure against).

    Returns:
        ``out_dir`` as a Path; it holds ``model_index.json``, ``unet/``, ``vae/``,
        ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``safety_checker/``,
        ``feature_extractor/`` and :data:`INFO_FILE` (steps, losses, CPU seconds).

    Raises:
        ValueError: missing or empty pool, bad sizes or step counts (before any work).
    """
    import torch

    from raugment.core.storage import atomic_dir
    from raugment.models.diffusion import build_random_sd, write_clip_tokenizer

    pool_dir, out_dir = Path(pool_dir), Path(out_dir)
    from raugment.demo.corpus import CORPUS_FILE

    _check_args(pool_dir / CORPUS_FILE, max_steps, vae_steps, size, num_threads, text_init)
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with atomic_dir(out_dir) as tmp:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            pixels, captions, classes = _pool_tensors(pool_dir, size)
            # The tiny bundle's parts (CLIP BPE tokenizer, frozen text encoder, safety checker,
            # SD v1.4's PNDM scheduler); its UNet and VAE are replaced by the trained ones.
            tok_dir = write_clip_tokenizer(tmp / "tokenizer")
            pipe = build_random_sd(tok_dir, "tiny", seed=seed)
            if text_init == "bag":
                bag_of_words_init(pipe.text_encoder, pipe.tokenizer, seed)
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            vae, vae_loss = _train_vae(pixels, vae_steps, gen, size)
            cpu_vae = time.process_time() - cpu0
            raw = _encode(vae, pixels)
            scaling = float(1.0 / raw.std())
            vae.register_to_config(scaling_factor=scaling)
            texts = sorted(set(captions) | {""})
            states = _text_states(pipe.text_encoder, pipe.tokenizer, texts)
            where = {t: i for i, t in enumerate(texts)}
            caption_idx = torch.tensor([where[c] for c in captions])
            unet, unet_loss = _train_unet(raw * scaling, states, caption_idx, where[""], max_steps, gen,
                                          cross_dim=pipe.text_encoder.config.hidden_size)
            cpu_total = time.process_time() - cpu0
            # how alike the encoder finds the classes' prompts (as the generate stage words them)
            from raugment.lib.prompts import simple_nows_prompt

            probe = [simple_nows_prompt(name) for name in classes]
            cosine = prompt_similarity(pipe.text_encoder, pipe.tokenizer, probe) if len(probe) > 1 else None
            pipe.register_modules(unet=unet, vae=vae)
            pipe.save_pretrained(tmp, safe_serialization=True)
            info = {"seed": seed, "unet_steps": max_steps, "unet_batch": UNET_BATCH, "vae_steps": vae_steps,
                    "vae_batch": VAE_BATCH, "size": size, "pool_rows": len(captions),
                    "vae_loss": round(vae_loss, 5), "unet_loss": round(unet_loss, 5), "scaling_factor": scaling,
                    "cpu_s": round(cpu_total, 2), "cpu_s_vae": round(cpu_vae, 2), "text_init": text_init,
                    "class_prompt_cosine": None if cosine is None else round(cosine, 4),
                    "wall_s": round(time.perf_counter() - wall0, 2), "num_threads": num_threads}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    finally:
        torch.set_num_threads(threads)
    log.info("mini diffusion: %d VAE + %d UNet steps in %.1f CPU s (VAE loss %.4f, UNet loss %.4f) -> %s",
             vae_steps, max_steps, info["cpu_s"], vae_loss, unet_loss, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# Recognisability
# --------------------------------------------------------------------------------------------


def recognisability(pipeline_dir: str | Path, classifier: torch.nn.Module | str | Path,
                    class_names: Sequence[str], prompts: Sequence[str] = ("simple_nows", "clip_templates"),
                    n: int = 16, seed: int = 0, *, steps: int = 20, guidance_scale: float = 4.0,
                    scheduler: str | None = None, size: int = 32,
                    transform: Callable[[Any], torch.Tensor] | None = None) -> dict[str, Any]:
    """How often a classifier trained on real images recognises a generator's images.

    For each prompt method (a ``PromptMethod`` of ``raugment/stages/generate/methods/``, whose
    prompts the generate stage uses) and each class, ``n`` images are generated through
    :func:`~raugment.models.diffusion.load_pipeline` (safety checker off: this measures the
    generator) and classified; label ``i`` is ``class_names[i]``.

    Args:
        pipeline_dir: an SD bundle directory or hub id.
        classifier: a model (logits over ``class_names``) or a classifier bundle directory.
        class_names: the classes, in the classifier's label order.
        prompts: prompt method names.
        n: images per class and prompt method.
        seed: seeds the prompts and the generator (class ``i`` uses ``seed + i``).
        steps, guidance_scale, scheduler, size: generation settings.
        transform: PIL image -> normalised tensor as the classifier was trained; default the
            train stage's evaluation transform (``loader.build_transform(size, train=False)``).

    Returns:
        ``{"chance": 1/K, "n_per_class": n, "prompts": {method: {"accuracy", "per_class":
        {name: accuracy}}}}``.
    """
    import torch

    from raugment.core import schema
    from raugment.lib.loader import build_transform
    from raugment.models.classifier import load_classifier
    from raugment.models.diffusion import load_pipeline
    from raugment.stages.generate.methods import GENERATORS, PromptMethod

    if not class_names:
        raise ValueError("recognisability: class_names is empty")
    if n < 1:
        raise ValueError(f"recognisability: n must be >= 1, got {n}")
    model = load_classifier(classifier) if isinstance(classifier, (str, Path)) else classifier
    model.eval()
    transform = transform or build_transform(size, train=False)
    pipe = load_pipeline(str(pipeline_dir), scheduler=scheduler, safety_checker=False)
    out: dict[str, Any] = {"chance": 1.0 / len(class_names), "n_per_class": n, "prompts": {}}
    for method_name in prompts:
        method = GENERATORS.get(method_name)()
        if not isinstance(method, PromptMethod):
            raise ValueError(f"recognisability: {method_name!r} is not a prompt method")
        per_class: dict[str, float] = {}
        for label, name in enumerate(class_names):
            rng = np.random.default_rng([seed, label])
            texts = method.make_prompts({schema.CLASS_NAME: name}, n, rng)
            images = pipe(texts, num_inference_steps=steps, guidance_scale=guidance_scale, height=size,
                          width=size, generator=torch.Generator().manual_seed(seed + label)).images
            with torch.no_grad():
                pred = model(torch.stack([transform(im) for im in images])).argmax(1)
            per_class[name] = float((pred == label).float().mean())
        out["prompts"][method_name] = {"accuracy": float(np.mean(list(per_class.values()))), "per_class": per_class}
    return out


def train_reference_classifier(class_names: Sequence[str], *, per_class: int = 100, steps: int = 300,
                               seed: int = 0, size: int = 32,
                               draw: Callable[[str, np.random.Generator, int], Any] | None = None) -> torch.nn.Module:
    """A ``tiny_cnn`` trained on real draws of ``class_names`` (the judge of :func:`recognisability`).

    Images come from ``draw(name, rng, size)`` (default
    :func:`raugment.stages.dataset.sources.synthetic.draw_named`) and go through the evaluation
    transform the train stage uses, so the classifier sees what :func:`recognisability` feeds it.
    """
    import torch
    import torch.nn.functional as F

    from raugment.lib.loader import build_transform
    from raugment.models.classifier import build_model
    from raugment.stages.dataset.sources.synthetic import draw_named

    draw = draw or draw_named
    transform = build_transform(size, train=False)
    rng = np.random.default_rng(seed)
    k = len(class_names)
    x = torch.stack([transform(draw(class_names[i % k], rng, size)) for i in range(k * per_class)])
    y = torch.arange(k * per_class) % k
    torch.manual_seed(seed)
    model = build_model("tiny_cnn", k)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def read_info(pipeline_dir: str | Path) -> Mapping[str, Any]:
    """The training facts :func:`train_mini_diffusion` wrote (empty for other bundles)."""
    p = Path(pipeline_dir) / INFO_FILE
    return json.loads(p.read_text()) if p.is_file() else {}
