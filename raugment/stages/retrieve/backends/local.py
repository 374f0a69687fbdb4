"""``local`` backend: a faiss index + Parquet metadata on disk (``raugment index build``).

It needs an index (``needs = ("index",)``): ``retrieve.index`` when set, else the index stage's
output, which a study plans before retrieval. It declares no keys of its own: ``retrieve.index``
belongs to the section, because the stage and the study planner read it for every backend that
needs an index. The prompts are embedded by the CLIP model the index was built with.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from raugment.core import schema
from raugment.core.config import ConfigError, InputError
from raugment.stages.retrieve.backends import INDEX, RETRIEVERS, RetrievalBackend

if TYPE_CHECKING:
    from raugment.config import Config

log = logging.getLogger(__name__)


@RETRIEVERS.register("local")
class LocalRetriever(RetrievalBackend):
    """kNN of CLIP text embeddings of the prompts among the index's image embeddings, in-process."""

    needs = (INDEX,)

    def __init__(self, cfg: Config, index_path: str | None):
        from raugment.lib.knn_index import open_index

        if not index_path:
            raise ConfigError("retrieve.index: the local backend needs an index directory "
                              "(build one with `raugment index build`)")
        rcfg = cfg.retrieve
        from raugment.runtime.cluster import pick_device

        self.device = pick_device(rcfg.device)
        self.index = open_index(index_path, self.device)
        built_with = self.index.info.get("clip_model")
        if rcfg.clip_model is not None and rcfg.clip_model != built_with:
            raise ConfigError(f"retrieve.clip_model={rcfg.clip_model!r} but the index was built with "
                              f"{built_with!r}; text and image embeddings must come from the same model "
                              "(leave retrieve.clip_model unset to use the index's)")
        if not built_with:
            raise InputError(f"retrieve.index: {index_path}/index_info.json names no clip_model; "
                             "rebuild it with `raugment index build`")
        self.clip_model = built_with
        self.clip_pretrained = self.index.info.get("clip_pretrained")
        self._encoder: Any = None

    def encoder(self) -> Any:
        """The CLIP model of the index (loaded on first use)."""
        if self._encoder is None:
            from raugment.models.clip import load_clip

            self._encoder = load_clip(self.clip_model, self.clip_pretrained, self.device)
        return self._encoder

    def query(self, prompts: list[str], k: int) -> list[list[dict[str, Any]]]:
        """Up to ``k`` hits per prompt, most similar first."""
        scores, ids = self.index.search(self.encoder().embed_texts(prompts), k)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            keep = row_ids >= 0
            vectors = self.index.vectors(row_ids[keep])
            hits = []
            for meta, score, vec in zip(self.index.rows(row_ids[keep]), row_scores[keep], vectors):
                assert meta is not None  # only ids >= 0 were asked for
                hits.append({**meta, schema.CLIP_SIMILARITY: float(score), "embedding": vec})
            out.append(hits)
        return out
