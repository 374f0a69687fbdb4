"""Method 9: pseudo-word + DM, textual inversion with the UNet fine-tuned alongside."""

from __future__ import annotations

from raugment.lib.finetuned.families import PseudowordFamily
from raugment.stages.finetune.methods import FINETUNERS, FinetuneMethod, paper_gpu_s_per_image


@FINETUNERS.register("pseudoword_dm")
class PseudowordDM(FinetuneMethod, PseudowordFamily):
    """⑨ Textual inversion plus UNet fine-tuning."""

    name = "pseudoword_dm"
    trains_unet = True
    gpu_s_per_image = paper_gpu_s_per_image(720)
