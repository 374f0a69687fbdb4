"""``aesthetic``: keeps images whose LAION aesthetic score is at least ``filter.aesthetic_threshold``.

The predictor (``filter.aesthetic_model``: the LAION improved-aesthetic MLP weights, a local path
that must be there, or ``random`` by name for tests; required when the filter is listed) scores
the CLIP image embeddings of the shared
:class:`~raugment.stages.filter.filters.FilterContext`. Score (column ``aesthetic_score``): the
predicted aesthetic score, about 1-10.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raugment.core import schema as S
from raugment.core.config import PluginSettings
from raugment.stages.filter.filters import FILTERS, Filter, FilterContext, FilterOutcome, threshold_pass

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

    from raugment.stages.filter.config import FilterConfig


@dataclass
class Settings(PluginSettings):
    """Keys of the ``aesthetic`` filter (section ``filter``)."""

    aesthetic_threshold: float = 5.0
    # The LAION aesthetic predictor head on CLIP image embeddings: a local path, or "random" (tests).
    aesthetic_model: str | None = None


@FILTERS.register("aesthetic")
class AestheticFilter(Filter):
    """Keeps LAION aesthetic score >= ``aesthetic_threshold`` (the predictor on CLIP embeddings)."""

    settings = Settings

    def __init__(self, section: FilterConfig, ctx: FilterContext):
        from raugment.models.aesthetic import load_aesthetic

        keys = Settings.of(section)
        self.ctx = ctx
        self.threshold = keys.aesthetic_threshold
        self.predictor = load_aesthetic(keys.aesthetic_model, ctx.clip.dim)

    def __call__(self, images: Sequence[Image.Image], batch: pa.Table) -> FilterOutcome:
        scores = self.predictor.score(self.ctx.image_embeddings(images))
        return FilterOutcome(threshold_pass(scores, self.threshold), scores, S.AESTHETIC_SCORE)

    @classmethod
    def check(cls, section: FilterConfig) -> None:
        from raugment.models.aesthetic import check_aesthetic_ref

        check_aesthetic_ref(Settings.of(section).aesthetic_model, "filter.aesthetic_model")
