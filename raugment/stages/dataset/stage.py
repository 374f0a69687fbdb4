"""The dataset stage: read a labelled dataset, split it by the paper's protocol, store it as shards.

Paper section 3, "Dataset". Sources are plug-ins, one module each in
:mod:`raugment.stages.dataset.sources` (``dataset.source``): ``imagefolder`` (class folders),
``parquet`` (image bytes and a class column), ``synthetic`` (the drawn demo dataset). A source
lists the classes and items (a :class:`~raugment.stages.dataset.sources.Listing`); this stage
splits, reads and stores them.

Protocols (per class, on a seeded permutation of its sorted files; ``k = round_half_up(fraction * n)``,
at least 1): ``subsample`` takes the first k as train and the next k as val, the rest becomes split
"unused" (the leakage audit checks it); ``full`` keeps that same val and trains on everything else;
``split_80_10_10`` makes 80 % train and two equal halves of the rest val and test.

Work happens in two steps: a cheap plan from the file listing (every error in config or input is
raised here, before any image is read), then shards of ``shard_size`` rows per split, each read by a
thread pool and written as soon as it is full, so an ImageNet-size tree streams with bounded memory.
Shard names are fixed by the plan, so a killed run resumes with the shards it has not yet written.
Unreadable or corrupt files become rows of the ``failures`` table with a reason; a class left with
no usable training image is refused like an empty one, found in between by reading each class's
train split until one file decodes (usually its first).

Outputs: ``images`` (schema.IMAGES, split in train/val/test/unused, source and method "original"),
``failures`` (schema.FAILURES) and ``classes.parquet`` (schema.CLASSES with n_train).
"""

from __future__ import annotations

import io
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.artifacts import SPLIT_ORDER
from raugment.core.config import ConfigError
from raugment.core.imageio import ImageDecodeError, decode_image, encode_image, item_id, resize_max_side, stable_id
from raugment.core.stats import round_half_up
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.stages.dataset.classnames import folder_class_name, is_synset_id, lookup
from raugment.stages.dataset.config import DatasetConfig
from raugment.stages.dataset.sources import Listing, Reader, source_class

log = logging.getLogger(__name__)

STAGE = "dataset"


# --------------------------------------------------------------------------------------------
# Planning: classes and splits (pure, cheap, every error before any image is read)
# --------------------------------------------------------------------------------------------


@dataclass
class ClassRow:
    """One row of the ``classes`` table, before counting."""

    label: int
    class_id: str
    class_name: str
    hypernym: str | None = None
    definition: str | None = None


def _subsample(perm: list[str], fraction: float) -> dict[str, list[str]]:
    k = max(1, round_half_up(fraction * len(perm)))
    return {"train": perm[:k], "val": perm[k:2 * k], "unused": perm[2 * k:]}


def _full(perm: list[str], fraction: float) -> dict[str, list[str]]:
    parts = _subsample(perm, fraction)  # the same val as subsample; everything else trains
    return {"train": parts["train"] + parts["unused"], "val": parts["val"]}


def _split_80_10_10(perm: list[str], fraction: float) -> dict[str, list[str]]:
    n = len(perm)
    n_train = min(round_half_up(0.8 * n), n - 2)  # leave at least one each for val and test
    n_val = (n - n_train) // 2
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}


@dataclass(frozen=True)
class SplitProtocol:
    """How one class's permuted training pool is split, and whether that makes the test split."""

    split: Callable[[list[str], float], dict[str, list[str]]]
    makes_test: bool


PROTOCOLS: dict[str, SplitProtocol] = {
    "subsample": SplitProtocol(_subsample, makes_test=False),
    "full": SplitProtocol(_full, makes_test=False),
    "split_80_10_10": SplitProtocol(_split_80_10_10, makes_test=True),
}


def split_class(refs: list[str], protocol: str, fraction: float, seed: int, class_id: str) -> dict[str, list[str]]:
    """Split one class's refs by ``protocol`` on a permutation seeded by (seed, class id).

    The permutation depends only on the seed, the class id and the class's own file list, so
    adding or excluding other classes leaves a class's split unchanged, and ``subsample`` and
    ``full`` with the same seed and fraction share the same val images.
    """
    import numpy as np

    rng = np.random.default_rng([seed, int(stable_id(class_id), 16)])
    return PROTOCOLS[protocol].split([refs[i] for i in rng.permutation(len(refs))], fraction)


def build_classes(class_ids: list[str], mode: str, source_names: dict[str, str]) -> list[ClassRow]:
    """Labels in class-id order, named by ``mode``.

    ``wordnet``: every id must be an ILSVRC-2012 synset. ``auto``: WordNet names when every id is
    synset-shaped (ids outside the 1000-class table keep their folder name, with a warning),
    else the source's own names or :func:`classnames.folder_class_name`. ``folder``: the latter.
    """
    use_wordnet = mode == "wordnet" or (mode == "auto" and all(is_synset_id(c) for c in class_ids))
    rows = []
    for label, cid in enumerate(class_ids):
        info = None
        if use_wordnet:
            try:
                info = lookup(cid)
            except ValueError as exc:
                if mode == "wordnet":
                    raise ConfigError(f"dataset.class_names=wordnet: {exc}") from None
                log.warning("dataset: %s is not in the ImageNet table; using its folder name", cid)
        if info is not None:
            rows.append(ClassRow(label, cid, info.name, info.hypernym, info.definition))
        else:
            rows.append(ClassRow(label, cid, source_names.get(cid) or folder_class_name(cid)))
    return rows


def _select_classes(listing: Listing, cfg: DatasetConfig) -> tuple[dict[str, list[str]], dict[str, list[str]] | None]:
    """Training pool and test split without the excluded classes, checked for consistency."""
    excluded = set(cfg.exclude_classes)
    known = set(listing.train) | set(listing.test or {})
    unknown = sorted(excluded - known)
    if unknown:
        raise ConfigError(f"dataset.exclude_classes: {unknown} are not classes of {cfg.path}; "
                          f"class ids look like {sorted(known)[:3]}")
    train = {c: refs for c, refs in listing.train.items() if c not in excluded}
    test = {c: refs for c, refs in listing.test.items() if c not in excluded} if listing.test else None
    if not train:
        raise ConfigError("dataset.exclude_classes excludes every class")
    empty = sorted(c for c, refs in train.items() if not refs)
    if empty:
        raise ConfigError(f"dataset.path: classes {empty[:5]} have no training images; remove them "
                          "or list them in dataset.exclude_classes")
    extra = sorted(set(test or {}) - set(train))
    if extra:
        raise ConfigError(f"dataset.test_path: test classes {extra[:5]} have no training images; "
                          "list them in dataset.exclude_classes")
    return train, test


def plan_splits(listing: Listing, cfg: DatasetConfig) -> tuple[list[ClassRow], dict[str, dict[str, list[str]]]]:
    """Classes and split -> class id -> refs, validated; raises ConfigError naming the key.

    Raises:
        ConfigError: unknown excluded classes, empty classes, a test split that is missing (or
            present when the protocol makes its own), test classes absent from train, or a
            protocol/fraction that leaves a class with no train, val or test images.
    """
    protocol = PROTOCOLS[cfg.protocol]
    train, test = _select_classes(listing, cfg)
    if protocol.makes_test and test is not None:
        raise ConfigError(f"dataset.protocol={cfg.protocol} makes its own test split but the dataset has "
                          "one; use protocol subsample/full, or a flat <class>/ tree")
    if not protocol.makes_test and test is None:
        raise ConfigError(f"dataset.protocol={cfg.protocol} needs a test split: add {cfg.path}/test "
                          "(or val), set dataset.test_path, or use dataset.protocol=split_80_10_10")
    # Numeric class ids (Parquet integer labels, folders "0".."9", "10") sort as numbers.
    class_ids = sorted(train, key=int) if all(c.isdigit() for c in train) else sorted(train)
    plan: dict[str, dict[str, list[str]]] = {s: {} for s in SPLIT_ORDER}
    for cid in class_ids:
        parts = split_class(train[cid], cfg.protocol, cfg.fraction, cfg.seed, cid)
        short = [s for s in ("train", "val", "test") if s in parts and not parts[s]]
        if short:
            raise ConfigError(f"dataset.fraction={cfg.fraction} with dataset.protocol={cfg.protocol} leaves "
                              f"class {cid!r} ({len(train[cid])} images) with no {'/'.join(short)} images; "
                              "lower the fraction or exclude the class")
        if "unused" in parts and len(parts["val"]) < len(parts["train"]):
            log.warning("dataset: class %r has %d images: val gets %d, train %d", cid, len(train[cid]),
                        len(parts["val"]), len(parts["train"]))
        for split, refs in parts.items():
            plan[split][cid] = refs
        if test is not None:
            plan["test"][cid] = test.get(cid, [])
    classes = build_classes(class_ids, cfg.class_names, listing.names)
    check_unique_names(classes)
    return classes, plan


def check_unique_names(classes: list[ClassRow]) -> None:
    """Two classes with one name get the same prompts and the same retrieved images.

    Names from folders or a Parquet name column must be unique (a typo or a copied folder);
    WordNet names may repeat (ImageNet has two synsets called "crane"), which is only logged.

    Raises:
        ConfigError: naming the class ids that share a name.
    """
    by_name: dict[str, list[ClassRow]] = defaultdict(list)
    for c in classes:
        by_name[c.class_name.casefold()].append(c)  # "Cat" and "cat" prompt alike
    for rows in by_name.values():
        if len(rows) < 2:
            continue
        ids = [r.class_id for r in rows]
        names = sorted({r.class_name for r in rows})
        if all(r.definition for r in rows):  # WordNet synsets: distinct meanings, same lemma
            log.warning("dataset: classes %s share the WordNet name %r; their prompts are alike", ids, names[0])
            continue
        same = f"the same name {names[0]!r}" if len(names) == 1 else f"names that differ only in case {names}"
        raise ConfigError(f"dataset.path: classes {ids} have {same}; prompts and retrieval "
                          "could not tell them apart: rename one folder (or its class_name values)")


def check_trainable(listing: Listing, classes: list[ClassRow], plan: dict[str, dict[str, list[str]]],
                    read_threads: int) -> None:
    """Refuse a class whose train split has no usable image (every file corrupt), like an empty one.

    Reads each class's train-split files in plan order until one decodes, so a healthy class costs
    one decode; the shards read them again.

    Raises:
        ConfigError: naming the class, its folder, the failure reasons and the fix.
    """

    def unusable(cid: str) -> str | None:
        refs, reasons, example = plan["train"][cid], Counter[str](), ""
        for ref in refs:
            try:
                decode_image(listing.reader.read(ref))
                return None
            except ImageDecodeError as exc:
                reason, detail = exc.reason, str(exc)
            except OSError as exc:
                reason, detail = "unreadable", f"{type(exc).__name__}: {exc}"
            reasons[reason] += 1
            example = example or f"{ref}: {detail}"
        counts = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        which = "the one file of its train split does not" if len(refs) == 1 else \
            f"none of the {len(refs)} files of its train split"
        return f"{which} decode ({counts}; e.g. {example[:200]})"

    with ThreadPoolExecutor(max_workers=read_threads) as pool:
        bad = [(cid, why) for cid, why in zip([c.class_id for c in classes],
                                               pool.map(unusable, [c.class_id for c in classes])) if why]
    if bad:
        cid, why = bad[0]
        folder = f" ({listing.folders[cid]})" if cid in listing.folders else ""
        more = f" (and {len(bad) - 1} more such classes: {[c for c, _ in bad[1:6]]})" if len(bad) > 1 else ""
        raise ConfigError(f"dataset.path: class {cid!r}{folder} has no usable training images: {why}{more}; "
                          f"replace or remove its files, or list it in dataset.exclude_classes")


# --------------------------------------------------------------------------------------------
# Reading and encoding (pure core per item; thread pool per shard)
# --------------------------------------------------------------------------------------------


def prepare_image(data: bytes, max_side: int | None, image_format: str, quality: int) -> tuple[bytes, int, int]:
    """Verify ``data`` and return (stored bytes, width, height).

    The original bytes are kept when no resize is needed and they are already in
    ``image_format`` (lossless and cheaper); otherwise the image is resized and re-encoded.

    Raises:
        ImageDecodeError: for data that is not a usable image.
    """
    from PIL import Image

    img = decode_image(data)
    out = resize_max_side(img, max_side)
    if out is img and Image.open(io.BytesIO(data)).format == image_format:
        return data, img.width, img.height
    return encode_image(out, image_format, quality), out.width, out.height


@dataclass
class Shard:
    """One output shard: its stable name, split, and (label, class, ref) items."""

    name: str
    split: str
    items: list[tuple[int, str, str]]


def build_shards(classes: list[ClassRow], plan: dict[str, dict[str, list[str]]], shard_size: int) -> list[Shard]:
    """Chunks of ``shard_size`` items per split, in label order; names fixed by the plan."""
    labels = {c.class_id: c.label for c in classes}
    shards = []
    for split in SPLIT_ORDER:
        items = [(labels[cid], cid, ref) for cid in (c.class_id for c in classes) for ref in plan[split].get(cid, [])]
        for i in range(0, len(items), shard_size):
            shards.append(Shard(f"{split}-{i // shard_size:05d}", split, items[i:i + shard_size]))
    return shards


def read_shard(shard: Shard, reader: Reader, classes: list[ClassRow], cfg: DatasetConfig,
               pool: ThreadPoolExecutor | None = None) -> tuple[pa.Table, pa.Table]:
    """Read, verify and encode one shard -> (images table, failures table)."""
    names = {c.label: c.class_name for c in classes}

    def one(item: tuple[int, str, str]) -> dict[str, Any]:
        label, cid, ref = item
        iid = item_id("orig", cid, ref)
        try:
            data, w, h = prepare_image(reader.read(ref), cfg.max_side, cfg.image_format, cfg.quality)
        except ImageDecodeError as exc:
            return {S.ID: iid, S.LABEL: label, S.REASON: exc.reason, S.DETAIL: f"{ref}: {exc}"}
        except OSError as exc:
            return {S.ID: iid, S.LABEL: label, S.REASON: "unreadable", S.DETAIL: f"{ref}: {exc}"}
        return {S.ID: iid, S.LABEL: label, S.CLASS_ID: cid, S.CLASS_NAME: names[label], S.SPLIT: shard.split,
                S.SOURCE: "original", S.METHOD: "original", S.IMAGE: data, S.WIDTH: w, S.HEIGHT: h,
                S.PARAMS: {"path": ref}}

    results = list(pool.map(one, shard.items) if pool else map(one, shard.items))
    images = [r for r in results if S.REASON not in r]
    failures = [r for r in results if S.REASON in r]
    return S.to_table(images, S.IMAGES), S.to_table(failures, S.FAILURES)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="dataset", unit="img", disable=not enabled)


def _write_dataset(run: StageRun, cfg: Config, listing: Listing, classes: list[ClassRow],
                   plan: dict[str, dict[str, list[str]]]) -> None:
    dcfg = cfg.dataset
    shards = build_shards(classes, plan, dcfg.shard_size)
    done = {p.name for p in run.artifact.files("images")}
    todo = [s for s in shards if f"part-{s.name}.parquet" not in done]
    if len(todo) < len(shards):
        log.info("dataset: resuming, %d of %d shards already written", len(shards) - len(todo), len(shards))
    with ThreadPoolExecutor(max_workers=dcfg.read_threads) as pool, \
            _progress(sum(len(s.items) for s in todo), cfg.run.progress) as bar:
        for shard in todo:
            images, failures = read_shard(shard, listing.reader, classes, dcfg, pool)
            if failures.num_rows:  # failures first: an images shard marks the shard as done
                run.write(failures, "failures", shard=shard.name)
            run.write(images, "images", shard=shard.name)
            bar.update(len(shard.items))
    # Counts come from the shards on disk, so a resumed run reports the whole dataset.
    written = run.artifact.read("images", columns=[S.LABEL, S.SPLIT], schema=S.IMAGES)
    per_split = Counter(zip(written.column(S.SPLIT).to_pylist(), written.column(S.LABEL).to_pylist()))
    empty = [c.class_id for c in classes if not per_split.get(("train", c.label))]
    if empty:  # check_trainable read a usable file of each class before; the files changed since
        raise ConfigError(f"dataset.path: classes {empty[:5]} have no usable training images (see the failures "
                          f"table in {run.path}); replace or remove their files, or list them in "
                          "dataset.exclude_classes")
    for split in SPLIT_ORDER:
        run.stats.add(split, sum(n for (s, _), n in per_split.items() if s == split))
    fails = run.artifact.read("failures", columns=[S.REASON], schema=S.FAILURES)
    for reason, n in Counter(fails.column(S.REASON).to_pylist()).items():
        run.stats.fail(reason, n)
    run.stats.add("classes", len(classes))
    run.stats.extra.update({"ignored_files": listing.ignored, "protocol": dcfg.protocol, "fraction": dcfg.fraction})
    table = S.to_table([{S.LABEL: c.label, S.CLASS_ID: c.class_id, S.CLASS_NAME: c.class_name,
                         S.HYPERNYM: c.hypernym, S.DEFINITION: c.definition,
                         S.COUNT_TRAIN: per_split.get(("train", c.label), 0)} for c in classes], S.CLASSES)
    run.write_single(table, "classes")


def preflight(cfg: Config) -> None:
    """Cheap checks before a study starts Ray: the source is known and its paths exist.

    The full listing (empty or duplicate classes, split sizes) runs in :func:`run`, which needs
    no Ray either.
    """
    d = cfg.dataset
    if not source_class(d.source).needs_path:
        return
    if not d.path:
        raise ConfigError(f"dataset.path is required for dataset.source={d.source}: "
                          "where the dataset's files are")
    for key, value in (("dataset.path", d.path), ("dataset.test_path", d.test_path)):
        if value and not Path(value).exists():
            raise ConfigError(f"{key}: {value!r} does not exist; point it at your copy of the data")


def run(cfg: Config) -> Artifact:
    """Run the dataset stage (key: hash of ``cfg.dataset``); skipped when already complete.

    Listing and planning happen first, so config and input errors surface before any work.

    Raises:
        ConfigError: naming the ``dataset.<key>`` at fault.
    """
    source = source_class(cfg.dataset.source)
    root = Path(cfg.run.root)
    probe = StageRun(root, STAGE, cfg.dataset)
    if probe.complete:  # skip the listing too: it walks the whole tree
        probe.artifact.check_shards()  # footers only: a shard damaged since is named here
        log.info("stage %s [%s] already complete, skipping (%s)", STAGE, probe.key, probe.path)
        return probe.artifact
    listing = source.listing(cfg.dataset, root)
    classes, plan = plan_splits(listing, cfg.dataset)
    check_trainable(listing, classes, plan, cfg.dataset.read_threads)
    return run_stage(root, STAGE, cfg.dataset, None,
                     lambda r: _write_dataset(r, cfg, listing, classes, plan), resumable=True)
