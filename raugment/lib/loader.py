"""Training data path: a PyTorch DataLoader streaming images straight out of stage Parquet shards.

Why a DataLoader over the shards rather than Ray Data: the assembled training set is a manifest of
ids pointing into artifacts that already hold encoded (ideally pre-resized) images, so the only
work per image is decode + crop + flip. That work scales with DataLoader worker processes on the
node that owns the GPU, with no object-store copies, no extra scheduling round trip per batch and
nothing to starve on a 2-CPU box (Ray Train workers reading a Ray Dataset at 1 CPU each leave
none for ingest and hang). A Ray Data pipeline would pay off when
decoding must spill to CPU-only nodes; the index below is the same either way.

How it streams without holding the data set in memory:

* :func:`build_index` reads only the ``id``/``label``/``split`` columns and returns
  :class:`Unit`\\ s — one Parquet row group and the rows of it that belong to the set.
* Each epoch, :func:`plan_epoch` permutes the units and their rows with a seed derived from
  ``(seed, epoch)`` (identical on every rank, no communication), lays them out as one virtual
  sequence and gives every DDP rank an equal contiguous slice (so every rank runs the same number
  of steps — unequal step counts would deadlock DDP), then splits a rank's slice between its loader
  workers.
* :class:`ParquetImages` reads a row group's ``image`` column once, pushes the selected rows through
  a bounded shuffle buffer and yields decoded, augmented tensors (or the raw bytes, for GPU JPEG
  decoding in the train loop).
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raugment.core import schema as S
from raugment.core.storage import Artifact

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# ImageNet channel statistics: the usual normalisation for ResNets trained from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Unit:
    """Rows of one Parquet row group that belong to a training/evaluation set."""

    path: str
    row_group: int
    rows: np.ndarray    # int64 row indices within the row group
    labels: np.ndarray  # int64 labels, aligned with ``rows``

    def __len__(self) -> int:
        return len(self.rows)


def count(units: Sequence[Unit]) -> int:
    """Number of images in ``units``."""
    return int(sum(len(u) for u in units))


def index_files(files: Sequence[str | Path], *, ids: Mapping[str, int] | None = None,
                split: str | None = None) -> tuple[list[Unit], set[str]]:
    """Units of ``files`` whose rows have an id in ``ids`` (label from ``ids``) or ``split``.

    Units are ordered by the smallest id they hold, not by file name: shard names carry process
    ids, so ordering by name would make the epoch permutation (and the trained model) depend on
    which process wrote a shard rather than on what the shards contain.

    Returns:
        the units, and the set of ids found (to check a manifest is complete).
    """
    keyed: list[tuple[str, Unit]] = []
    found: set[str] = set()
    id_set = pa.array(list(ids), pa.string()) if ids is not None else None
    for f in files:
        pf = pq.ParquetFile(str(f))
        columns = [S.ID, S.LABEL] + ([S.SPLIT] if split is not None else [])
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=columns)
            mask = pc.is_in(t.column(S.ID), value_set=id_set) if id_set is not None \
                else pc.equal(t.column(S.SPLIT), split)
            rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False)).astype(np.int64)
            if not len(rows):
                continue
            chosen = t.column(S.ID).take(pa.array(rows)).to_pylist()
            if ids is not None:
                found.update(chosen)
                labels = np.array([ids[i] for i in chosen], dtype=np.int64)
            else:
                labels = t.column(S.LABEL).to_numpy()[rows].astype(np.int64)
            keyed.append((min(chosen), Unit(str(f), rg, rows, labels)))
    keyed.sort(key=lambda item: item[0])
    return [unit for _, unit in keyed], found


def build_index(manifest: pa.Table, root: str | Path) -> list[Unit]:
    """Units for every id of a manifest (schema.MANIFEST) under the run root ``root``.

    Raises:
        ValueError: if an artifact of the manifest is missing or incomplete, or ids are not found.
    """
    units: list[Unit] = []
    artifacts = manifest.column(S.ARTIFACT).to_pylist()
    ids = manifest.column(S.ID).to_pylist()
    labels = manifest.column(S.LABEL).to_pylist()
    by_artifact: dict[str, dict[str, int]] = {}
    for art, i, label in zip(artifacts, ids, labels):
        by_artifact.setdefault(art, {})[i] = int(label)
    for art, want in sorted(by_artifact.items()):
        artifact = Artifact.open(Path(root) / art)
        got, found = index_files(artifact.files("images"), ids=want)
        if len(found) != len(want):
            missing = sorted(set(want) - found)
            raise ValueError(f"{len(missing)} manifest ids are not in {artifact.path}/images "
                             f"(e.g. {missing[:3]}); re-run assemble against this artifact")
        units.extend(got)
    return units


def restrict(units: Sequence[Unit], labels: Iterable[int]) -> list[Unit]:
    """``units`` with only the rows of ``labels`` (units left empty are dropped)."""
    keep = np.array(sorted(set(labels)), dtype=np.int64)
    out = []
    for u in units:
        mask = np.isin(u.labels, keep)
        if mask.any():
            out.append(Unit(u.path, u.row_group, u.rows[mask], u.labels[mask]))
    return out


def split_index(dataset: Artifact, split: str) -> list[Unit]:
    """Units of one split (``val``, ``test``, ...) of a dataset artifact."""
    units, _ = index_files(dataset.files("images"), split=split)
    return units


def _ranges(total: int, parts: int, drop_uneven: bool) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges over ``range(total)``: equal length (dropping the remainder,
    at most ``parts - 1`` items) or as even as possible (nothing dropped)."""
    if drop_uneven:
        size = total // parts
        return [(p * size, (p + 1) * size) for p in range(parts)]
    return [(p * total // parts, (p + 1) * total // parts) for p in range(parts)]


def plan_epoch(units: Sequence[Unit], *, epoch: int, seed: int, shuffle: bool, rank: int = 0,
               world: int = 1, worker: int = 0, workers: int = 1,
               drop_uneven: bool = True) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """What one loader worker of one rank reads in one epoch: ``[(unit index, rows, labels)]``.

    Deterministic in ``(seed, epoch)``, so all ranks agree without talking. With ``drop_uneven``
    every rank gets exactly ``total // world`` images (training); otherwise ranks split all images
    (evaluation, where nothing may be lost).
    """
    order: list[int] = list(range(len(units)))
    perms: list[np.ndarray | None] = [None] * len(units)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(units)).tolist()
        perms = [rng.permutation(len(u)) for u in units]
    lengths = np.array([len(units[i]) for i in order], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    lo, hi = _ranges(int(starts[-1]), world, drop_uneven)[rank]
    # within a rank, loader workers split its slice; they never need equal counts
    wlo, whi = _ranges(hi - lo, workers, False)[worker]
    lo, hi = lo + wlo, lo + whi
    plan = []
    for pos, u in enumerate(order):
        a, b = max(lo, starts[pos]), min(hi, starts[pos + 1])
        if a >= b:
            continue
        perm = perms[u]
        sel = perm if perm is not None else np.arange(len(units[u]))
        sel = sel[a - starts[pos]:b - starts[pos]]
        plan.append((int(u), units[u].rows[sel], units[u].labels[sel]))
    return plan


def samples_per_rank(units: Sequence[Unit], world: int, rank: int = 0, drop_uneven: bool = True) -> int:
    """Images one rank sees per epoch under :func:`plan_epoch`."""
    lo, hi = _ranges(count(units), world, drop_uneven)[rank]
    return hi - lo


def decode_rgb(data: bytes):
    """Encoded bytes from a stage artifact -> RGB PIL image.

    Artifacts hold images that an earlier stage already decoded and verified (imageio.decode_image
    with its pixel cap), so this is the fast path; PIL's own decompression-bomb limit still applies.
    Stages keep the original bytes when they need no resize, so the mode is converted as
    decode_image converts it (16-bit, float, transparency).
    """
    from PIL import Image

    from raugment.core.imageio import to_rgb

    return to_rgb(Image.open(io.BytesIO(data)))


def _geometry(image_size: int, train: bool, crop_scale_min: float, eval_crop: float) -> list:
    """Random-resized-crop + flip (training) or resize + centre crop (evaluation)."""
    from torchvision.transforms import v2

    if train:
        return [v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
                v2.RandomHorizontalFlip()]
    return [v2.Resize(round(image_size / eval_crop), antialias=True), v2.CenterCrop(image_size)]


def build_transform(image_size: int, train: bool, crop_scale_min: float = 0.08,
                    eval_crop: float = 0.875) -> Callable:
    """PIL image -> normalised float tensor (CPU decode path)."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), *_geometry(image_size, train, crop_scale_min, eval_crop),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class _ParquetImagesBase:
    """The logic of :class:`ParquetImages` (a ``torch.utils.data.IterableDataset`` over
    :class:`Unit`\\ s). Set :attr:`epoch` before iterating each epoch.

    Args:
        units: what to read.
        transform: PIL image -> tensor; None yields the raw encoded bytes as a uint8 tensor.
        shuffle: permute per epoch and mix through a buffer of ``buffer_size`` encoded images.
        seed: shuffle seed (same on every rank).
        rank, world: this DDP rank and the world size.
        drop_uneven: equal counts per rank (training) or all images (evaluation).
    """

    def __init__(self, units: Sequence[Unit], transform: Callable | None, *, shuffle: bool,
                 seed: int = 0, rank: int = 0, world: int = 1, drop_uneven: bool = True,
                 buffer_size: int = 4096):
        self.units = list(units)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world = world
        self.drop_uneven = drop_uneven
        self.buffer_size = max(1, buffer_size)
        self.epoch = 0

    def __len__(self) -> int:
        return samples_per_rank(self.units, self.world, self.rank, self.drop_uneven)

    def _item(self, data: bytes, label: int):
        import torch

        if self.transform is None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label
        return self.transform(decode_rgb(data)), label

    def _encoded(self, plan) -> Iterator[tuple[bytes, int]]:
        files: dict[str, pq.ParquetFile] = {}
        for u, rows, labels in plan:
            unit = self.units[u]
            pf = files.get(unit.path) or files.setdefault(unit.path, pq.ParquetFile(unit.path))
            col = pf.read_row_group(unit.row_group, columns=[S.IMAGE]).column(S.IMAGE)
            images = col.take(pa.array(rows)).to_pylist()
            yield from zip(images, labels.tolist())

    def __iter__(self) -> Iterator[Any]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = plan_epoch(self.units, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle,
                          rank=self.rank, world=self.world, worker=worker, workers=workers,
                          drop_uneven=self.drop_uneven)
        if not self.shuffle:
            for data, label in self._encoded(plan):
                yield self._item(data, label)
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        buffer: list[tuple[bytes, int]] = []
        for item in self._encoded(plan):
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], item = item, buffer[j]
            yield self._item(*item)
        for j in rng.permutation(len(buffer)):
            yield self._item(*buffer[j])


@functools.cache
def _parquet_images_class() -> type:
    import torch.utils.data

    # Defined on first use so that importing this module does not import torch; registered as a
    # module attribute so DataLoader workers can pickle instances under any start method.
    cls = type("ParquetImages", (_ParquetImagesBase, torch.utils.data.IterableDataset),
               {"__module__": __name__, "__doc__": _ParquetImagesBase.__doc__})
    globals()["ParquetImages"] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name == "ParquetImages":
        return _parquet_images_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_dataset(units: Sequence[Unit], transform: Callable | None, **kwargs: Any):
    """A ``ParquetImages`` dataset (see :class:`_ParquetImagesBase` for the arguments)."""
    return _parquet_images_class()(units, transform, **kwargs)


def collate_bytes(batch: list) -> tuple[list, torch.Tensor]:
    """Collate for raw-bytes items: a list of uint8 tensors and a label tensor."""
    import torch

    return [b for b, _ in batch], torch.tensor([label for _, label in batch], dtype=torch.int64)


def make_loader(dataset: _ParquetImagesBase, batch_size: int, num_workers: int, *, pin_memory: bool = False):
    """A DataLoader over ``dataset`` (raw bytes get :func:`collate_bytes`)."""
    import torch.utils.data

    kwargs: dict[str, Any] = {}
    if dataset.transform is None:
        kwargs["collate_fn"] = collate_bytes
    if num_workers > 0:
        kwargs["prefetch_factor"] = 4
    # a ParquetImages instance: _parquet_images_class() mixes IterableDataset in at run time
    torch_dataset = cast("torch.utils.data.Dataset", dataset)
    return torch.utils.data.DataLoader(torch_dataset, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=pin_memory, **kwargs)


def gpu_decode_batch(encoded: list, device: torch.device, image_size: int, train: bool,
                     crop_scale_min: float = 0.08, eval_crop: float = 0.875) -> torch.Tensor:
    """Decode a list of encoded images on the GPU (nvJPEG) and augment there; a normalised batch.

    Non-JPEG items (PNG/WEBP shards) are decoded on the CPU instead, so mixed artifacts still work.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms import v2

    is_jpeg = [len(b) > 2 and int(b[0]) == 0xFF and int(b[1]) == 0xD8 for b in encoded]
    jpegs = [b for b, j in zip(encoded, is_jpeg) if j]
    decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    images = [next(decoded) if j else decode_image(b, mode=ImageReadMode.RGB).to(device)
              for b, j in zip(encoded, is_jpeg)]
    geometry = v2.Compose(_geometry(image_size, train, crop_scale_min, eval_crop))
    batch = torch.stack([geometry(img) for img in images]).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (batch - mean) / std
