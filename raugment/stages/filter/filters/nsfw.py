"""``nsfw``: drops what the Stable Diffusion safety checker flags.

The checker is the one of ``filter.safety_model`` (a hub id or a local Stable Diffusion directory
with ``safety_checker/`` and ``feature_extractor/``); unset, it is the checker of the diffusion
model used for generation (``generate.model``), filled in by :meth:`NsfwFilter.resolve`.
Score (column ``nsfw_score``): the checker's NSFW score, > 0 where it flags the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raugment.core import schema as S
from raugment.core.config import ConfigError, PluginSettings
from raugment.stages.filter.filters import FILTERS, Filter, FilterContext, FilterOutcome

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

    from raugment.config import Config
    from raugment.stages.filter.config import FilterConfig


@dataclass
class Settings(PluginSettings):
    """Keys of the ``nsfw`` filter (section ``filter``)."""

    # The SD safety checker of this hub id or local SD directory (None: generate.model).
    safety_model: str | None = None


@FILTERS.register("nsfw")
class NsfwFilter(Filter):
    """Drops what the Stable Diffusion safety checker flags (score: its NSFW score, > 0 flagged)."""

    settings = Settings

    def __init__(self, section: FilterConfig, ctx: FilterContext):
        from raugment.models.safety import load_safety_checker

        model = Settings.of(section).safety_model
        if model is None:  # the stage fills it in (resolve) before it builds filters
            raise ConfigError("filter.safety_model is unset; the filter stage's resolve_config fills it from "
                              "generate.model (NsfwFilter.resolve)")
        self.checker = load_safety_checker(model, section.device)

    def __call__(self, images: Sequence[Image.Image], batch: pa.Table) -> FilterOutcome:
        flags, scores = self.checker.score(images)
        return FilterOutcome(~flags, scores, S.NSFW_SCORE)

    @classmethod
    def resolve(cls, section: FilterConfig, cfg: Config) -> FilterConfig:
        """The safety checker belongs to the diffusion model used for generation unless set otherwise.

        When the filter is listed, the checker must be there (a local SD directory with
        ``safety_checker/``, or offline a hub id in the local cache): checked now, not in an actor.
        """
        from raugment.core.config import check_local_model
        from raugment.models.safety import CHECKER_DIR

        given = Settings.of(section).safety_model
        if "nsfw" in section.filters:
            key = "filter.safety_model" if given else "filter.safety_model (unset: generate.model's)"
            check_local_model(given or cfg.generate.model, key, CHECKER_DIR,
                              "point it at a Stable Diffusion directory (or hub id) with a safety checker",
                              hub_file=f"{CHECKER_DIR}/config.json")
        return Settings.replace_in(section, safety_model=given or cfg.generate.model)
