"""Config of the ``index`` stage (section ``index``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raugment.core.config import ActorPoolConfig, ConfigError


@dataclass
class IndexConfig:
    """Building a local CLIP kNN index over a captioned pool (``raugment index build``).

    ``source="images"``: ``path`` is a Parquet file/directory of captioned images (url, caption,
    image bytes; optional aesthetic_score, nsfw_score, pool_label) or a folder of images with
    ``<name>.txt`` captions; CLIP image embeddings are computed on an actor pool (``pool``).
    ``source="embeddings"``: ``path`` holds LAION's published layout, ``img_emb/*.npy`` +
    ``metadata/*.parquet`` (row i of the concatenated shards = embedding i); ``clip_model`` then
    only records which model made them (the text side must use the same one).
    """

    source: Literal["images", "embeddings"] = "images"
    path: str | None = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    device: str = "auto"
    index_type: str = "Flat"   # any faiss index_factory string, e.g. "IVF256,Flat", "HNSW32"
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=64))

    def validate(self, key: str) -> None:
        if not self.index_type.strip():
            raise ConfigError(f"{key}.index_type must be a faiss index_factory string such as 'Flat'")
