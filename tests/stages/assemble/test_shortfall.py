"""assemble.shortfall: a class whose pool cannot fill its quota is left out, allowed or refused."""

from collections import Counter

import pytest

from raugment.config import load_config
from raugment.core import schema as S
from raugment.stages.assemble import shortfall as SF
from raugment.stages.assemble import stage as assemble
from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES
from tests.helpers.train_data import make_added, make_dataset

TRAIN_COUNTS = [4, 3, 2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shortfall")
    dataset = make_dataset(root, TRAIN_COUNTS, val=1, test=1, size=16)
    full = make_added(root, "simple", [12, 9, 6], "generated", with_images=False)
    # what filter + dedup left of a retrieval that filled exactly 4/3/2: class 2 lost one image
    short = make_added(root, "retrieval", [4, 3, 1], "retrieved", with_images=False)
    return root, dataset, full, short


def _cfg(root, **sets):
    return load_config(overrides=[f"run.root={root}"] + [f"assemble.{k}={v}" for k, v in sets.items()])


def _counts(manifest, original: bool):
    return Counter(lab for lab, s in zip(manifest.column(S.LABEL).to_pylist(), manifest.column(S.SOURCE).to_pylist())
                   if (s == "original") == original)


def test_pool_short_by_one_image_leaves_the_class_out_instead_of_failing(world):
    root, dataset, _, short = world
    art = assemble.run(_cfg(root, ratio=100), dataset, {"retrieval": short})
    m = art.read("manifest")
    assert dict(_counts(m, original=True)) == {0: 4, 1: 3}  # class 2's originals left out too
    assert dict(_counts(m, original=False)) == {0: 4, 1: 3}
    rows = art.read("shortfalls").to_pylist()
    assert [(r[S.LABEL], r[S.CLASS_NAME], r[S.METHOD], r[S.NEED], r[S.AVAILABLE], r[S.ACTION]) for r in rows] == \
        [(2, SYNTHETIC_CLASSES[2], "retrieval", 2, 1, "excluded")]
    assert art.stats["shortfall"]["excluded"] == [SYNTHETIC_CLASSES[2]]


def test_census_makes_the_baseline_leave_out_the_same_classes(world):
    root, dataset, full, short = world
    cfg = _cfg(root, ratio=0, census_ratio=100)
    base = assemble.run(cfg, dataset, {}, None, {"retrieval": short, "simple": full})
    assert set(_counts(base.read("manifest"), original=True)) == {0, 1}
    other = assemble.run(_cfg(root, ratio=100, census_ratio=100), dataset, {"simple": full}, None,
                         {"retrieval": short, "simple": full})
    assert set(other.read("manifest").column(S.LABEL).to_pylist()) == {0, 1}
    own = assemble.run(_cfg(root, ratio=100, census_ratio=100), dataset, {"retrieval": short}, None,
                       {"retrieval": short, "simple": full})
    assert own.read("shortfalls").num_rows == 1  # its own pool, also in the census, is listed once
    # without the census the full pool fills every class
    alone = assemble.run(_cfg(root, ratio=100), dataset, {"simple": full})
    assert set(alone.read("manifest").column(S.LABEL).to_pylist()) == {0, 1, 2}
    assert alone.read("shortfalls").num_rows == 0


def test_allow_uses_what_the_pool_has_and_records_it(world):
    root, dataset, _, short = world
    art = assemble.run(_cfg(root, ratio=100, shortfall="allow"), dataset, {"retrieval": short})
    m = art.read("manifest")
    assert dict(_counts(m, original=True)) == {0: 4, 1: 3, 2: 2}
    assert dict(_counts(m, original=False)) == {0: 4, 1: 3, 2: 1}
    assert [r[S.ACTION] for r in art.read("shortfalls").to_pylist()] == ["allowed"]


def test_fail_names_every_short_class_in_one_line(world):
    root, dataset, _, _ = world
    two_short = make_added(root, "retrieval2", [4, 1, 1], "retrieved", with_images=False)
    with pytest.raises(ValueError) as err:
        assemble.run(_cfg(root, ratio=100, shortfall="fail"), dataset, {"retrieval2": two_short})
    msg = str(err.value)
    assert "\n" not in msg and "2 class(es)" in msg
    assert f"'{SYNTHETIC_CLASSES[1]}'" in msg and f"'{SYNTHETIC_CLASSES[2]}'" in msg
    assert "has 1 of 3" in msg and "has 1 of 2" in msg and "study.shortfall=exclude" in msg


def test_find_splits_quota_between_mixed_pools():
    # class 0 needs 5 at 100 %: shares 3 + 2; the second pool has only 1
    found = SF.find({0: 5}, [("a", {0: 3}), ("b", {0: 1})], 100)
    assert [(s.method, s.need, s.available, s.short) for s in found] == [("b", 2, 1, 1)]
    assert SF.find({0: 5}, [("a", {0: 3}), ("b", {0: 2})], 100) == []


def test_excluding_every_class_is_an_error(world):
    root, dataset, _, _ = world
    empty = make_added(root, "none", [0, 1, 0], "retrieved", with_images=False)
    with pytest.raises(ValueError, match="leaves no class"):
        assemble.run(_cfg(root, ratio=100), dataset, {"none": empty})
