"""The ``local`` backend: kNN in a faiss index on disk, embedded by the index's own CLIP model."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from raugment.config import from_dict
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.stages.retrieve.backends import needs_index
from raugment.stages.retrieve.backends.local import LocalRetriever
from tests.helpers.knn_service import KnownTextEncoder, known_index


def contract_config(env) -> dict:
    """``retrieve`` keys the registry contract test builds this backend with (the index comes from
    ``retrieve.index``, which the contract sets for every backend that needs an index)."""
    return {}


@pytest.fixture
def index(tmp_path):
    return known_index(tmp_path)


def test_returns_the_known_neighbours_most_similar_first(index):
    index_dir, labels, directions = index
    local = LocalRetriever(from_dict({"retrieve": {"index": str(index_dir)}}), str(index_dir))
    local._encoder = KnownTextEncoder(directions)
    hits = local.query(["A photo of c0.", "A photo of c2."], 10)
    for c, class_hits in zip((0, 2), hits):
        ids = [int(urlsplit(h[schema.URL]).path.strip("/").split(".")[0]) for h in class_hits]
        assert len(ids) == 10 and set(labels[ids]) == {c}
        sims = [h[schema.CLIP_SIMILARITY] for h in class_hits]
        assert sims == sorted(sims, reverse=True)
    assert local.query(["A photo of c0."], 3)[0][0]["embedding"].shape == (8,)   # hits carry embeddings
    assert local.clip_model == "fake-clip"


def test_refuses_a_different_clip_model(index):
    index_dir, _, _ = index
    with pytest.raises(ConfigError, match="same model"):
        LocalRetriever(from_dict({"retrieve": {"clip_model": "ViT-B-32"}}), str(index_dir))


def test_needs_an_index():
    assert needs_index("local")
    with pytest.raises(ConfigError, match=r"retrieve\.index: the local backend needs an index"):
        LocalRetriever(from_dict({}), None)
