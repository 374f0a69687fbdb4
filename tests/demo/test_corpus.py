"""The demo/test pool: captioned images, the fault server, the small CLIP trained on it."""

from __future__ import annotations

import asyncio
import collections
import itertools

import numpy as np
import pytest

from raugment.core import schema
from raugment.core.imageio import decode_image
from raugment.demo.corpus import (
    FAULT_REASONS,
    REFUSED_TARGETS,
    CorpusServer,
    build_corpus,
    read_corpus,
    train_small_clip,
)
from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES
from raugment.stages.retrieve.config import DownloadConfig
from raugment.stages.retrieve.download import download_urls

CLASSES = SYNTHETIC_CLASSES[:3]
FAST = DownloadConfig(timeout_s=1.0, retries=0, max_bytes=1_000_000, allow_loopback=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("pool"), CLASSES, per_class=12, distractors=6, seed=1)


@pytest.fixture
def connects(monkeypatch):
    """Every address a socket connects to during the test (the connect guard's view)."""
    seen: list[str] = []
    original = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def recording(self, sock, address):
        seen.append(address[0])
        return await original(self, sock, address)

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", recording)
    return seen


def test_build_pool_contents(pool):
    t = read_corpus(pool)
    assert t.num_rows == 3 * 12 + 6
    labels = collections.Counter(t.column(schema.POOL_LABEL).to_pylist())
    assert all(labels[c] == 12 for c in CLASSES)
    assert sum(v for k, v in labels.items() if k not in CLASSES) == 6
    faults = [f for f in t.column(schema.FAULT).to_pylist() if f]
    assert set(faults) == set(FAULT_REASONS)            # every fault kind is there
    scores = t.column(schema.AESTHETIC_SCORE).to_pylist()
    assert any(s is None for s in scores) and any(s is not None for s in scores)
    assert all(decode_image(b).size == (32, 32) for b in t.column(schema.IMAGE).to_pylist())
    # Same seed, same pool (stable ids and bytes).
    again = read_corpus(build_corpus(pool.parent / "again", CLASSES, per_class=12, distractors=6, seed=1))
    assert again.column(schema.ID).to_pylist() == t.column(schema.ID).to_pylist()
    assert again.column(schema.IMAGE).to_pylist() == t.column(schema.IMAGE).to_pylist()


def test_every_fault_is_recorded_with_its_reason_and_refused_addresses_are_never_contacted(pool, connects):
    t = read_corpus(pool)
    with CorpusServer(pool) as srv:
        urls = [srv.url + u for u in t.column(schema.URL).to_pylist()]
        results = download_urls(urls, FAST)
    by_fault = collections.defaultdict(set)
    for fault, res, data in zip(t.column(schema.FAULT).to_pylist(), results, t.column(schema.IMAGE).to_pylist()):
        by_fault[fault].add(res.reason)
        if not fault:
            assert res.reason is None and res.image == data and res.width == 32
    assert by_fault.pop("") == {None}
    assert {k: v for k, v in by_fault.items()} == {k: {r} for k, r in FAULT_REASONS.items()}
    assert connects and set(connects) == {"127.0.0.1"}
    assert not any(h in REFUSED_TARGETS[k] for k in REFUSED_TARGETS for h in connects if h != "127.0.0.1")


def test_faults_off_serves_every_url(pool):
    t = read_corpus(pool)
    with CorpusServer(pool, faults=False) as srv:
        results = download_urls([srv.url + u for u in t.column(schema.URL).to_pylist()], FAST)
        assert len(srv.requests) == t.num_rows
    assert all(r.reason is None for r in results)


def test_train_small_clip_saves_a_loadable_model_that_changed(pool, tmp_path):
    from raugment.models.clip import TINY_MODEL_CFG, build_clip_model, load_clip

    path = train_small_clip(pool, tmp_path / "clip", seed=0, max_steps=3, num_threads=1)
    trained = load_clip(str(path))
    untrained = build_clip_model(TINY_MODEL_CFG, seed=0)
    moved = [n for n, p in trained.model.state_dict().items()
             if p.dtype.is_floating_point and not np.allclose(p.numpy(), untrained.state_dict()[n].numpy())]
    assert moved and "token_embedding.weight" not in moved  # trained, with the token table frozen


def test_train_small_clip_on_two_pools_with_shift_is_deterministic(pool, tmp_path):
    import torch

    from raugment.models.clip import load_clip

    def weights(name):
        path = train_small_clip([pool, pool], tmp_path / name, seed=1, max_steps=2, num_threads=1, shift=2)
        return load_clip(str(path)).model.state_dict()

    a, b = weights("a"), weights("b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    plain = load_clip(str(train_small_clip(pool, tmp_path / "c", seed=1, max_steps=2, num_threads=1))).model
    assert not all(torch.equal(a[n], plain.state_dict()[n]) for n in a)  # the shift changed what it saw


def test_shift_moves_images_without_changing_their_pixels():
    import torch

    from raugment.demo.corpus import _shift

    x = torch.rand(16, 3, 8, 8)
    out = _shift(x, torch.Generator().manual_seed(0), 2)
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], pad[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits  # a translated copy: no value is invented or recoloured
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # each image draws its own offset


def test_lr_at_warms_up_then_follows_a_half_cosine_to_zero():
    from raugment.demo.corpus import lr_at

    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # then constant
    cos = [lr_at(s, 2.0, 4, 12) for s in range(13)]
    assert cos[:4] == [0.5, 1.0, 1.5, 2.0] and cos[4] == 2.0
    assert cos[8] == pytest.approx(1.0) and cos[12] == pytest.approx(0.0)
    assert all(a > b for a, b in itertools.pairwise(cos[4:]))
    assert lr_at(3, 1.0) == 1.0  # no warm-up, no decay: the plain constant rate


def test_contrastive_targets_share_a_text_among_equal_captions():
    import torch

    from raugment.demo.corpus import contrastive_targets

    t = contrastive_targets(torch.tensor([4, 7, 4, 9]))
    assert torch.equal(t, t.T) and torch.allclose(t.sum(1), torch.ones(4))
    assert t[0].tolist() == [0.5, 0.0, 0.5, 0.0] and t[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    # all captions distinct: CLIP's usual diagonal targets
    assert torch.equal(contrastive_targets(torch.arange(3)), torch.eye(3))


def test_train_small_clip_schedule_and_caption_positives_change_training(pool, tmp_path):
    import torch

    from raugment.models.clip import load_clip

    def weights(name, **kw):
        path = train_small_clip(pool, tmp_path / name, seed=2, max_steps=3, num_threads=1, batch_size=128, **kw)
        return load_clip(str(path)).model.state_dict()

    plain = weights("plain")
    both = dict(warmup_steps=2, cosine=True, caption_positives=True)
    a, b = weights("a", **both), weights("b", **both)
    assert all(torch.equal(a[n], b[n]) for n in a)  # deterministic for a seed
    for name, kw in (("warm", {"warmup_steps": 2}), ("pos", {"caption_positives": True})):
        other = weights(name, **kw)
        assert not all(torch.equal(other[n], plain[n]) for n in plain), name
    with pytest.raises(ValueError, match="max_steps"):
        train_small_clip(pool, tmp_path / "x", cosine=True, num_threads=1)
