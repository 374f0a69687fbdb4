"""Shortfalls: classes whose added pool holds fewer images than their quota (``assemble.shortfall``).

Retrieval fills each class from the index's neighbours; the filter and dedup stages after it drop
some, and a class with few neighbours may never be filled. The paper left the 10 classes that
retrieval could not fill out of its study (990 classes). ``assemble.shortfall`` says what happens:

* ``exclude`` (the paper): the class is left out of the manifest altogether, its original
  images too, so the classifier neither trains nor is scored on it (the train stage scores the
  classes its manifest holds). In a study the planner gives every assemble run, the baseline's
  included, every method's final pool (``census``) and the largest ratio (``census_ratio``), so
  all classifiers of a dataset train and score on the same class set.
* ``allow``: the class gets what its pool has (fewer added images than the ratio asks for).
* ``fail``: the run stops with one line naming every short class, method and count.

Whatever the policy did is written as the table ``shortfalls`` (schema.SHORTFALLS), which the
report lists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from raugment.core import schema as S
from raugment.stages.assemble.resample import set_size

EXCLUDE, ALLOW, FAIL = "exclude", "allow", "fail"
POLICIES = (EXCLUDE, ALLOW, FAIL)
ACTIONS = {EXCLUDE: "excluded", ALLOW: "allowed", FAIL: "failed"}


@dataclass(frozen=True)
class Shortfall:
    """One class of one method's pool that cannot fill its quota at ``ratio``."""

    label: int
    method: str
    ratio: float
    need: int
    available: int

    @property
    def short(self) -> int:
        return self.need - self.available


def split_quota(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, larger shares first (sums to ``total``)."""
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


def pool_counts(table: pa.Table, exclude_ids: set[str] | frozenset[str] = frozenset()) -> Counter:
    """Images per class of an added pool, without ``exclude_ids`` (leakage candidates)."""
    if exclude_ids:
        keep = pc.invert(pc.is_in(table.column(S.ID), value_set=pa.array(sorted(exclude_ids), pa.string())))
        table = table.filter(keep)
    return Counter(int(label) for label in table.column(S.LABEL).to_pylist())


def find(train_counts: Mapping[int, int], pools: Sequence[tuple[str, Mapping[int, int]]],
         ratio: float) -> list[Shortfall]:
    """Classes whose share of the quota at ``ratio`` exceeds what a pool holds.

    Args:
        train_counts: label -> original training images of the class.
        pools: (method, label -> images in its pool), mixed in this order: each class's quota
            ``round(n * ratio / 100)`` is split between them as :func:`split_quota` does.
        ratio: augmentation ratio in percent.
    """
    out = []
    for label in sorted(train_counts):
        shares = split_quota(set_size(int(train_counts[label]), ratio), len(pools)) if pools else []
        for (method, counts), need in zip(pools, shares):
            have = int(counts.get(label, 0))
            if need > have:
                out.append(Shortfall(int(label), method, float(ratio), need, have))
    return out


def describe(shortfalls: Sequence[Shortfall], names: Mapping[int, str]) -> str:
    """One line naming every short class: ``'tench' (label 0): retrieval has 5 of 7 (short by 2)``."""
    return "; ".join(f"{names.get(s.label, str(s.label))!r} (label {s.label}): {s.method} has {s.available} "
                     f"of {s.need} at {s.ratio:g} % (short by {s.short})" for s in shortfalls)


def error(shortfalls: Sequence[Shortfall], names: Mapping[int, str]) -> ValueError:
    """The ``fail`` policy's one-line error."""
    classes = sorted({s.label for s in shortfalls})
    return ValueError(f"assemble.shortfall=fail: {len(classes)} class(es) cannot be filled: "
                      f"{describe(shortfalls, names)}; set study.shortfall=exclude (leave them out of "
                      "every method's comparison, as the paper did) or study.shortfall=allow (use what "
                      "there is), or retrieve/generate more")


def table(shortfalls: Sequence[Shortfall], names: Mapping[int, str], policy: str) -> pa.Table:
    """The ``shortfalls`` table: one row per (class, method) with the policy's action."""
    rows = [{S.LABEL: s.label, S.CLASS_NAME: names.get(s.label), S.METHOD: s.method, S.RATIO: s.ratio,
             S.NEED: s.need, S.AVAILABLE: s.available, S.ACTION: ACTIONS[policy]} for s in shortfalls]
    return S.to_table(rows, S.SHORTFALLS)
