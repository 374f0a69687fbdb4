"""Retrieval backends: one module each, registered by name in :data:`RETRIEVERS`.

A backend is built as ``Backend(cfg: Config, index_path: str | None)`` and answers
``query(prompts: list[str], k: int) -> list[list[dict]]``: for each prompt, up to k hits, most
similar first, each a dict with ``schema.URL``, ``schema.CAPTION``, ``schema.CLIP_SIMILARITY``,
``schema.AESTHETIC_SCORE``, ``schema.NSFW_SCORE``, ``schema.POOL_LABEL`` (None when unknown) and
``"embedding"`` (the stored image embedding, or None). ``clip_model``/``clip_pretrained`` name the
CLIP model whose image embeddings the hits live in (used to score downloaded images).
"""

from raugment.core.registry import Registry

RETRIEVERS: Registry = Registry("retrieval backend", package=__name__)
