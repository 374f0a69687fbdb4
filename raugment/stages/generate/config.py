"""Config of the ``generate`` stage (section ``generate``, with its methods' own keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from raugment.core.config import (
    AUTO,
    MAX_IMAGE_SIDE,
    MAX_SETS,
    SETS_REASON,
    ActorPoolConfig,
    AutoBool,
    ConfigError,
    at_most,
    on_gpu,
    positive,
    resolve_auto,
    with_plugins,
)
from raugment.stages.generate.methods import GENERATORS


@with_plugins(GENERATORS)
@dataclass
class GenerateConfig:
    """Diffusion generation (paper 3.1, prompt conditioning and Boomerang; ``raugment.stages.generate.stage``).

    ``method`` names a generation method of ``raugment/stages/generate/methods/`` (simple,
    simple_nows, clip_templates, sariyildiz, boomerang), or a fine-tuned method (ft_conditioning,
    ...) when the stage is given a fine-tuning artifact (the ``finetune`` input or
    ``conditioning``). The methods' own keys (``boomerang_strength``, ...) are declared in their
    modules and carried here. ``model`` is a hub id or a local bundle
    (``raugment models tiny DIR`` writes ``DIR/sd``). ``seed`` fixes every prompt and per-image
    seed. ``pool`` is the actor pool: ``batch_size`` is the diffusion batch per pipeline call,
    ``num_gpus``/``num_cpus``/``concurrency`` only say where it runs (they are not part of the
    output's key, so a resumed run may use other resources). ``dtype``, ``sdpa``,
    ``channels_last``, ``compile`` and ``vae_slicing`` are the GPU options; ``dtype`` and
    ``channels_last`` default to ``auto``: float16 + channels-last on a GPU, float32 on a CPU (see
    :meth:`resolved`; SDPA is on everywhere). ``device: auto`` is the GPU when the pool asks for
    one (``pool.num_gpus > 0``; Ray hides GPUs from actors that do not), else the CPU. A sample flagged by the
    safety checker is replaced by a new seed, at most ``max_attempts_per_image`` tries per image.
    ``shard_images``: a class's slots are made in chunks of this many (by slot index), each
    written as one shard once complete, so a kill loses at most the chunks in progress and a
    resumed run writes the same shards, from the same batches, as an uninterrupted one.
    ``conditioning``: a fine-tuning (or select) stage directory for a fine-tuned method, used
    when no fine-tuning artifact is passed to ``generate.run`` (``raugment generate`` then plans no
    fine-tuning).
    """

    method: str = "simple"
    model: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    seed: int = 0
    images_per_class: int = 390
    num_sets: int = 5
    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "pndm"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    sdpa: bool = True
    channels_last: AutoBool = "auto"
    compile: bool = False
    vae_slicing: bool = False
    safety_checker: bool = True
    max_attempts_per_image: int = 10
    shard_images: int = 256
    conditioning: str | None = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(num_gpus=1.0, batch_size=8))

    def validate(self, key: str) -> None:
        from raugment.models.diffusion import SCHEDULERS  # a plain table; no torch

        positive(self.images_per_class, f"{key}.images_per_class")
        positive(self.steps, f"{key}.steps")
        positive(self.num_sets, f"{key}.num_sets")
        at_most(self.num_sets, MAX_SETS, f"{key}.num_sets", SETS_REASON)
        positive(self.max_attempts_per_image, f"{key}.max_attempts_per_image")
        positive(self.shard_images, f"{key}.shard_images")
        if self.pool.gpu_fallback:
            raise ConfigError(f"{key}.pool.gpu_fallback is not supported: the device decides the pipeline's "
                              f"dtype and is part of the stage's key; set {key}.pool.num_gpus=0 to generate on CPU")
        for dim in ("height", "width"):
            v = getattr(self, dim)
            if v <= 0 or v % 8:
                raise ConfigError(f"{key}.{dim} must be a positive multiple of 8, got {v}")
            at_most(v, MAX_IMAGE_SIDE, f"{key}.{dim}", "pixels; Stable Diffusion works at 512-1024")
        if self.guidance_scale < 0:
            raise ConfigError(f"{key}.guidance_scale must be >= 0 (1 = no guidance), got {self.guidance_scale}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"{key}.scheduler {self.scheduler!r} is not one of {sorted(SCHEDULERS)}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"{key}.quality must be in [1, 100], got {self.quality}")
        if self.device != AUTO and not (self.device == "cpu" or on_gpu(self.device)):
            raise ConfigError(f"{key}.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if on_gpu(self.device) and self.pool.num_gpus <= 0:
            raise ConfigError(f"{key}.device={self.device} but {key}.pool.num_gpus=0: Ray hides the GPUs "
                              f"from actors without one; set {key}.pool.num_gpus (e.g. 1) or device=auto")

    def run_device(self) -> str:
        """The device the generation actors use: ``device``, or for ``auto`` the GPU exactly when
        the pool asks for GPUs."""
        if self.device != AUTO:
            return self.device
        return "cuda" if self.pool.num_gpus > 0 else "cpu"

    def resolved(self, device: str | None = None) -> GenerateConfig:
        """A copy with ``device``, ``dtype`` and ``channels_last`` concrete for ``device``
        (default :meth:`run_device`): GPU -> float16 (SD v1's published half-precision weights)
        and a channels-last UNet; CPU -> float32 (half precision is slow or unsupported there)."""
        device = device or self.run_device()
        return dataclasses.replace(self, device=device,
                                   dtype=resolve_auto(self.dtype, device, "float16", "float32"),
                                   channels_last=resolve_auto(self.channels_last, device, True, False))
