"""The contract of every registered retrieval backend (one parametrised case per name).

Every backend is built on the same small world: an index of drawn images embedded by the tiny
CLIP (``retrieve.index``, for a backend that needs an index) and a local stand-in for clip back
serving that index (its URL). A new backend gets these checks for free; its own test module
(``tests/stages/retrieve/backends/test_<name>.py``) provides ``contract_config(env) -> dict``, the
``retrieve`` keys that point it at that world.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from raugment.config import from_dict, load_config
from raugment.core import schema
from raugment.stages.retrieve.backends import HIT_KEYS, INDEX, RETRIEVERS, RetrievalBackend
from raugment.stages.retrieve.config import RetrieveConfig
from raugment.stages.retrieve.stage import check_config
from raugment.study.planner import build_plan
from tests.helpers.knn_service import knn_server
from tests.helpers.plugin_contract import generic_checks, plugin_test_module

NAMES = RETRIEVERS.names()
PACKAGE = "raugment.stages.retrieve.backends"
CLASSES = ["red circle", "blue square", "green triangle"]
PROMPTS = ["A photo of redcircle.", "A photo of bluesquare.", "A photo of greentriangle."]


@dataclass
class BackendEnv:
    """The world every backend is built on."""

    index: Path          # a raugment index of the drawn images (clip_model: the tiny CLIP)
    service_url: str     # a /knn-service answering from that index with the same CLIP
    clip: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory, session_dir):
    from raugment.demo.tiny import write_tiny_bundles
    from raugment.models.clip import load_clip
    from raugment.stages.dataset.sources.synthetic import draw_named
    from raugment.stages.index.config import IndexConfig
    from raugment.stages.index.stage import build_index
    from tests.stages.index.test_index import write_laion_layout

    root = tmp_path_factory.mktemp("backends")
    clip_dir = write_tiny_bundles(session_dir / "models", parts=["clip"])["clip"]
    clip = load_clip(str(clip_dir))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), 8)
    emb = clip.embed_images([draw_named(CLASSES[c], rng, 32) for c in labels])
    src = write_laion_layout(root / "laion", emb, labels)
    build_index(IndexConfig(source="embeddings", path=str(src), clip_model=str(clip_dir), clip_pretrained=None),
                root / "index")
    with knn_server(root / "index", clip.embed_texts) as url:
        yield BackendEnv(index=root / "index", service_url=url, clip=clip_dir)


def _keys(name: str, env: BackendEnv) -> dict:
    return plugin_test_module("tests.stages.retrieve.backends", name).contract_config(env)


def test_the_registry_finds_every_backend():
    assert {"local", "knn_service"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_generic_contract(name):
    generic_checks(RETRIEVERS, PACKAGE, "retrieve", RetrieveConfig, RetrievalBackend, name)


@pytest.mark.parametrize("name", NAMES)
def test_answers_at_most_k_hits_per_prompt_most_similar_first(name, env):
    cfg = from_dict({"retrieve": {"backend": name, "index": str(env.index), "device": "cpu",
                                  "aesthetic_model": "random", **_keys(name, env)}})
    cls = RETRIEVERS.get(name)
    index_path = check_config(cfg, None)    # the stage hands an index to a backend that needs one
    assert (index_path is not None) == (INDEX in cls.needs)
    backend = cls(cfg, index_path)
    assert isinstance(backend.clip_model, str) and backend.clip_model
    hits = backend.query(PROMPTS, 5)
    assert len(hits) == len(PROMPTS)
    for class_hits in hits:
        assert 1 <= len(class_hits) <= 5
        for h in class_hits:
            assert set(HIT_KEYS) <= set(h), f"missing {set(HIT_KEYS) - set(h)}"
            assert isinstance(h[schema.URL], str) and isinstance(h[schema.CLIP_SIMILARITY], float)
            assert h["embedding"] is None or np.asarray(h["embedding"]).ndim == 1
        sims = [h[schema.CLIP_SIMILARITY] for h in class_hits]
        assert sims == sorted(sims, reverse=True)
    fewer = backend.query(PROMPTS, 2)       # a smaller k is the head of the same ranking
    assert [[h[schema.URL] for h in hs] for hs in fewer] == [[h[schema.URL] for h in hs[:2]] for hs in hits]


@pytest.mark.parametrize("name", NAMES)
def test_a_study_plans_an_index_stage_only_for_a_backend_that_needs_one(name, env):
    keys = [f"retrieve.{k}={json.dumps(v)}" for k, v in _keys(name, env).items()]
    base = ["dataset.source=imagefolder", "dataset.path=/nowhere", "study.methods=[retrieval]",
            "study.expected={classes: 3, train_images: 30, max_per_class: 10}", f"retrieve.backend={name}", *keys]
    stages = Counter(n.stage for n in build_plan(load_config(None, base)).nodes.values())
    assert stages["retrieve"] == 1 and stages["index"] == (1 if INDEX in RETRIEVERS.get(name).needs else 0)
    given = build_plan(load_config(None, [*base, f"retrieve.index={env.index}"]))
    assert Counter(n.stage for n in given.nodes.values())["index"] == 0
