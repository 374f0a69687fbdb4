"""Imported by Ray worker processes when they start (``cluster.preload_modules``), never by raugment.

Importing this module pays what a generation actor would otherwise pay first: torch, diffusers'
Stable Diffusion pipelines (text-to-image and the img2img one Boomerang uses; diffusers resolves
them lazily, so ``import diffusers`` alone leaves ~2.5 s of imports to the first pipeline load)
and transformers' CLIP text model and tokenizer. About 6.5 s of CPU and 0.8 GB per process here.

A worker that imported torch this way has its thread count fixed before Ray assigned it any CPUs;
raugment's actors set it from their CPUs when they start (``cluster.match_torch_threads``).
"""

import torch  # noqa: F401
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline  # noqa: F401
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
