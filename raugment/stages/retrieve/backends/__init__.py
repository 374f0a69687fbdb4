"""Retrieval backends: one module each, registered by name in :data:`RETRIEVERS`.

A backend is a :class:`RetrievalBackend` subclass registered as
``@RETRIEVERS.register("<its module name>")``, built as
``Backend(cfg: Config, index_path: str | None)`` and answering
``query(prompts: list[str], k: int) -> list[list[dict]]``: for each prompt, up to k hits, most
similar first, each a dict with the keys of :data:`HIT_KEYS`: ``schema.URL``, ``schema.CAPTION``,
``schema.CLIP_SIMILARITY``, ``schema.AESTHETIC_SCORE``, ``schema.NSFW_SCORE``,
``schema.POOL_LABEL`` (None when unknown) and ``"embedding"`` (the stored image embedding, or
None). Its ``clip_model``/``clip_pretrained`` attributes name the CLIP model whose image
embeddings the hits live in (used to score downloaded images).

Class attributes: ``settings`` (its own config keys, a
:class:`~raugment.core.config.PluginSettings` dataclass that the ``retrieve`` section carries flat,
e.g. ``retrieve.service_url``) and ``needs`` (stages it cannot work without). A backend that needs
``("index",)`` receives ``index_path``: ``retrieve.index`` when set, else the output of the index
stage, which a study then plans before retrieval; other backends receive ``None``.

A backend module imports cheaply (faiss, torch and open_clip inside functions) and imports
``raugment.config`` and the stage's ``config.py`` for types only (``if TYPE_CHECKING:``): the
stage's section imports this folder while it is being defined.
"""

from __future__ import annotations

from typing import Any, ClassVar

from raugment.core import schema
from raugment.core.config import PluginSettings
from raugment.core.registry import Registry

RETRIEVERS: Registry = Registry("retrieval backend", package=__name__)

# The keys of every hit a backend returns.
HIT_KEYS: tuple[str, ...] = (schema.URL, schema.CAPTION, schema.CLIP_SIMILARITY, schema.AESTHETIC_SCORE,
                             schema.NSFW_SCORE, schema.POOL_LABEL, "embedding")
INDEX = "index"  # the need of a backend that searches an index built by the index stage


class RetrievalBackend:
    """The contract of a retrieval backend (see the module docstring)."""

    settings: ClassVar[type[PluginSettings] | None] = None
    needs: ClassVar[tuple[str, ...]] = ()
    clip_model: str
    clip_pretrained: str | None

    def __init__(self, cfg: Any, index_path: str | None = None) -> None:
        """Connect or open from the whole config (``cfg.retrieve`` and the backend's keys in it)."""

    def query(self, prompts: list[str], k: int) -> list[list[dict[str, Any]]]:
        """Up to ``k`` hits per prompt, most similar first."""
        raise NotImplementedError


def backend_class(name: str) -> type[RetrievalBackend]:
    """The backend registered as ``name``; a ConfigError naming ``retrieve.backend`` otherwise."""
    return RETRIEVERS.get(name, key="retrieve.backend")


def needs_index(name: str) -> bool:
    """Whether backend ``name`` searches an index built by the index stage."""
    return INDEX in backend_class(name).needs
