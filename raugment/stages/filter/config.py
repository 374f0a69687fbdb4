"""Config of the ``filter`` stage (section ``filter``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from raugment.core.config import ActorPoolConfig, ConfigError, positive


@dataclass
class FilterConfig:
    """Filters applied to added images (``raugment.stages.filter.stage``); each dropped row keeps its reason.

    Filters run in the order listed; a row is dropped for the first filter it fails (all scores
    are still filled). Model-backed filters load their model once per actor of ``pool`` (once per
    study when consecutive filter runs have equal settings: the actors are kept in a study).
    """

    filters: list[str] = field(default_factory=lambda: ["min_size", "nsfw", "aesthetic"])
    min_side: int = 32
    # NSFW: the Stable Diffusion safety checker of this hub id or local SD directory (None: generate.model).
    safety_model: Optional[str] = None
    # Aesthetic: the LAION aesthetic predictor head (a local path) on CLIP image embeddings.
    aesthetic_threshold: float = 5.0
    aesthetic_model: Optional[str] = None
    # CLIP image-text similarity to ``clip_prompt`` (``{name}`` = class name); no threshold = score only.
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    clip_threshold: Optional[float] = None
    clip_prompt: str = "a photo of {name}."
    device: str = "auto"
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)

    def validate(self, key: str) -> None:
        positive(self.min_side, f"{key}.min_side")
        if len(set(self.filters)) != len(self.filters):
            raise ConfigError(f"{key}.filters lists a filter twice: {self.filters}")
        if self.clip_threshold is not None and not -1 <= self.clip_threshold <= 1:
            raise ConfigError(f"{key}.clip_threshold is a cosine in [-1, 1], got {self.clip_threshold}")
        if "{name}" not in self.clip_prompt:
            raise ConfigError(f"{key}.clip_prompt must contain {{name}}, got {self.clip_prompt!r}")
