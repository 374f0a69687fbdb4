"""Config of the ``train`` stage (section ``train``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from raugment.core.config import (
    MAX_IMAGE_SIDE,
    MAX_SETS,
    SETS_REASON,
    AutoBool,
    ConfigError,
    WorkersConfig,
    at_most,
    no_duplicates,
    positive,
    resolve_auto,
)


@dataclass
class TrainConfig:
    """Classifier training (paper 3, "Data augmentation and classifier training").

    Defaults are the paper's ImageNet recipe (batch 256, LR 0.1, LR / 10 after 10 epochs without a
    validation gain, stop after 20, at most 270 epochs); Caltech256 uses batch 1024, LR 0.003.
    ``batch_size`` is the global batch, split over the workers. ``repeat_sets`` and ``seeds`` make
    ``raugment train`` run the resampled sets x seeds and write mean +- standard error.

    ``runner`` picks where the loop runs (same results for the same seed): ``worker_group`` keeps
    ``workers`` as long-lived Ray actors with one DDP process group, reused by every classifier
    of a study (start-up paid once); ``ray_train`` starts a Ray Train ``TorchTrainer`` per
    classifier (Tune sweeps always use it: they report through Ray Train callbacks).

    GPU options ``amp``, ``channels_last`` and ``compile`` (``torch.compile`` of the model) default
    to ``auto``: bf16 autocast + channels-last + compile when the workers use GPUs
    (``workers.use_gpu``), none of them on CPU (see :meth:`resolved`).
    """

    model: str = "resnet50"
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_epochs: int = 270
    lr_patience: int = 10
    lr_factor: float = 0.1
    stop_patience: int = 20
    image_size: int = 224
    crop_scale_min: float = 0.08
    eval_crop: float = 0.875
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: AutoBool = "auto"
    compile: AutoBool = "auto"
    gpu_decode: bool = False
    loader_workers: int = 4
    shuffle_buffer: int = 4096
    checkpoints_to_keep: int = 2
    keep_ray_checkpoints: bool = False
    runner: Literal["worker_group", "ray_train"] = "worker_group"
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    repeat_sets: int = 1
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self, key: str) -> None:
        positive(self.batch_size, f"{key}.batch_size")
        positive(self.max_epochs, f"{key}.max_epochs")
        positive(self.image_size, f"{key}.image_size")
        at_most(self.image_size, MAX_IMAGE_SIDE, f"{key}.image_size", "pixels of the training crop; ResNet-50 "
                "uses 224")
        positive(self.repeat_sets, f"{key}.repeat_sets")
        positive(self.checkpoints_to_keep, f"{key}.checkpoints_to_keep")
        if self.batch_size < self.workers.num_workers:
            raise ConfigError(f"{key}.batch_size={self.batch_size} is the global batch; it must be >= "
                              f"{key}.workers.num_workers={self.workers.num_workers}")
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            raise ConfigError(f"{key}.lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.lr_patience < 1 or self.stop_patience < 1:
            raise ConfigError(f"{key}.lr_patience and {key}.stop_patience must be >= 1")
        if not 0 < self.crop_scale_min <= 1 or not 0 < self.eval_crop <= 1:
            raise ConfigError(f"{key}.crop_scale_min and {key}.eval_crop must be in (0, 1]")
        if self.loader_workers < 0:
            raise ConfigError(f"{key}.loader_workers must be >= 0 (0 = decode in the train worker)")
        if not self.seeds:
            raise ConfigError(f"{key}.seeds must list at least one seed, e.g. [0]")
        no_duplicates(self.seeds, f"{key}.seeds", "a seed twice trains the same classifier twice and counts "
                      "it as two runs")
        at_most(len(self.seeds), MAX_SETS, f"{key}.seeds (count)", "each seed trains every set once more")
        at_most(self.repeat_sets, MAX_SETS, f"{key}.repeat_sets", SETS_REASON)

    def run_device(self) -> str:
        """``"cuda"`` when the workers use GPUs, else ``"cpu"`` (Ray Train's device per worker)."""
        return "cuda" if self.workers.use_gpu else "cpu"

    def resolved(self, device: str | None = None) -> TrainConfig:
        """A copy with ``amp``, ``channels_last`` and ``compile`` concrete for ``device`` (default
        :meth:`run_device`): GPU -> bf16, channels-last, compiled (ResNet-50's fast path on
        Ampere/Hopper; bf16 needs no loss scaling); CPU -> float32, contiguous, eager."""
        device = device or self.run_device()
        return dataclasses.replace(self, amp=resolve_auto(self.amp, device, "bf16", "none"),
                                   channels_last=resolve_auto(self.channels_last, device, True, False),
                                   compile=resolve_auto(self.compile, device, True, False))
