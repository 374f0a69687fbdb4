"""Config of the ``filter`` stage (section ``filter``).

The section holds the keys every filter shares; each filter of :mod:`raugment.stages.filter.filters`
adds its own (``min_side``, ``safety_model``, ``aesthetic_threshold`` ...), flat in the same section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raugment.core.config import ActorPoolConfig, ConfigError, with_plugins
from raugment.stages.filter.filters import FILTERS

ADDED_SOURCES = ("generated", "retrieved")  # the ``source`` values of added images


@with_plugins(FILTERS)
@dataclass
class FilterConfig:
    """Filters applied to added images (``raugment.stages.filter.stage``); each dropped row keeps its reason.

    Filters run in the order listed; a row is dropped for the first filter it fails (all scores
    are still filled). Model-backed filters load their model once per actor of ``pool`` (once per
    study when consecutive filter runs have equal settings: the actors are kept in a study).
    ``clip_model``/``clip_pretrained`` name the CLIP model that every CLIP-based filter shares.
    ``only_on`` limits a filter to images of some sources (``generated``, ``retrieved``): images
    of other sources pass it, their score still recorded. The paper applies the aesthetic filter
    to retrieved images only (``only_on: {aesthetic: [retrieved]}``): Stable Diffusion was trained
    on the aesthetic subset, so retrieval is held to it, while generated images are not filtered
    by it. Empty: every listed filter judges every image.
    """

    filters: list[str] = field(default_factory=lambda: ["min_size", "nsfw", "aesthetic"])
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    device: str = "auto"
    only_on: dict[str, list[str]] = field(default_factory=dict)
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)

    def validate(self, key: str) -> None:
        if len(set(self.filters)) != len(self.filters):
            raise ConfigError(f"{key}.filters lists a filter twice: {self.filters}")
        for name, sources in self.only_on.items():
            if name not in FILTERS:
                raise ConfigError(f"{key}.only_on.{name}: unknown filter; known: {', '.join(FILTERS.names())}")
            bad = [s for s in sources if s not in ADDED_SOURCES]
            if not sources or bad:
                raise ConfigError(f"{key}.only_on.{name} must list image sources from {list(ADDED_SOURCES)}, "
                                  f"got {sources}; e.g. only_on: {{{name}: [retrieved]}}")
