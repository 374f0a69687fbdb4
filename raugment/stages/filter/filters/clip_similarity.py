"""``clip_similarity``: CLIP cosine between an image and its class prompt.

The prompt is ``filter.clip_prompt`` with ``{name}`` = the first lemma of the row's class name;
images and prompts are embedded by the shared CLIP of the
:class:`~raugment.stages.filter.filters.FilterContext` (each prompt once per actor). Rows below
``filter.clip_threshold`` are dropped; without a threshold the filter only scores.
Score (column ``clip_similarity``): the cosine, in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raugment.core import schema as S
from raugment.core.config import ConfigError, PluginSettings
from raugment.stages.filter.filters import FILTERS, Filter, FilterContext, FilterOutcome, threshold_pass

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

    from raugment.stages.filter.config import FilterConfig


@dataclass
class Settings(PluginSettings):
    """Keys of the ``clip_similarity`` filter (section ``filter``)."""

    clip_threshold: float | None = None   # no threshold: score only
    clip_prompt: str = "a photo of {name}."  # {name} = class name

    def validate(self, key: str) -> None:
        if self.clip_threshold is not None and not -1 <= self.clip_threshold <= 1:
            raise ConfigError(f"{key}.clip_threshold is a cosine in [-1, 1], got {self.clip_threshold}")
        if "{name}" not in self.clip_prompt:
            raise ConfigError(f"{key}.clip_prompt must contain {{name}}, got {self.clip_prompt!r}")


def clip_similarity_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Row-wise cosine of L2-normalised image and text embeddings (row i with row i)."""
    return np.einsum("nd,nd->n", image_embeddings, text_embeddings).astype(np.float32)


def class_prompts(template: str, class_names: Sequence[str | None]) -> list[str]:
    """The class prompt of each row: ``template`` with ``{name}`` = the first lemma of the class name."""
    return [template.format(name=(name or "").split(",")[0].strip()) for name in class_names]


@FILTERS.register("clip_similarity")
class ClipSimilarityFilter(Filter):
    """CLIP cosine between the image and its class prompt; drops below ``clip_threshold`` if set."""

    settings = Settings

    def __init__(self, section: FilterConfig, ctx: FilterContext):
        keys = Settings.of(section)
        self.ctx = ctx
        self.threshold = keys.clip_threshold
        self.template = keys.clip_prompt
        self._text: dict[str, np.ndarray] = {}

    def _texts(self, prompts: list[str]) -> np.ndarray:
        new = sorted(set(prompts) - set(self._text))
        if new:  # a batch holds few classes: embed each prompt once per actor
            self._text.update(zip(new, self.ctx.clip.embed_texts(new)))
        return np.stack([self._text[p] for p in prompts])

    def __call__(self, images: Sequence[Image.Image], batch: pa.Table) -> FilterOutcome:
        prompts = class_prompts(self.template, batch.column(S.CLASS_NAME).to_pylist())
        scores = clip_similarity_scores(self.ctx.image_embeddings(images), self._texts(prompts))
        return FilterOutcome(threshold_pass(scores, self.threshold), scores, S.CLIP_SIMILARITY)
