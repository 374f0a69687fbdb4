from collections import Counter

import pyarrow.compute as pc
import pytest

from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.core.storage import Artifact
from raugment.stages.assemble import stage as assemble
from tests.helpers.train_data import make_added, make_dataset

TRAIN_COUNTS = [4, 3, 2]  # imbalanced on purpose


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("assemble")
    dataset = make_dataset(root, TRAIN_COUNTS, val=1, test=1, size=16)
    gen = make_added(root, "simple", [110, 80, 55], "generated", with_images=False)
    ret = make_added(root, "retrieval", [110, 80, 55], "retrieved", with_images=False)
    return root, dataset, gen, ret


def _cfg(root, **sets):
    return load_config(overrides=[f"run.root={root}"] + [f"assemble.{k}={v}" for k, v in sets.items()])


def _added_counts(manifest):
    return Counter(lab for lab, s in zip(manifest.column(S.LABEL).to_pylist(),
                                         manifest.column(S.SOURCE).to_pylist()) if s != "original")


def _original(dataset):
    t = dataset.read("images", columns=[S.ID, S.LABEL, S.SPLIT])
    return t.filter(pc.equal(t.column(S.SPLIT), "train"))


def _pool(method, art, root):
    return assemble.read_added(method, art, root)


@pytest.mark.parametrize("ratio", [0, 100, 250, 2500])
def test_exact_per_class_counts_at_every_ratio(world, ratio):
    root, dataset, gen, _ = world
    m = assemble.build_manifest(_original(dataset), [_pool("simple", gen, root)], ratio=ratio,
                                set_index=0, num_sets=5, seed=0, original_artifact="dataset/x")
    want = {label: int(n * ratio / 100 + 0.5) for label, n in enumerate(TRAIN_COUNTS)}
    assert dict(_added_counts(m)) == {k: v for k, v in want.items() if v}
    orig = Counter(lab for lab, s in zip(m.column(S.LABEL).to_pylist(), m.column(S.SOURCE).to_pylist())
                   if s == "original")
    assert [orig[c] for c in range(3)] == TRAIN_COUNTS
    assert m.schema == S.MANIFEST
    assert pc.count_distinct(m.column(S.ID)).as_py() == m.num_rows


def test_generated_sets_differ_by_set_index_and_repeat_by_seed(world):
    root, dataset, gen, _ = world
    pools = [_pool("simple", gen, root)]
    kw = dict(ratio=500, num_sets=5, seed=0, original_artifact="dataset/x")
    def added(m):
        return {i for i, s in zip(m.column(S.ID).to_pylist(), m.column(S.SOURCE).to_pylist()) if s == "generated"}
    s0 = assemble.build_manifest(_original(dataset), pools, set_index=0, **kw)
    s1 = assemble.build_manifest(_original(dataset), pools, set_index=1, **kw)
    again = assemble.build_manifest(_original(dataset), pools, set_index=0, **kw)
    assert added(s0) and added(s0) != added(s1)  # pools are larger than a set: different draws
    assert added(s0) == added(again)
    assert set(s1.column(S.SET_INDEX).to_pylist()) == {1}


def test_retrieved_pool_gives_most_similar_first_for_every_set(world):
    root, dataset, _, ret = world
    pools = [_pool("retrieval", ret, root)]
    for set_index in (0, 3):
        m = assemble.build_manifest(_original(dataset), pools, ratio=200, set_index=set_index,
                                    num_sets=5, seed=0, original_artifact="dataset/x")
        ranks = dict(zip(pools[0].table.column(S.ID).to_pylist(), pools[0].table.column(S.RANK).to_pylist()))
        by_class = {}
        for i, label, src in zip(m.column(S.ID).to_pylist(), m.column(S.LABEL).to_pylist(),
                                 m.column(S.SOURCE).to_pylist()):
            if src == "retrieved":
                by_class.setdefault(label, []).append(ranks[i])
        assert {k: sorted(v) for k, v in by_class.items()} == {0: list(range(8)), 1: list(range(6)),
                                                                 2: list(range(4))}


def test_mixing_two_methods_splits_each_class_quota(world):
    root, dataset, gen, ret = world
    pools = [_pool("retrieval", ret, root), _pool("simple", gen, root)]
    m = assemble.build_manifest(_original(dataset), pools, ratio=100, set_index=0, num_sets=5, seed=0,
                                original_artifact="dataset/x")
    per = Counter(zip(m.column(S.LABEL).to_pylist(), m.column(S.METHOD).to_pylist()))
    # class quotas 4, 3, 2 split evenly; the first method gets the odd one
    assert [(per[(c, "retrieval")], per[(c, "simple")]) for c in range(3)] == [(2, 2), (2, 1), (1, 1)]


def test_small_pool_is_refused_naming_class_and_shortfall(world):
    root, dataset, _, _ = world
    small = make_added(root, "tiny", [200, 200, 10], "generated", with_images=False)
    with pytest.raises(ValueError, match=r"'tiny'.*class 2: needs 50.*short by 40"):
        assemble.build_manifest(_original(dataset), [_pool("tiny", small, root)], ratio=2500,
                                set_index=0, num_sets=5, seed=0, original_artifact="dataset/x")


def test_leakage_candidates_are_never_assembled(world):
    root, dataset, _, ret = world
    pool = _pool("retrieval", ret, root)
    top = [i for i, r in zip(pool.table.column(S.ID).to_pylist(), pool.table.column(S.RANK).to_pylist())
           if r == 0]
    m = assemble.build_manifest(_original(dataset), [pool], ratio=100, set_index=0, num_sets=5, seed=0,
                                original_artifact="dataset/x", exclude_ids=set(top))
    assert not set(top) & set(m.column(S.ID).to_pylist())
    assert dict(_added_counts(m)) == {0: 4, 1: 3, 2: 2}


def test_stage_writes_manifest_and_skips_rerun(world):
    root, dataset, gen, ret = world
    cfg = _cfg(root, ratio=100, set_index=2)
    art = assemble.run(cfg, dataset, {"simple": gen, "retrieval": ret})
    m = art.read("manifest")
    assert m.schema == S.MANIFEST and set(m.column(S.SET_INDEX).to_pylist()) == {2}
    # artifact paths are relative to the run root and open as complete artifacts
    for rel in set(m.column(S.ARTIFACT).to_pylist()):
        assert Artifact.open(root / rel).complete
    assert art.stats["counts"]["added"] == 9 and art.stats["counts"]["original"] == 9
    mtime = (art.path / "_SUCCESS").stat().st_mtime
    again = assemble.run(cfg, dataset, {"simple": gen, "retrieval": ret})
    assert again.path == art.path and (art.path / "_SUCCESS").stat().st_mtime == mtime
    other = assemble.run(_cfg(root, ratio=100, set_index=3), dataset, {"simple": gen, "retrieval": ret})
    assert other.path != art.path


def test_bad_inputs_fail_before_work(world):
    root, dataset, gen, _ = world
    with pytest.raises(ConfigError, match="assemble.sources"):
        assemble.run(_cfg(root, sources="[nope]"), dataset, {"simple": gen})
    with pytest.raises(ConfigError, match="audit"):
        assemble.run(_cfg(root, leakage="remove"), dataset, {"simple": gen})
    with pytest.raises(ValueError, match="needs added images"):
        assemble.build_manifest(_original(dataset), [], ratio=100, set_index=0, num_sets=5, seed=0,
                                original_artifact="dataset/x")
    with pytest.raises(ConfigError, match="needs added images"):
        assemble.run(_cfg(root, ratio=100), dataset, {})
    with pytest.raises(ConfigError, match="set_index"):
        _cfg(root, set_index=5)
    baseline = assemble.run(_cfg(root, ratio=0), dataset, {"simple": gen})
    assert set(baseline.read("manifest").column(S.SOURCE).to_pylist()) == {"original"}


def test_key_gains_a_resample_version_only_where_pools_are_drawn(world):
    from raugment.core.config import section_hash, to_dict

    root, dataset, gen, _ = world
    cfg = _cfg(root, ratio=0)
    base = assemble.run(cfg, dataset, {})
    old = {"assemble": to_dict(cfg.assemble), "seed": cfg.run.seed, "sources": []}
    assert base.key == section_hash(old, {"dataset": dataset.key})
    cfg = _cfg(root, ratio=100)
    drawn = assemble.run(cfg, dataset, {"simple": gen})
    old = {"assemble": to_dict(cfg.assemble), "seed": cfg.run.seed, "sources": ["simple"]}
    assert drawn.key != section_hash(old, {"dataset": dataset.key, "added.simple": gen.key})
