"""Assemble an augmented training set: the original train split + added images at a ratio.

The result is a manifest (schema.MANIFEST) of image ids and the artifacts that hold them, never
copies of images. Per class, the added quota is ``round(n_train * ratio / 100)`` (half up, as in
:func:`raugment.stages.assemble.resample.set_size`), split evenly between the mixed methods. Each method's pool is
drawn by :func:`raugment.stages.assemble.resample.resample_sets`: a generated pool is resampled into
``assemble.num_sets`` independent draws of which ``assemble.set_index`` is taken (the paper's five
augmented sets); a retrieved pool gives its top ranks (most similar first), the same for every set. Ratio 0 is
the unaugmented baseline. The final per-class counts are checked against the target.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.config import ConfigError, to_dict
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.stages.assemble.config import AssembleConfig
from raugment.stages.assemble.resample import RESAMPLE_VERSION, resample_sets, set_size

log = logging.getLogger(__name__)

STAGE = "assemble"
TABLE = "manifest"
ADDED_COLUMNS = [S.ID, S.LABEL, S.SOURCE, S.METHOD, S.RANK]


@dataclass(frozen=True)
class AddedImages:
    """One method's added images: ids/labels/ranks (no bytes) and where they live."""

    method: str
    table: pa.Table
    artifact: str  # stage directory relative to the run root

    @property
    def ranked(self) -> bool:
        """Retrieved pools are taken by rank (top-m); generated pools are resampled into sets."""
        sources = set(self.table.column(S.SOURCE).to_pylist()) if S.SOURCE in self.table.column_names else set()
        return sources == {"retrieved"}


def split_quota(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, larger shares first (sums to ``total``)."""
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


def targets(train_counts: Mapping[int, int], ratio: float) -> dict[int, int]:
    """Added images needed per class at ``ratio`` percent of the original per-class counts."""
    return {int(label): set_size(int(n), ratio) for label, n in train_counts.items()}


def build_manifest(original: pa.Table, pools: Sequence[AddedImages], *, ratio: float, set_index: int,
                   num_sets: int, seed: int, original_artifact: str,
                   exclude_ids: set[str] | frozenset[str] = frozenset()) -> pa.Table:
    """The assembled manifest: every original training image plus each class's added quota.

    Args:
        original: the train split (columns id, label at least).
        pools: the added methods to mix, in order (earlier methods get the larger share of an odd
            quota).
        ratio: augmentation ratio in percent (0 = baseline).
        set_index: which resampled set of the generated pools to take.
        num_sets: how many sets generated pools are resampled into.
        seed: resampling seed (set ``s`` is drawn from ``(seed, class, s)``).
        original_artifact: the dataset artifact directory relative to the run root.
        exclude_ids: added ids never to use (leakage candidates).

    Raises:
        ValueError: a pool too small for its share, or final counts off target (naming the class
            and the shortfall).
    """
    labels = original.column(S.LABEL).to_pylist()
    counts = Counter(int(label) for label in labels)
    need = targets(counts, ratio)
    n = original.num_rows
    parts = [pa.table({
        S.ID: original.column(S.ID).cast(pa.string()),
        S.LABEL: pa.array(labels, pa.int32()),
        S.SOURCE: pa.array(["original"] * n, pa.string()),
        S.METHOD: pa.array(["original"] * n, pa.string()),
        S.ARTIFACT: pa.array([original_artifact] * n, pa.string()),
        S.SET_INDEX: pa.array([set_index] * n, pa.int32()),
    }, schema=S.MANIFEST)]
    if ratio > 0 and not pools:
        raise ValueError(f"assemble.ratio={ratio} needs added images, but no added artifact was given; "
                         "pass added={method: artifact} or set assemble.ratio=0 for the baseline")
    shares = {label: split_quota(q, len(pools)) for label, q in need.items()} if pools else {}
    for j, pool in enumerate(pools):
        table = pool.table
        if exclude_ids:
            keep = pc.invert(pc.is_in(table.column(S.ID), value_set=pa.array(sorted(exclude_ids), pa.string())))
            table = table.filter(keep)
        share = {label: s[j] for label, s in shares.items()}
        try:
            sets = resample_sets(table, share, 100.0, 1 if pool.ranked else num_sets, seed, pool.artifact)
        except ValueError as exc:
            raise ValueError(f"method {pool.method!r}: {exc}") from None
        chosen = 0 if pool.ranked else set_index
        picked = sets.filter(pc.equal(sets.column(S.SET_INDEX), chosen))
        picked = picked.set_column(picked.schema.get_field_index(S.SET_INDEX), S.SET_INDEX,
                                   pa.array([set_index] * picked.num_rows, pa.int32()))
        parts.append(picked)
    manifest = pa.concat_tables(parts)
    check_counts(manifest, counts, need)
    return manifest


def check_counts(manifest: pa.Table, original_counts: Mapping[int, int], added_counts: Mapping[int, int]) -> None:
    """Raise ValueError naming the first class whose original or added count is off target."""
    got_orig: Counter = Counter()
    got_added: Counter = Counter()
    for label, source in zip(manifest.column(S.LABEL).to_pylist(), manifest.column(S.SOURCE).to_pylist()):
        (got_orig if source == "original" else got_added)[label] += 1
    for label in sorted(original_counts):
        for what, want, got in (("original", original_counts[label], got_orig.get(label, 0)),
                                ("added", added_counts.get(label, 0), got_added.get(label, 0))):
            if want != got:
                raise ValueError(f"class {label}: {what} images {got} != target {want} "
                                 f"(shortfall {want - got})")
    ids = manifest.column(S.ID)
    if pc.count_distinct(ids).as_py() != manifest.num_rows:
        raise ValueError("assembled manifest holds an id twice; the added pools overlap the original "
                         "split or each other")


def _relative(artifact: Artifact, root: Path) -> str:
    try:
        return str(artifact.path.resolve().relative_to(root.resolve()))
    except ValueError:  # an artifact outside this run root: keep it absolute
        return str(artifact.path.resolve())


def read_added(method: str, artifact: Artifact, root: Path) -> AddedImages:
    """An added artifact's ``images`` table as a :class:`AddedImages` (bytes are not read)."""
    table = artifact.read("images", columns=ADDED_COLUMNS)
    return AddedImages(method, table, _relative(artifact, root))


def _select_sources(cfg: AssembleConfig, added: Mapping[str, Artifact]) -> list[str]:
    names = list(cfg.sources) or sorted(added)
    unknown = [n for n in names if n not in added]
    if unknown:
        raise ConfigError(f"assemble.sources names {unknown}, but the added artifacts given are "
                          f"{sorted(added)}; fix assemble.sources or pass those artifacts")
    if cfg.ratio > 0 and not names:
        raise ConfigError(f"assemble.ratio={cfg.ratio} needs added images, but no added artifact was "
                          "given; pass --added METHOD=DIR (added={method: artifact}) or set "
                          "assemble.ratio=0 for the baseline")
    return names if cfg.ratio > 0 else []


def _leakage_ids(cfg: AssembleConfig, audit: Artifact | None) -> set[str]:
    if cfg.leakage == "keep":
        return set()
    if audit is None:
        raise ConfigError("assemble.leakage=remove needs the audit artifact (audit=...); run the audit "
                          "stage first or set assemble.leakage=keep")
    from raugment.core.artifacts import candidate_ids

    return set(candidate_ids(audit))


def run(cfg: Config, dataset: Artifact, added: Mapping[str, Artifact] | None = None,
        audit: Artifact | None = None) -> Artifact:
    """Stage "assemble": write table ``manifest`` for ``cfg.assemble`` (ratio, set, sources).

    Args:
        cfg: the whole config (reads ``assemble`` and ``run.seed``).
        dataset: the dataset artifact (its ``train`` split is the original data).
        added: method name -> added-image artifact (generation/retrieval/filter output).
        audit: the leakage audit artifact, needed when ``assemble.leakage == "remove"``.
    """
    added = dict(added or {})
    acfg = cfg.assemble
    names = _select_sources(acfg, added)
    exclude = _leakage_ids(acfg, audit) if names else set()
    root = Path(cfg.run.root)
    section: dict = {"assemble": to_dict(acfg), "seed": cfg.run.seed, "sources": names}
    if names:  # the draw changed (independent sets): a new key; the baseline's key stays as it was
        section["resample"] = RESAMPLE_VERSION
    inputs: dict[str, Artifact | str] = {"dataset": dataset, **{f"added.{m}": added[m] for m in names}}
    if exclude and audit is not None:
        inputs["audit"] = audit

    def body(run: StageRun) -> None:
        images = dataset.read("images", columns=[S.ID, S.LABEL, S.SPLIT])
        original = images.filter(pc.equal(images.column(S.SPLIT), "train"))
        if original.num_rows == 0:
            raise ValueError(f"dataset artifact {dataset.path} has no train split")
        pools = [read_added(m, added[m], root) for m in names]
        manifest = build_manifest(original, pools, ratio=acfg.ratio, set_index=acfg.set_index,
                                  num_sets=acfg.num_sets, seed=cfg.run.seed,
                                  original_artifact=_relative(dataset, root), exclude_ids=exclude)
        run.write(manifest, TABLE, shard="0")
        by_method = Counter(manifest.column(S.METHOD).to_pylist())
        run.stats.add("original", by_method.pop("original", 0))
        run.stats.add("added", sum(by_method.values()))
        for method, n in by_method.items():
            run.stats.add(f"added.{method}", n)
        run.stats.extra.update({"ratio": acfg.ratio, "set_index": acfg.set_index,
                                "leakage_removed_candidates": len(exclude)})

    return run_stage(cfg.run.root, STAGE, section, inputs, body)
