"""``parquet`` source: a Parquet file, or a directory of them, with image bytes and a class column.

Keys (section ``dataset``, declared by :class:`Settings`): ``image_column`` (bytes, or a struct with
a ``bytes`` field as Hugging Face writes), ``label_column`` (None: the first of ``label``,
``class_id``, ``class_name``) and ``split_column``; a ``class_name`` column names the classes.
Split values: see :func:`split_roles`; every file under ``dataset.test_path`` is the test split
(the split column is then ignored). Refs are ``<file index>/<row:09d>``.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from raugment.core import schema as S
from raugment.core.config import ConfigError, InputError, PluginSettings
from raugment.core.imageio import ImageDecodeError
from raugment.core.storage import read_parquet, read_parquet_schema
from raugment.stages.dataset.sources import DATASETS, DatasetSource, Listing

if TYPE_CHECKING:
    from raugment.stages.dataset.config import DatasetConfig

log = logging.getLogger(__name__)


@dataclass
class Settings(PluginSettings):
    """Keys of the ``parquet`` source (section ``dataset``)."""

    image_column: str = "image"
    label_column: str | None = None
    split_column: str | None = "split"


def _parquet_files(path: Path, key: str) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if files:
            return files
    raise ConfigError(f"{key}: {str(path)!r} is neither a Parquet file nor a directory holding some")


class ParquetReader:
    """Refs are ``<file index>/<row:09d>`` into a fixed list of files; reads one row's image cell.

    Rows are fetched through their row group; the last few row groups' image columns are cached
    because the refs of a shard are sorted, so neighbouring items (read by different threads)
    mostly share a row group.
    """

    def __init__(self, files: list[Path], image_column: str, cached_groups: int = 4):
        self.files = files
        self.image_column = image_column
        self._starts = functools.lru_cache(maxsize=None)(self._row_group_starts)
        self._column = functools.lru_cache(maxsize=cached_groups)(self._read_column)

    def _row_group_starts(self, fi: int) -> list[int]:
        meta = pq.ParquetFile(self.files[fi]).metadata
        starts, total = [], 0
        for g in range(meta.num_row_groups):
            starts.append(total)
            total += meta.row_group(g).num_rows
        return starts

    def _read_column(self, fi: int, group: int) -> pa.Array:
        col = pq.ParquetFile(self.files[fi]).read_row_group(group, columns=[self.image_column]).column(0)
        col = col.combine_chunks()
        return col.field("bytes") if pa.types.is_struct(col.type) else col

    def read(self, ref: str) -> bytes:
        fi_s, _, row_s = ref.partition("/")
        fi, row = int(fi_s), int(row_s)
        starts = self._starts(fi)
        group = bisect.bisect_right(starts, row) - 1
        value = self._column(fi, group)[row - starts[group]].as_py()
        if value is None:
            raise ImageDecodeError("empty")
        return value


def list_parquet(cfg: DatasetConfig, run_root: Path) -> Listing:
    """List Parquet rows by class (and split, from ``split_column`` or ``test_path``)."""
    keys = Settings.of(cfg)
    files = _parquet_files(Path(cfg.path or ""), "dataset.path")
    test_files = _parquet_files(Path(cfg.test_path), "dataset.test_path") if cfg.test_path else []
    all_files = files + test_files
    fix = "replace or remove that file under dataset.path / dataset.test_path"
    first = read_parquet_schema(all_files[0], fix=fix)
    if keys.image_column not in first.names:
        raise ConfigError(f"dataset.image_column: {keys.image_column!r} is not a column of {all_files[0]} "
                          f"(columns: {first.names})")
    label_col = keys.label_column or next((c for c in (S.LABEL, S.CLASS_ID, S.CLASS_NAME) if c in first.names), None)
    if label_col is None or label_col not in first.names:
        raise ConfigError(f"dataset.label_column: no class column in {all_files[0]}; name one of {first.names}")
    split_col = keys.split_column if keys.split_column in first.names and not cfg.test_path else None
    name_col = S.CLASS_NAME if S.CLASS_NAME in first.names and label_col != S.CLASS_NAME else None
    # split value -> class id -> refs; files under test_path count as split "test"
    by_value: dict[Any, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    names: dict[str, str] = {}
    unlabelled = 0
    for fi, f in enumerate(all_files):
        missing = sorted({label_col, keys.image_column} - set(read_parquet_schema(f, fix=fix).names))
        if missing:
            raise InputError(f"dataset.path: {f} lacks column(s) {missing} that {all_files[0]} has; "
                             "every Parquet file of a dataset needs the same columns")
        table = read_parquet(f, [label_col] + [c for c in (split_col, name_col) if c], fix=fix)
        labels = table.column(label_col).to_pylist()
        splits = table.column(split_col).to_pylist() if split_col else [None] * len(labels)
        if fi >= len(files):
            splits = ["test"] * len(labels)
        class_names = table.column(name_col).to_pylist() if name_col else [None] * len(labels)
        for row, (lab, sp, nm) in enumerate(zip(labels, splits, class_names)):
            if lab is None:
                unlabelled += 1
                continue
            by_value[None if sp is None else str(sp).lower()][str(lab)].append(f"{fi}/{row:09d}")
            if nm:
                names.setdefault(str(lab), nm)
    train_values, test_value = split_roles(set(by_value))
    skipped = {v: sum(map(len, by_value[v].values())) for v in by_value if v not in train_values and v != test_value}
    if skipped or unlabelled:
        log.warning("dataset: skipped Parquet rows: %d without a class, by split value %s", unlabelled, skipped)
    train: dict[str, list[str]] = defaultdict(list)
    for v in train_values & set(by_value):
        for cid, refs in by_value[v].items():
            train[cid].extend(refs)
    test = {cid: sorted(refs) for cid, refs in by_value[test_value].items()} if test_value else None
    return Listing(train={cid: sorted(refs) for cid, refs in train.items()}, test=test,
                   reader=ParquetReader(all_files, keys.image_column), names=names)


def split_roles(values: set[Any]) -> tuple[set[Any], str | None]:
    """Which split values form the training pool, and which one is the test split.

    No split column (None) and "train" are the training pool. "test" is the test split; without
    it "val" or "validation" is (ImageNet's val is our test split). Other values are skipped.
    """
    test = next((v for v in ("test", "val", "validation") if v in values), None)
    return {None, "train"}, test


@DATASETS.register("parquet")
class ParquetSource(DatasetSource):
    """Rows of Parquet files under ``dataset.path`` (and ``dataset.test_path``)."""

    settings = Settings

    @classmethod
    def listing(cls, section: DatasetConfig, run_root: Path) -> Listing:
        return list_parquet(section, run_root)
