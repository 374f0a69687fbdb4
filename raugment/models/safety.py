"""The Stable Diffusion safety checker as a standalone NSFW scorer (the ``nsfw`` filter).

The paper drops NSFW images from every added set; for generated images the pipeline already ran
the checker, retrieved images have never seen it. This loads diffusers'
``StableDiffusionSafetyChecker`` and its ``CLIPImageProcessor`` from a Stable Diffusion repository
(hub id) or a local SD directory (``safety_checker/`` + ``feature_extractor/``) and runs the real
class's ``forward`` for its verdict. The continuous score comes from the generation module's
:class:`raugment.models.diffusion.SafetyScores` hook, so pipeline and filter report the same number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raugment.core.extras import require

log = logging.getLogger(__name__)

CHECKER_DIR = "safety_checker"
PROCESSOR_DIR = "feature_extractor"


@dataclass
class SafetyChecker:
    """A loaded safety checker.

    Attributes:
        checker: the ``StableDiffusionSafetyChecker`` module (eval mode).
        processor: its ``CLIPImageProcessor``.
        device: where the checker runs.
        source: the model reference it was loaded from (provenance).
    """

    checker: Any
    processor: Any
    device: str
    source: str
    _recorder: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from raugment.models.diffusion import SafetyScores

        self._recorder = SafetyScores(self.checker)

    def score(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """PIL images -> (``nsfw`` flags as bool (n,), scores as float32 (n,); > 0 means NSFW)."""
        import torch

        n = len(images)
        if n == 0:
            return np.zeros(0, bool), np.zeros(0, np.float32)
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        dtype = next(self.checker.parameters()).dtype
        with torch.no_grad():
            # The checker blacks out flagged images in the array it is given; a (n, 1) placeholder
            # keeps that cheap, we only want the verdict.
            _, flags = self.checker(clip_input=pixels.to(self.device, dtype), images=np.zeros((n, 1)))
        scores = self._recorder.pop(n)
        return (np.asarray([bool(f) for f in flags], dtype=bool),
                np.asarray([np.nan if s is None else s for s in scores], dtype=np.float32))


def load_safety_checker(model: str, device: str = "cpu", revision: str | None = None) -> SafetyChecker:
    """Load the safety checker of a Stable Diffusion model.

    Args:
        model: a hub id (``"CompVis/stable-diffusion-v1-4"``) or a local SD directory; both are read
            from their ``safety_checker/`` and ``feature_extractor/`` sub-folders.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        revision: hub revision (ignored for local directories).

    Raises:
        ValueError: when a local directory lacks the two sub-folders.
    """
    require("diffusers")
    transformers = require("transformers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from raugment.runtime.cluster import pick_device

    local = Path(model)
    if local.exists():
        missing = [d for d in (CHECKER_DIR, PROCESSOR_DIR) if not (local / d).is_dir()]
        if missing:
            raise ValueError(f"{model} is not a Stable Diffusion directory with a safety checker "
                             f"(missing {', '.join(missing)}/); point filter.safety_model at one")
        revision = None
    device = pick_device(device)
    hub: dict[str, Any] = {} if revision is None else {"revision": revision}  # None: the default revision
    checker = StableDiffusionSafetyChecker.from_pretrained(model, subfolder=CHECKER_DIR, **hub)
    # transformers declares ``to`` as ``@wraps(torch.nn.Module.to)``, whose stub type does not bind self
    checker.to(device).eval()  # type: ignore[arg-type]
    processor = transformers.CLIPImageProcessor.from_pretrained(model, subfolder=PROCESSOR_DIR, **hub)
    log.info("loaded safety checker from %s on %s", model, device)
    return SafetyChecker(checker=checker, processor=processor, device=device, source=model)
