"""Filters of the filter stage: one module each, registered by name in :data:`FILTERS`.

A filter is a :class:`Filter` subclass registered as ``@FILTERS.register("<its module name>")``.
The stage builds each listed filter once per actor as ``cls(section, ctx)`` (the resolved
``filter`` section and the actor's shared :class:`FilterContext`) and calls it on a decoded batch:
``filter(images, batch) -> FilterOutcome``, one pass flag and one score per image.

A filter declares, as class attributes, ``settings`` (its own config keys, a
:class:`~raugment.core.config.PluginSettings` dataclass the ``filter`` section carries flat, e.g.
``filter.min_side``) and ``needs`` (stages it cannot work without; usually none). It may override
two class methods: :meth:`Filter.check` (errors naming the key before any work, when the filter is
listed in ``filter.filters``) and :meth:`Filter.resolve` (its keys' defaults taken from other
sections; run for every registered filter, because the resolved section keys the stage's output).

A filter module imports cheaply: models (torch, open_clip, diffusers) load inside ``__init__``,
and it imports the stage's ``config.py`` for types only (``if TYPE_CHECKING:``), since that module
imports this folder while it composes the section. This package itself does not even do that
(it would make an import cycle), so it types the section as ``Any``. The pure helpers here serve
several filters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from raugment.core.config import PluginSettings
from raugment.core.registry import Registry

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

FILTERS: Registry = Registry("filter", package=__name__)


@dataclass
class FilterOutcome:
    """One filter's verdict on a batch.

    Attributes:
        passed: bool (n,), True where the image passes.
        scores: float32 (n,), the filter's score per image.
        column: the images column that stores the score (``None``: the score is not kept).
    """

    passed: np.ndarray
    scores: np.ndarray
    column: str | None = None


FilterFn = Callable[[Sequence["Image.Image"], "pa.Table"], FilterOutcome]


class FilterContext:
    """Models shared by the filters of one actor, loaded on first use; CLIP embeddings per batch.

    CLIP is the section's shared ``clip_model``/``clip_pretrained`` on ``device``: every filter
    that asks for image embeddings of the same batch gets one computation.
    """

    def __init__(self, cfg: Any):
        self.cfg = cfg  # the resolved filter section (FilterConfig)
        self._clip: Any = None
        self._memo: tuple[Sequence[Any], np.ndarray] | None = None

    @property
    def clip(self) -> Any:
        """The CLIP encoder of ``cfg.clip_model`` (loaded once)."""
        if self._clip is None:
            from raugment.models.clip import load_clip

            self._clip = load_clip(self.cfg.clip_model, self.cfg.clip_pretrained, self.cfg.device)
        return self._clip

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """CLIP image embeddings of this batch; computed once however many filters ask."""
        # Keyed by the batch object itself (held, so its identity cannot be reused by a later one).
        if self._memo is None or self._memo[0] is not images:
            self._memo = (images, self.clip.embed_images(list(images)))
        return self._memo[1]


class Filter:
    """The contract of a filter (subclass it and register it under its module's name)."""

    settings: ClassVar[type[PluginSettings] | None] = None
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, section: Any, ctx: FilterContext) -> None:
        """Build the filter (load its models) from the resolved ``filter`` section."""

    def __call__(self, images: Sequence[Image.Image], batch: pa.Table) -> FilterOutcome:
        """Judge a batch: ``images`` are the decoded rows of ``batch``, in order."""
        raise NotImplementedError

    @classmethod
    def check(cls, section: Any) -> None:
        """Raise :class:`~raugment.core.config.ConfigError` naming the key if this filter, listed in
        ``filter.filters``, cannot run with ``section``; called before any work."""

    @classmethod
    def resolve(cls, section: Any, cfg: Any) -> Any:
        """``section`` with this filter's keys' defaults filled from other sections of ``cfg``."""
        return section


# ---- helpers several filters use ------------------------------------------------------------

def threshold_pass(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """``scores >= threshold`` (NaN fails); everything passes when ``threshold`` is ``None``."""
    if threshold is None:
        return np.ones(len(scores), dtype=bool)
    return np.nan_to_num(scores, nan=-np.inf) >= threshold
