import itertools

import imagehash
import numpy as np
import pyarrow as pa
import pytest

from raugment.core import schema as S
from raugment.lib.hashing import (
    hamming,
    phash_batch,
    phash_bytes,
    phash_image,
    range_pairs,
    reduce_for_hash,
    self_pairs,
    to_codes,
)
from tests.helpers.planted import draw, near_copies, png, row

BASES = [draw(seed) for seed in range(12)]


def _codes(blobs):
    return to_codes(np.array([phash_bytes(b) for b in blobs], dtype=np.uint64))


def test_phash_is_imagehash_on_the_reduced_image():
    img = BASES[0]
    bits = imagehash.phash(reduce_for_hash(img, 64)).hash.reshape(-1)
    value = phash_image(img, 64)
    assert [(value >> (63 - k)) & 1 for k in range(64)] == [int(b) for b in bits]
    assert reduce_for_hash(img, 64).size == (64, 64) and reduce_for_hash(img, 64).mode == "L"


@pytest.mark.parametrize("kind", ["resized", "jpeg", "upscaled", "crop"])
def test_near_copies_within_dedup_distance_and_unrelated_far(kind):
    base = _codes([png(b) for b in BASES])
    copies = _codes([near_copies(b)[kind] for b in BASES])
    q, r, d = range_pairs(copies, base, 8 + 1)  # dedup's default: distance <= 8
    assert set(zip(q.tolist(), r.tolist())) == {(i, i) for i in range(len(BASES))}
    assert (d == hamming(copies[q], base[r])).all()


def test_unrelated_images_are_not_candidates_at_audit_radius():
    base = _codes([png(b) for b in BASES])
    q, _r, _ = self_pairs(base, 9)  # the audit radius: distance < 10
    assert len(q) == 0
    dists = [hamming(base[[i]], base[[j]])[0] for i, j in itertools.combinations(range(len(base)), 2)]
    assert min(dists) >= 10


def test_range_search_equals_numpy_all_pairs_and_is_strict():
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 256, (400, 8), dtype=np.uint8)
    queries = refs[rng.integers(0, 400, 150)].copy()
    queries[:, 0] ^= rng.integers(0, 256, 150, dtype=np.uint8)  # perturb a few bits
    radius = 6
    q, r, d = range_pairs(queries, refs, radius)
    xor = np.bitwise_xor(queries[:, None, :], refs[None, :, :])
    full = np.unpackbits(xor, axis=2).sum(axis=2)
    expected = {(i, j) for i, j in zip(*np.nonzero(full < radius))}
    assert set(zip(q.tolist(), r.tolist())) == expected and len(expected) > 100
    assert (d < radius).all() and (full == radius).any()  # equal-to-radius pairs exist and are excluded


def test_codes_from_signed_and_unsigned_agree():
    values = [0, 1, (1 << 63) + 5, (1 << 64) - 1]
    signed = np.array([S.phash_to_int64(v) for v in values], dtype=np.int64)
    assert (to_codes(signed) == to_codes(np.array(values, dtype=np.uint64))).all()
    assert (to_codes(values) == to_codes(pa.array(signed))).all()
    codes = to_codes(signed)
    assert hamming(codes[[0]], codes[[3]])[0] == 64 and hamming(codes[[0]], codes[[1]])[0] == 1


def test_phash_batch_fills_column_marks_bad_bytes_and_filters_splits():
    table = S.to_table([row("a", png(BASES[0]), split="test"), row("b", b"not an image", split="test"),
                        row("c", png(BASES[1]), split="train")])
    out = phash_batch(table, 64, splits=["test"])
    assert out.column(S.ID).to_pylist() == ["a", "b"] and S.IMAGE not in out.column_names
    assert out.column(S.PHASH).to_pylist() == [S.phash_to_int64(phash_image(BASES[0])), None]
    assert phash_bytes(b"") is None


@pytest.mark.ray
def test_hash_artifacts_on_ray_keeps_source_order_and_matches_local(tmp_path, ray_session):
    from raugment.core.config import ActorPoolConfig
    from raugment.lib.hashing import hash_artifacts
    from tests.helpers.planted import make_artifact

    first = make_artifact(tmp_path, "retrieve", [row(f"r{i}", png(BASES[i])) for i in range(7)], shards=3)
    second = make_artifact(tmp_path, "generate", [row(f"g{i}", png(BASES[i])) for i in range(7, 12)])
    cols = [S.ID, S.LABEL]
    pool = ActorPoolConfig(concurrency=2, batch_size=2)
    on_ray = hash_artifacts([first, second], 64, pool, cols, local_max_rows=0)
    local = hash_artifacts([first, second], 64, pool, cols, local_max_rows=10_000)
    assert on_ray.column(S.ID).to_pylist() == [f"r{i}" for i in range(7)] + [f"g{i}" for i in range(7, 12)]
    assert on_ray.equals(local)
    assert on_ray.column(S.PHASH).to_pylist()[3] == S.phash_to_int64(phash_image(BASES[3]))


@pytest.mark.ray
def test_hashing_on_ray_tasks_charges_their_cpu_seconds_to_the_stage(tmp_path, ray_session):
    """Ray Data tasks measure their own CPU time; the stage run that asked for the hashes gets it."""
    import json

    from raugment.core.config import ActorPoolConfig
    from raugment.core.storage import run_stage
    from raugment.lib.hashing import hash_artifacts
    from tests.helpers.planted import make_artifact

    art = make_artifact(tmp_path, "retrieve", [row(f"r{i}", png(BASES[i])) for i in range(12)], shards=2)
    out = {}

    def body(run):
        out["t"] = hash_artifacts([art], 64, ActorPoolConfig(batch_size=3), [S.ID], local_max_rows=0)

    stage = run_stage(tmp_path / "root", "hashing", {"x": 1}, None, body)
    assert out["t"].column_names == [S.ID, S.PHASH] and out["t"].num_rows == 12
    tasks = json.loads((stage.path / "stats.json").read_text())["usage"]["tasks"]
    assert tasks["cpu_s"] > 0 and tasks["calls"] >= 1
