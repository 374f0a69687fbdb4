"""Resampling added images into sets with the target dataset's per-class counts (paper section 3).

The paper generates more images than it needs (390 per class for 10 % ImageNet) and draws five sets
from them, each with exactly as many images per class as the target training split (times the
augmentation ratio), to get variance estimates over resampled sets. Sets are manifests: image ids
plus the artifact that holds them, never copies of the images.

Each set of an unranked (generated) pool is its own random draw without replacement, seeded by
``(seed, class, set)``: the error bars over sets come from independent resamples, and set ``s`` is
the same draw whatever ``num_sets`` is. (Before :data:`RESAMPLE_VERSION` 2 the sets were cyclic
windows of one permutation, so with a pool of 3 sets' worth, sets 3 and 4 repeated sets 0 and 1.)
A ranked (retrieved) pool is not a draw: its sets are windows of the rank order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from raugment.core import schema
from raugment.core.stats import round_half_up

#: Version of the sampling rule, part of the assemble key wherever added pools are drawn from.
RESAMPLE_VERSION = 2


def set_size(target_count: int, ratio: float) -> int:
    """Images one set needs for a class: ``target_count * ratio / 100`` rounded half up."""
    return round_half_up(target_count * ratio / 100.0)


def _class_order(ids: list[str], ranks: list, rng: np.random.Generator) -> list[str]:
    """A ranked class pool in rank order (best first: retrieval's most similar to the query).

    A random permutation breaks ties, so equal ranks still come out in a seeded random order.
    """
    perm: list[int] = rng.permutation(len(ids)).tolist()
    perm = sorted(perm, key=lambda i: ranks[i])  # stable: ties keep the random order
    return [ids[i] for i in perm]


def draw_sets(size: int, need: int, num_sets: int, seed: int, label: int) -> list[list[int]]:
    """``num_sets`` independent draws of ``need`` of ``size`` positions, no two alike when possible.

    Set ``s`` draws without replacement from ``default_rng([seed, label, s])``, so it depends on
    ``(seed, class, s)`` and the sets before it only, never on ``num_sets``. A draw that repeats an
    earlier set is drawn again (from the same generator) while there are subsets not yet used;
    when ``size == need`` every set is the whole pool, the only draw there is.
    """
    subsets = math.comb(size, need)
    seen: set[frozenset[int]] = set()
    out: list[list[int]] = []
    for s in range(num_sets):
        rng = np.random.default_rng([seed, label, s])
        while True:
            picked = sorted(rng.choice(size, need, replace=False).tolist())
            key = frozenset(picked)
            if key not in seen or len(seen) >= subsets:
                break
        seen.add(key)
        out.append(picked)
    return out


def resample_sets(pool: pa.Table, target_counts: Mapping[int, int], ratio: float, num_sets: int,
                  seed: int, artifact: str) -> pa.Table:
    """Draw ``num_sets`` sets with exact per-class counts: independent draws from each class's pool.

    Unranked pool: for each class, set ``s`` is a random draw of ``n`` ids without replacement
    (:func:`draw_sets`), so the sets overlap as random draws do and no two are identical while the
    pool has more than ``n`` ids. Ranked pool (``rank`` column present and filled): the pool is put
    in rank order (a seeded shuffle breaks ties) and set ``s`` takes positions ``s*n ... s*n+n-1``
    of it read cyclically (set 0 = the top ``n``). No set holds an id twice because ``n`` never
    exceeds the pool.

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
        size = len(members)
        if ranks is not None and all(ranks[i] is not None for i in members):
            rng = np.random.default_rng([seed, label])
            order = _class_order([cols[schema.ID][i] for i in members], [ranks[i] for i in members], rng)
            where = {cols[schema.ID][i]: i for i in members}
            picks = [[where[order[(s * need + j) % size]] for j in range(need)] for s in range(num_sets)]
        else:
            picks = [[members[p] for p in draw] for draw in draw_sets(size, need, num_sets, seed, label)]
        for s, rows_of_set in enumerate(picks):
            for i in rows_of_set:
                image_id = cols[schema.ID][i]
                rows[schema.ID].append(image_id)
                rows[schema.LABEL].append(label)
                rows[schema.SOURCE].append(cols[schema.SOURCE][i] if schema.SOURCE in cols else None)
                rows[schema.METHOD].append(cols[schema.METHOD][i] if schema.METHOD in cols else None)
                rows[schema.ARTIFACT].append(artifact)
                rows[schema.SET_INDEX].append(s)
    return pa.table(rows, schema=schema.MANIFEST)
