"""Config of the ``finetune`` stage (section ``finetune``, with its methods' own keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raugment.core.config import ConfigError, WorkersConfig, positive, with_plugins
from raugment.stages.finetune.methods import FINETUNERS


@with_plugins(FINETUNERS)
@dataclass
class FinetuneConfig:
    """FinetunedModel of the diffusion model (paper 3.1, methods 5-9), one DDP training run.

    ``method`` is a fine-tuning method of ``raugment/stages/finetune/methods/`` (ft_conditioning,
    ft_cluster_conditioning, imagic, textual_inversion, pseudoword_dm); their own keys
    (``clusters``, ``feature_*`` of ft_cluster_conditioning, ``imagic_epochs``) are declared in
    their modules and carried here. ``batch_size`` is per worker; the learning rates ``lr``
    (conditioning / pseudo-word) and ``unet_lr`` are tuned at ``base_batch_size`` and scaled by
    ``sqrt(batch_size * workers / base_batch_size)``. Training stops when the validation loss (on
    ``val_fraction`` of each class's images) has not improved by ``min_delta`` for ``patience``
    epochs, or at ``max_epochs`` (paper: 40; 3 on full ImageNet). Checkpoints: best train loss,
    best validation loss, and the epochs the method keeps (``keep_epochs``; Imagic: its first
    ``imagic_epochs``).

    ``runner`` picks where the loop runs (same results for the same seed, so it is not part of
    the stage key): ``worker_group`` leases ``workers`` as a long-lived Ray actor group with one
    DDP process group (no Ray Train start-up; checkpoints in the stage directory, a failed group
    rebuilt up to ``workers.max_failures`` times); ``ray_train`` starts a Ray Train
    ``TorchTrainer`` for the run.
    """

    method: str = "ft_conditioning"
    model: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    resolution: int = 512
    lr: float = 5e-3
    unet_lr: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    base_batch_size: int = 8
    batch_size: int = 8
    max_epochs: int = 40
    patience: int = 3
    min_delta: float = 0.0
    val_fraction: float = 0.1
    keep_epochs: list[int] = field(default_factory=lambda: [1, 2, 3])
    cache_latents: bool = True
    encode_batch_size: int = 16
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0
    keep_train_state: bool = False
    runner: Literal["worker_group", "ray_train"] = "worker_group"
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self, key: str) -> None:
        for name in ("batch_size", "base_batch_size", "max_epochs", "patience", "encode_batch_size"):
            positive(getattr(self, name), f"{key}.{name}")
        if self.lr <= 0 or self.unet_lr <= 0:
            raise ConfigError(f"{key}.lr and {key}.unet_lr must be > 0")
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"{key}.resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"{key}.val_fraction must be in [0, 1), got {self.val_fraction}")
        if any(e < 1 for e in self.keep_epochs):
            raise ConfigError(f"{key}.keep_epochs are 1-based epochs, got {self.keep_epochs}")
