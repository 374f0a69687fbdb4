"""Method 5: FT conditioning, one learned text conditioning per class; UNet, VAE and text encoder frozen."""

from __future__ import annotations

from raugment.lib.finetuned.families import ConditioningFamily
from raugment.stages.finetune.methods import FINETUNERS, FinetuneMethod, paper_gpu_s_per_image


@FINETUNERS.register("ft_conditioning")
class FtConditioning(FinetuneMethod, ConditioningFamily):
    """⑤ One conditioning per class, initialised from the no-whitespace simple prompt."""

    name = "ft_conditioning"
    gpu_s_per_image = paper_gpu_s_per_image(380)
