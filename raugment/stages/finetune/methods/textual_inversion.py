"""Method 8: textual inversion (Gal et al. 2022), a pseudo-word per class learned in template prompts.

Everything else (UNet, VAE, text encoder, tokenizer) stays frozen; the pseudo-word starts from the
embedding of the class's last word.
"""

from __future__ import annotations

from raugment.lib.finetuned.families import PseudowordFamily
from raugment.stages.finetune.methods import FINETUNERS, FinetuneMethod, paper_gpu_s_per_image


@FINETUNERS.register("textual_inversion")
class TextualInversion(FinetuneMethod, PseudowordFamily):
    """⑧ A pseudo-word per class with template prompts; everything else frozen."""

    name = "textual_inversion"
    gpu_s_per_image = paper_gpu_s_per_image(368)
