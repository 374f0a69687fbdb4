"""Resampling added images into sets with the target dataset's per-class counts (paper section 3).

The paper generates more images than it needs (390 per class for 10 % ImageNet) and draws five sets
from them, each with exactly as many images per class as the target training split (times the
augmentation ratio), to get variance estimates over resampled sets. Sets are manifests: image ids
plus the artifact that holds them, never copies of the images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from raugment.core import schema
from raugment.core.stats import round_half_up


def set_size(target_count: int, ratio: float) -> int:
    """Images one set needs for a class: ``target_count * ratio / 100`` rounded half up."""
    return round_half_up(target_count * ratio / 100.0)


def _class_order(ids: list[str], ranks: list | None, rng: np.random.Generator) -> list[str]:
    """The order a class's pool is drawn in: by rank when ranks are given, else shuffled.

    Ranks put the best candidates first (retrieval: most similar to the query); a random
    permutation breaks ties, so equal ranks still come out in a seeded random order.
    """
    perm: list[int] = rng.permutation(len(ids)).tolist()
    if ranks is not None and all(r is not None for r in ranks):
        perm = sorted(perm, key=lambda i: ranks[i])  # stable: ties keep the random order
    return [ids[i] for i in perm]


def resample_sets(pool: pa.Table, target_counts: Mapping[int, int], ratio: float, num_sets: int,
                  seed: int, artifact: str) -> pa.Table:
    """Draw ``num_sets`` sets with exact per-class counts, as disjoint as the pool allows.

    For each class, the pool is put in draw order (by ``rank`` if the column is there and filled,
    else a seeded shuffle) and set ``s`` takes the ``n`` ids at positions ``s*n ... s*n+n-1`` of
    that order read cyclically. While the pool lasts the sets are disjoint; once it is used up,
    the ids reused are always the least used ones (usage counts never differ by more than one),
    and no set holds an id twice because ``n`` never exceeds the pool.

    Args:
        pool: candidate images; columns ``id`` and ``label`` (``rank``, ``source``, ``method``
            are used when present).
        target_counts: label -> number of images of that class in the target training split.
        ratio: augmentation ratio in percent (100 = as many added images as original ones).
        num_sets: how many sets to draw (the paper uses 5).
        seed: seed of the draw; the same arguments give the same sets.
        artifact: directory (relative to the run root) of the stage output holding the images.

    Returns:
        A :data:`schema.MANIFEST` table with one row per (set, image).

    Raises:
        ValueError: on a negative ratio or ``num_sets < 1``, missing columns, or a class whose
            pool is smaller than one set's need (naming the class and the shortfall).
    """
    if ratio < 0:
        raise ValueError(f"ratio is a percentage >= 0, got {ratio}")
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    missing = {schema.ID, schema.LABEL} - set(pool.column_names)
    if missing:
        raise ValueError(f"pool lacks columns {sorted(missing)}")

    cols = pool.to_pydict()
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(cols[schema.LABEL]):
        by_class.setdefault(int(label), []).append(i)

    needs = {int(label): set_size(int(count), ratio) for label, count in target_counts.items()}
    short = {label: need - len(by_class.get(label, [])) for label, need in needs.items()
             if need > len(by_class.get(label, []))}
    if short:
        detail = ", ".join(f"class {label}: needs {needs[label]}, pool has {needs[label] - gap} "
                           f"(short by {gap})" for label, gap in sorted(short.items()))
        raise ValueError(f"not enough images to resample: {detail}; generate/retrieve more for these "
                         "classes or lower the ratio")

    ranks = cols.get(schema.RANK)
    rows: dict[str, list] = {name: [] for name in schema.MANIFEST.names}
    for label in sorted(needs):
        need = needs[label]
        if need == 0:
            continue
        # by id, not by row order: the pool's row order follows how its shards were written
        # (worker timing, a resumed run), and the sets must depend only on what the pool holds
        members = sorted(by_class[label], key=lambda i: cols[schema.ID][i])
        rng = np.random.default_rng([seed, label])
        order = _class_order([cols[schema.ID][i] for i in members],
                             [ranks[i] for i in members] if ranks is not None else None, rng)
        where = {cols[schema.ID][i]: i for i in members}
        size = len(order)
        for s in range(num_sets):
            for j in range(need):
                image_id = order[(s * need + j) % size]
                i = where[image_id]
                rows[schema.ID].append(image_id)
                rows[schema.LABEL].append(label)
                rows[schema.SOURCE].append(cols[schema.SOURCE][i] if schema.SOURCE in cols else None)
                rows[schema.METHOD].append(cols[schema.METHOD][i] if schema.METHOD in cols else None)
                rows[schema.ARTIFACT].append(artifact)
                rows[schema.SET_INDEX].append(s)
    return pa.table(rows, schema=schema.MANIFEST)
