"""Assemble an augmented training set: the original train split + added images at a ratio.

The result is a manifest (schema.MANIFEST) of image ids and the artifacts that hold them, never
copies of images. Per class, the added quota is ``round(n_train * ratio / 100)`` (half up, as in
:func:`raugment.stages.assemble.resample.set_size`), split evenly between the mixed methods. Each method's pool is
drawn by :func:`raugment.stages.assemble.resample.resample_sets`: a generated pool is resampled into
``assemble.num_sets`` independent draws of which ``assemble.set_index`` is taken (the paper's five
augmented sets); a retrieved pool gives its top ranks (most similar first), the same for every set. Ratio 0 is
the unaugmented baseline. The final per-class counts are checked against the target.

A class whose pool cannot fill its share is handled by ``assemble.shortfall``
(:mod:`raugment.stages.assemble.shortfall`): left out (with its originals; in a study, checked
against every method's pool so that all classifiers share one class set), filled with what there
is, or refused in one line. Table ``shortfalls`` records what was done.
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
from raugment.stages.assemble import shortfall as SF
from raugment.stages.assemble.config import AssembleConfig
from raugment.stages.assemble.resample import RESAMPLE_VERSION, resample_sets, set_size
from raugment.stages.assemble.shortfall import split_quota

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


def targets(train_counts: Mapping[int, int], ratio: float) -> dict[int, int]:
    """Added images needed per class at ``ratio`` percent of the original per-class counts."""
    return {int(label): set_size(int(n), ratio) for label, n in train_counts.items()}


def build_manifest(original: pa.Table, pools: Sequence[AddedImages], *, ratio: float, set_index: int,
                   num_sets: int, seed: int, original_artifact: str,
                   exclude_ids: set[str] | frozenset[str] = frozenset(),
                   allow_short: bool = False) -> pa.Table:
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
        allow_short: a class whose pool is short of its share gets what the pool has
            (``assemble.shortfall=allow``) instead of an error.

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
    added_need: Counter = Counter({label: 0 for label in need})
    for j, pool in enumerate(pools):
        table = pool.table
        if exclude_ids:
            keep = pc.invert(pc.is_in(table.column(S.ID), value_set=pa.array(sorted(exclude_ids), pa.string())))
            table = table.filter(keep)
        share = {label: s[j] for label, s in shares.items()}
        if allow_short:
            have = SF.pool_counts(table)
            share = {label: min(q, have.get(label, 0)) for label, q in share.items()}
        added_need.update(share)
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
    check_counts(manifest, counts, added_need if pools else need)
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


def _leakage_of(cfg: AssembleConfig, method: str, audits: Mapping[str, Artifact]) -> set[str]:
    if cfg.leakage == "keep" or method not in audits:
        return set()
    from raugment.core.artifacts import candidate_ids

    return set(candidate_ids(audits[method]))


def apply_policy(cfg: AssembleConfig, train_counts: Mapping[int, int], own: Sequence[tuple[str, Mapping[int, int]]],
                 census: Sequence[tuple[str, Mapping[int, int]]], names: Mapping[int, str]
                 ) -> tuple[set[int], list[SF.Shortfall]]:
    """What ``assemble.shortfall`` does with the short classes: (labels to leave out, shortfalls).

    ``own`` are the pools this run mixes (checked at ``assemble.ratio``); ``census`` every pool
    of the study, each alone, checked at ``assemble.census_ratio`` (only ``exclude`` uses it).

    Raises:
        ValueError: ``fail`` with a short class (one line naming them all), or ``exclude`` that
            leaves no class.
    """
    found = SF.find(train_counts, own, cfg.ratio) if own and cfg.ratio > 0 else []
    if cfg.shortfall == SF.FAIL:
        if found:
            raise SF.error(found, names)
        return set(), []
    if cfg.shortfall == SF.ALLOW:
        return set(), found
    ratio = cfg.ratio if cfg.census_ratio is None else cfg.census_ratio
    seen = {(s.label, s.method) for s in found}
    for method, counts in census:  # the run's own pool is in the census too: one row per class and pool
        found += [s for s in (SF.find(train_counts, [(method, counts)], ratio) if ratio > 0 else [])
                  if (s.label, s.method) not in seen]
    excluded = {s.label for s in found}
    if excluded and excluded >= set(train_counts):
        raise ValueError(f"assemble.shortfall=exclude leaves no class: {SF.describe(found, names)}; "
                         "retrieve/generate more or lower the ratio")
    return excluded, found


def run(cfg: Config, dataset: Artifact, added: Mapping[str, Artifact] | None = None,
        audit: Artifact | None = None, census: Mapping[str, Artifact] | None = None,
        census_audit: Mapping[str, Artifact] | None = None) -> Artifact:
    """Stage "assemble": write table ``manifest`` for ``cfg.assemble`` (ratio, set, sources) and
    table ``shortfalls`` (what ``assemble.shortfall`` did with classes that cannot be filled).

    Args:
        cfg: the whole config (reads ``assemble`` and ``run.seed``).
        dataset: the dataset artifact (its ``train`` split is the original data).
        added: method name -> added-image artifact (generation/retrieval/filter output).
        audit: the leakage audit artifact, needed when ``assemble.leakage == "remove"``.
        census: method name -> every final pool of the study (``assemble.shortfall=exclude``: a
            class short in any of them at ``assemble.census_ratio`` is left out here too).
        census_audit: method name -> its leakage audit (used with ``assemble.leakage=remove``).
    """
    added = dict(added or {})
    acfg = cfg.assemble
    census = dict(census or {}) if acfg.shortfall == SF.EXCLUDE else {}
    census_audit = dict(census_audit or {})
    names = _select_sources(acfg, added)
    exclude = _leakage_ids(acfg, audit) if names else set()
    root = Path(cfg.run.root)
    # The policy is decided before any work (a fail is one line, nothing written). The census
    # pools are keyed by what they decide (the classes left out), not by their artifacts: a study
    # that grows by a method that fills every class keeps its finished classifiers.
    images = dataset.read("images", columns=[S.ID, S.LABEL, S.SPLIT])
    original = images.filter(pc.equal(images.column(S.SPLIT), "train"))
    if original.num_rows == 0:
        raise ValueError(f"dataset artifact {dataset.path} has no train split")
    classes = dataset.read("classes", columns=[S.LABEL, S.CLASS_NAME])
    class_names = dict(zip(classes.column(S.LABEL).to_pylist(), classes.column(S.CLASS_NAME).to_pylist()))
    train_counts = Counter(int(label) for label in original.column(S.LABEL).to_pylist())
    pools = [read_added(m, added[m], root) for m in names]
    own = [(p.method, SF.pool_counts(p.table, exclude)) for p in pools]
    others = [(m, SF.pool_counts(read_added(m, census[m], root).table, _leakage_of(acfg, m, census_audit)))
              for m in sorted(census)]
    left_out, found = apply_policy(acfg, train_counts, own, others, class_names)
    section: dict = {"assemble": to_dict(acfg), "seed": cfg.run.seed, "sources": names}
    if names:  # the draw changed (independent sets): a new key; the baseline's key stays as it was
        section["resample"] = RESAMPLE_VERSION
    if found:
        section["shortfalls"] = [[s.label, s.method, s.need, s.available] for s in found]
    inputs: dict[str, Artifact | str] = {"dataset": dataset, **{f"added.{m}": added[m] for m in names}}
    if exclude and audit is not None:
        inputs["audit"] = audit

    def body(run: StageRun) -> None:
        kept_original, kept_pools = original, pools
        if left_out:
            drop = pa.array(sorted(left_out), pa.int32())

            def keep(t: pa.Table) -> pa.Table:
                return t.filter(pc.invert(pc.is_in(t.column(S.LABEL).cast(pa.int32()), value_set=drop)))

            kept_original = keep(original)
            kept_pools = [AddedImages(p.method, keep(p.table), p.artifact) for p in pools]
            log.warning("assemble: %d class(es) left out (assemble.shortfall=exclude): %s", len(left_out),
                        SF.describe(found, class_names))
        manifest = build_manifest(kept_original, kept_pools, ratio=acfg.ratio, set_index=acfg.set_index,
                                  num_sets=acfg.num_sets, seed=cfg.run.seed,
                                  original_artifact=_relative(dataset, root), exclude_ids=exclude,
                                  allow_short=acfg.shortfall == SF.ALLOW)
        run.write(manifest, TABLE, shard="0")
        run.write(SF.table(found, class_names, acfg.shortfall), "shortfalls", shard="0")
        by_method = Counter(manifest.column(S.METHOD).to_pylist())
        run.stats.add("original", by_method.pop("original", 0))
        run.stats.add("added", sum(by_method.values()))
        for method, n in by_method.items():
            run.stats.add(f"added.{method}", n)
        run.stats.add("classes", len(train_counts) - len(left_out))
        run.stats.extra.update({"ratio": acfg.ratio, "set_index": acfg.set_index,
                                "leakage_removed_candidates": len(exclude),
                                "shortfall": {"policy": acfg.shortfall,
                                              "excluded": sorted(class_names.get(k, str(k)) for k in left_out),
                                              "short_images": sum(s.short for s in found)}})

    return run_stage(cfg.run.root, STAGE, section, inputs, body)
