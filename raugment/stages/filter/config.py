"""Config of the ``filter`` stage (section ``filter``).

The section holds the keys every filter shares; each filter of :mod:`raugment.stages.filter.filters`
adds its own (``min_side``, ``safety_model``, ``aesthetic_threshold`` ...), flat in the same section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raugment.core.config import ActorPoolConfig, ConfigError, with_plugins
from raugment.stages.filter.filters import FILTERS


@with_plugins(FILTERS)
@dataclass
class FilterConfig:
    """Filters applied to added images (``raugment.stages.filter.stage``); each dropped row keeps its reason.

    Filters run in the order listed; a row is dropped for the first filter it fails (all scores
    are still filled). Model-backed filters load their model once per actor of ``pool`` (once per
    study when consecutive filter runs have equal settings: the actors are kept in a study).
    ``clip_model``/``clip_pretrained`` name the CLIP model that every CLIP-based filter shares.
    """

    filters: list[str] = field(default_factory=lambda: ["min_size", "nsfw", "aesthetic"])
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    device: str = "auto"
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)

    def validate(self, key: str) -> None:
        if len(set(self.filters)) != len(self.filters):
            raise ConfigError(f"{key}.filters lists a filter twice: {self.filters}")
