"""``min_size``: drops images whose shorter side is below ``filter.min_side`` pixels.

Score: the shorter side in pixels (not stored in a column; a dropped row keeps it as its score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raugment.core.config import PluginSettings, positive
from raugment.stages.filter.filters import FILTERS, Filter, FilterContext, FilterOutcome

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

    from raugment.stages.filter.config import FilterConfig


@dataclass
class Settings(PluginSettings):
    """Keys of the ``min_size`` filter (section ``filter``)."""

    min_side: int = 32

    def validate(self, key: str) -> None:
        positive(self.min_side, f"{key}.min_side")


def min_size_scores(widths: Sequence[int], heights: Sequence[int]) -> np.ndarray:
    """The shorter side of each image (what ``min_size`` compares with ``min_side``)."""
    return np.minimum(np.asarray(widths), np.asarray(heights)).astype(np.float32)


@FILTERS.register("min_size")
class MinSizeFilter(Filter):
    """Drops images whose shorter side is below ``min_side`` pixels (score: the shorter side)."""

    settings = Settings

    def __init__(self, section: FilterConfig, ctx: FilterContext):
        self.min_side = Settings.of(section).min_side

    def __call__(self, images: Sequence[Image.Image], batch: pa.Table) -> FilterOutcome:
        scores = min_size_scores([im.width for im in images], [im.height for im in images])
        return FilterOutcome(scores >= self.min_side, scores)
