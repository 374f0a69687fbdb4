"""Resampled sets: exact per-class counts, each set an independent draw, ranked pools by rank."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from raugment.core import schema
from raugment.stages.assemble.resample import resample_sets, set_size


def _pool(sizes: dict[int, int], rank: bool = False) -> pa.Table:
    ids, labels, ranks = [], [], []
    for label, n in sizes.items():
        for i in range(n):
            ids.append(f"c{label}-{i}")
            labels.append(label)
            ranks.append(i)
    cols = {"id": ids, "label": pa.array(labels, pa.int32()), "method": ["simple"] * len(ids)}
    if rank:
        cols["rank"] = ranks
    return pa.table(cols)


def _sets(table: pa.Table) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for row in table.to_pylist():
        out.setdefault((row["set_index"], row["label"]), []).append(row["id"])
    return out


def test_exact_counts_and_no_id_twice_in_a_set():
    targets = {0: 10, 1: 7, 2: 13}
    pool = _pool({0: 60, 1: 60, 2: 60})
    table = resample_sets(pool, targets, ratio=100, num_sets=4, seed=3, artifact="generate/abc")
    assert table.schema == schema.MANIFEST
    sets = _sets(table)
    for (_set_index, label), ids in sets.items():
        assert len(ids) == targets[label]
        assert len(set(ids)) == len(ids)
    assert set(sets) == {(s, label) for s in range(4) for label in targets}
    assert set(table.column("artifact").to_pylist()) == {"generate/abc"}
    assert set(table.column("method").to_pylist()) == {"simple"}


def test_ratio_scales_counts_and_draws_spread_over_the_pool():
    # 39 images for a class of 13 at ratio 200 % -> 26 per set; 5 sets need 130 draws from 39
    table = resample_sets(_pool({0: 39}), {0: 13}, ratio=200, num_sets=5, seed=0, artifact="a")
    sets = _sets(table)
    assert all(len(sets[(s, 0)]) == 26 for s in range(5))
    assert all(len(set(sets[(s, 0)])) == 26 for s in range(5)), "an id twice in one set"
    assert len({frozenset(sets[(s, 0)]) for s in range(5)}) == 5
    uses = Counter(table.column("id").to_pylist())
    assert len(uses) > 26, "every set drew the same images"


def test_deterministic_and_seed_dependent():
    pool, targets = _pool({0: 30, 1: 30}), {0: 5, 1: 5}
    a = resample_sets(pool, targets, 100, 3, seed=1, artifact="x")
    b = resample_sets(pool, targets, 100, 3, seed=1, artifact="x")
    c = resample_sets(pool, targets, 100, 3, seed=2, artifact="x")
    assert a.equals(b)
    assert a.column("id").to_pylist() != c.column("id").to_pylist()


def test_sets_do_not_depend_on_the_pools_row_order():
    # a pool's row order follows how its shards were written (worker timing, a resumed run)
    pool, targets = _pool({0: 30, 1: 30}), {0: 5, 1: 5}
    shuffled = pool.take(pa.array(list(reversed(range(pool.num_rows)))))
    assert resample_sets(pool, targets, 100, 3, seed=1, artifact="x").equals(
        resample_sets(shuffled, targets, 100, 3, seed=1, artifact="x"))


def test_rank_orders_the_draw():
    table = resample_sets(_pool({0: 20}, rank=True), {0: 4}, 100, 2, seed=0, artifact="x")
    sets = _sets(table)
    assert sets[(0, 0)] == ["c0-0", "c0-1", "c0-2", "c0-3"]
    assert sets[(1, 0)] == ["c0-4", "c0-5", "c0-6", "c0-7"]


def test_short_pool_names_class_and_shortfall():
    with pytest.raises(ValueError, match=r"class 1: needs 10, pool has 4 \(short by 6\)"):
        resample_sets(_pool({0: 20, 1: 4}), {0: 10, 1: 10}, 100, 5, seed=0, artifact="x")
    with pytest.raises(ValueError, match="class 7"):
        resample_sets(_pool({0: 20}), {0: 1, 7: 1}, 100, 1, seed=0, artifact="x")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_sets"):
        resample_sets(_pool({0: 5}), {0: 1}, 100, 0, seed=0, artifact="x")
    with pytest.raises(ValueError, match="ratio"):
        resample_sets(_pool({0: 5}), {0: 1}, -5, 1, seed=0, artifact="x")
    with pytest.raises(ValueError, match="label"):
        resample_sets(pa.table({"id": ["a"]}), {0: 1}, 100, 1, seed=0, artifact="x")


def test_set_size_rounds_half_up():
    assert set_size(13, 100) == 13
    assert set_size(5, 50) == 3
    assert set_size(130, 2500) == 3250
    assert set_size(7, 0) == 0


def test_every_set_is_its_own_draw_when_the_pool_is_larger_than_one_set():
    # issue 18: 130 originals, a 390-image pool at 100 %: sets 3 and 4 used to repeat sets 0 and 1
    table = resample_sets(_pool({0: 390, 1: 140}), {0: 130, 1: 130}, 100, 5, seed=0, artifact="x")
    sets = _sets(table)
    for label in (0, 1):
        draws = [frozenset(sets[(s, label)]) for s in range(5)]
        assert all(len(d) == 130 for d in draws)
        assert len(set(draws)) == 5, f"class {label}: two resampled sets are identical"
    # a draw, not a partition: later sets also reuse images of earlier ones
    assert frozenset(sets[(3, 0)]) & frozenset(sets[(0, 0)])


def test_same_set_index_is_the_same_draw_whatever_the_number_of_sets():
    pool, targets = _pool({0: 390, 1: 50}), {0: 130, 1: 20}
    five = _sets(resample_sets(pool, targets, 100, 5, seed=4, artifact="x"))
    two = _sets(resample_sets(pool, targets, 100, 2, seed=4, artifact="x"))
    for key, ids in two.items():
        assert sorted(ids) == sorted(five[key])


def test_small_pools_still_give_distinct_sets_when_enough_subsets_exist():
    # 4 images, 3 per set: only 4 different sets exist, 4 are asked for; they must all differ
    sets = _sets(resample_sets(_pool({0: 4}), {0: 3}, 100, 4, seed=0, artifact="x"))
    assert len({frozenset(sets[(s, 0)]) for s in range(4)}) == 4
    # 3 images, 3 per set: every set is the whole pool (the only possible draw)
    sets = _sets(resample_sets(_pool({0: 3}), {0: 3}, 100, 3, seed=0, artifact="x"))
    assert all(sorted(sets[(s, 0)]) == ["c0-0", "c0-1", "c0-2"] for s in range(3))
