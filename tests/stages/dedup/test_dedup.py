import numpy as np
import pytest

from raugment.config import Config
from raugment.core import schema as S
from raugment.lib.hashing import phash_bytes, to_codes
from raugment.stages.dedup import stage as dedup
from tests.helpers.planted import draw, make_artifact, near_copies, png, row


def _flip(code: np.ndarray, bits) -> np.ndarray:
    out = code.copy()
    for b in bits:
        out[b // 8] ^= np.uint8(1 << (b % 8))
    return out


def _base(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, 8, dtype=np.uint8)


def test_keeps_highest_ranked_copy_ties_by_source_order_unranked_last():
    a, b, c = _base(0), _base(1), _base(2)
    codes = np.stack([a, _flip(a, [0, 9, 17]), _flip(a, [30, 40]), b, _flip(b, [5]), c, _flip(c, [60])])
    ranks = [7, 1, 1, 0, None, None, None]
    plan = dedup.plan_dedup(codes, ranks, max_distance=8)
    assert plan.keep.tolist() == [False, True, False, True, False, True, False]
    assert plan.duplicate_of.tolist() == [1, -1, 1, -1, 3, -1, 5]
    assert plan.distance.tolist() == [3, -1, 5, -1, 1, -1, 1]


def test_equal_ranks_are_broken_by_the_tie_key_not_by_row_order():
    a = _base(7)
    codes = np.stack([a, _flip(a, [3]), _flip(a, [11])])
    ties = [(0, "img-b"), (0, "img-a"), (1, "img-0")]  # (input position, id)
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        plan = dedup.plan_dedup(codes[perm], [5, 5, 5], max_distance=4, ties=[ties[i] for i in perm])
        kept = [ties[i][1] for i, k in zip(perm, plan.keep) if k]
        assert kept == ["img-a"]  # first input, smallest id, wherever its row sits


def test_greedy_does_not_chain_like_union_find():
    a = _base(3)
    b = _flip(a, range(0, 5))
    c = _flip(b, range(5, 10))  # 5 bits from b, 10 from a
    plan = dedup.plan_dedup(np.stack([a, b, c]), [0, 1, 2], max_distance=6)
    # union-find would put a, b, c in one cluster and keep only a; c resembles nothing kept
    assert plan.keep.tolist() == [True, False, True]
    assert plan.duplicate_of.tolist() == [-1, 0, -1]


def test_clip_cosine_is_a_second_test():
    a, b = _base(4), _base(5)
    codes = np.stack([a, _flip(a, [1]), b, _flip(b, [2])])
    emb = np.array([[1, 0], [0.99, 0.141], [1, 0], [0, 1]], dtype=np.float32)
    plan = dedup.plan_dedup(codes, [0, 1, 0, 1], max_distance=4, embeddings=emb, min_cosine=0.9)
    assert plan.keep.tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="needs embeddings"):
        dedup.plan_dedup(codes, [0] * 4, 4, min_cosine=0.9)


def test_many_rows_without_pairs_all_kept():
    codes = np.random.default_rng(6).integers(0, 256, (2000, 8), dtype=np.uint8)
    plan = dedup.plan_dedup(codes, list(range(2000)), max_distance=2)
    assert plan.keep.all()


@pytest.mark.ray
def test_dedup_stage_across_methods_and_classes(tmp_path, ray_session):
    imgs = [draw(s) for s in range(5)]
    retrieved = [
        row("r-base0", png(imgs[0]), label=0, rank=0),
        row("r-base1", png(imgs[1]), label=0, rank=1),
        row("r-jpeg2", near_copies(imgs[2])["jpeg"], label=0, rank=2),
        row("r-base3", png(imgs[3]), label=1, rank=0),
        row("r-broken", b"\x89PNG broken", label=1, rank=3),
    ]
    generated = [
        row("g-crop0", near_copies(imgs[0])["crop"], label=1, rank=0, source="generated", method="simple"),
        row("g-base2", png(imgs[2]), label=0, rank=0, source="generated", method="simple"),
        row("g-small3", near_copies(imgs[3])["resized"], label=1, rank=5, source="generated", method="simple"),
        row("g-base4", png(imgs[4]), label=1, rank=1, source="generated", method="simple"),
    ]
    cfg = Config()
    cfg.run.root = str(tmp_path / "runs")
    ret = make_artifact(tmp_path / "in", "retrieve", retrieved, shards=2)
    gen = make_artifact(tmp_path / "in", "generate", generated)
    out = dedup.run(cfg, [ret, gen])

    kept = out.read("images")
    assert sorted(kept.column(S.ID).to_pylist()) == ["g-base2", "g-base4", "r-base0", "r-base1", "r-base3"]
    by_id = {r[S.ID]: r for r in kept.to_pylist()}
    for r in by_id.values():
        assert S.int64_to_phash(r[S.PHASH]) == phash_bytes(r[S.IMAGE])
    dropped = {r[S.ID]: r for r in out.read("dropped").to_pylist()}
    assert {k: (v[S.REASON], v[S.DUPLICATE_OF]) for k, v in dropped.items()} == {
        "g-crop0": ("duplicate", "r-base0"),   # tie on rank 0: the earlier input wins
        "r-jpeg2": ("duplicate", "g-base2"),   # rank 0 beats rank 2 across methods
        "g-small3": ("duplicate", "r-base3"),
        "r-broken": ("undecodable", None),
    }
    codes = to_codes(np.array([phash_bytes(near_copies(imgs[0])["crop"]), phash_bytes(png(imgs[0]))],
                              dtype=np.uint64))
    assert dropped["g-crop0"][S.DISTANCE] == int(np.unpackbits(codes[0] ^ codes[1]).sum())
    stats = out.stats
    assert stats["failures"] == {"duplicate": 3, "undecodable": 1}
    assert stats["counts"] == {"input": 9, "kept": 5, "dropped": 4}
    assert stats["cross_class_duplicates"] == 1
    assert stats["duplicates_by_method"] == {"simple": 2, "retrieval": 1}
    assert dedup.run(cfg, [ret, gen]).path == out.path  # complete: not recomputed


def test_dedup_refuses_empty_input():
    with pytest.raises(ValueError, match="at least one"):
        dedup.run(Config(), [])


def test_a_filter_output_that_kept_nothing_is_named_as_such(tmp_path):
    """A filter that dropped every image writes no images table; dedup used to answer "pass
    generation/retrieval/filter outputs" about a filter output (seen in the ImageNet rehearsal: the
    aesthetic filter on generated images dropped all 120)."""
    from raugment.core.storage import run_stage

    def body(run):
        run.stats.add("input", 120)
        run.stats.add("kept", 0)
        run.stats.add("dropped", 120)
        run.stats.fail("aesthetic", 120)

    empty = run_stage(tmp_path, "filter", {"k": 1}, {}, body)
    with pytest.raises(ValueError, match=r"kept none of its 120 images \(aesthetic=120\)"):
        dedup.run(Config(), [empty])
