"""Method 7: Imagic-style fine-tuning, the class conditioning and the UNet trained jointly.

Image quality deteriorated after 8 epochs in the paper, so every early epoch keeps a checkpoint
(the first ``finetune.imagic_epochs``) and checkpoint selection chooses among them.
"""

from __future__ import annotations

from dataclasses import dataclass

from raugment.core.config import PluginSettings, positive
from raugment.lib.finetuned.families import ConditioningFamily
from raugment.stages.finetune.methods import FINETUNERS, FinetuneMethod, FinetuneSection, paper_gpu_s_per_image


@dataclass
class Settings(PluginSettings):
    """``finetune.imagic_epochs``: Imagic keeps a checkpoint of each of its first this many epochs."""

    imagic_epochs: int = 8

    def validate(self, key: str) -> None:
        positive(self.imagic_epochs, f"{key}.imagic_epochs")


@FINETUNERS.register("imagic")
class Imagic(FinetuneMethod, ConditioningFamily):
    """⑦ Conditioning and UNet fine-tuned jointly; keeps the checkpoints of the first epochs."""

    name = "imagic"
    trains_unet = True
    settings = Settings
    gpu_s_per_image = paper_gpu_s_per_image(552)

    def keep_epochs(self, section: FinetuneSection) -> list[int]:
        return list(range(1, Settings.of(section).imagic_epochs + 1))
