"""The fine-tuning artifact on disk, and loading it back (for the generator and for selection).

Layout of a ``finetune`` stage directory (beside ``config.yaml``, ``stats.json``, ``_SUCCESS``)::

    conditionings.parquet     one row per learned row: cond_row, label, class_name, cluster,
                              n_images, token (the table of the learned tensors)
    items.parquet             the training images used: id, label, cluster, cond_row, split
                              (train / val = the held-out part for the validation loss)
    checkpoints.parquet       checkpoint name -> epoch, losses, snapshot directory
    checkpoints/epoch_003/    one snapshot per kept epoch:
        learned.safetensors   "conditioning" [n_rows, 77, d] or "embeddings" [n_rows, d]
        unet/                 the fine-tuned UNet in diffusers layout (imagic, pseudoword_dm)
        meta.json             method, epoch, losses, tags
    selected.json             the checkpoint the generator uses (best_val unless set otherwise)
    latents/                  cached VAE latent distributions of the training images
    events.jsonl              training events (starts, resumes, epochs)

A ``select`` stage directory points at one checkpoint of such an artifact: its ``selected.json``
also holds ``finetune`` (the fine-tuning directory, relative to the pointer) and ``epoch``, and
:func:`resolve` follows it, so the generator takes either directory as its input.

Everything learned is safetensors; nothing is unpickled when loading.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raugment.core import schema
from raugment.core.storage import CONFIG, atomic_dir, write_text_atomic

LEARNED = "learned.safetensors"
META = "meta.json"
UNET = "unet"
CHECKPOINTS_DIR = "checkpoints"
TAGS = "checkpoints.json"
SELECTED = "selected.json"
CONDITIONINGS = "conditionings"
ITEMS = "items"
CHECKPOINTS = "checkpoints"
# checkpoint names: best train / validation loss, and the epochs kept whatever their loss
BEST_TRAIN = "best_train"
BEST_VAL = "best_val"


def epoch_tag(epoch: int) -> str:
    """Name of the checkpoint kept for a listed epoch, e.g. ``epoch_002``."""
    return f"epoch_{epoch:03d}"


def write_snapshot(out: Path, epoch: int, tensors: dict[str, Any], meta: dict[str, Any],
                   unet: Any = None) -> Path:
    """Write ``checkpoints/epoch_XXX/`` atomically (a temporary directory renamed into place).

    Args:
        out: the stage directory.
        epoch: 1-based epoch.
        tensors: the learned table under its key (``conditioning`` / ``embeddings``).
        meta: JSON-able facts (method, losses, tags).
        unet: a trained ``UNet2DConditionModel`` to save in diffusers layout, or None.
    """
    from safetensors.torch import save_file

    final = out / CHECKPOINTS_DIR / epoch_tag(epoch)
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / LEARNED),
                  metadata={"epoch": str(epoch), "method": str(meta.get("method", ""))})
        if unet is not None:
            unet.save_pretrained(tmp / UNET, safe_serialization=True)
        (tmp / META).write_text(json.dumps({"epoch": epoch, **meta}, indent=2, sort_keys=True))
    return final


def write_tags(out: Path, tags: dict[int, list[str]]) -> None:
    """Record which epoch each checkpoint name points to, and drop snapshots no name uses."""
    by_name = {name: epoch for epoch, names in tags.items() for name in names}
    write_text_atomic(json.dumps(by_name, indent=2, sort_keys=True), out / TAGS)
    keep = {epoch_tag(e) for e in tags}
    base = out / CHECKPOINTS_DIR
    for d in base.iterdir() if base.is_dir() else []:
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def read_tags(out: Path) -> dict[str, int]:
    """Checkpoint name -> epoch."""
    p = Path(out) / TAGS
    return {k: int(v) for k, v in json.loads(p.read_text()).items()} if p.exists() else {}


@dataclass(frozen=True)
class CheckpointRef:
    """One stored checkpoint of a fine-tuning artifact.

    Attributes:
        name: ``best_train``, ``best_val`` or ``epoch_001`` ...
        epoch: the epoch its weights come from.
        path: its snapshot directory (shared by names that point to the same epoch).
        train_loss / val_loss: the losses of that epoch.
    """

    name: str
    epoch: int
    path: Path
    train_loss: float
    val_loss: float


def list_checkpoints(out: str | Path) -> list[CheckpointRef]:
    """The named checkpoints of an artifact, ordered by epoch then name."""
    out = Path(out)
    refs = []
    for name, epoch in read_tags(out).items():
        snap = out / CHECKPOINTS_DIR / epoch_tag(epoch)
        meta = json.loads((snap / META).read_text())
        refs.append(CheckpointRef(name, epoch, snap, float(meta["train_loss"]), float(meta["val_loss"])))
    return sorted(refs, key=lambda r: (r.epoch, r.name))


def checkpoints_table(refs: list[CheckpointRef], root: Path) -> pa.Table:
    """The ``checkpoints.parquet`` table of an artifact."""
    rows = [{schema.CHECKPOINT: r.name, schema.EPOCH: r.epoch, schema.TRAIN_LOSS: r.train_loss,
             schema.VAL_LOSS: r.val_loss, schema.SNAPSHOT: str(r.path.relative_to(root))} for r in refs]
    return schema.to_table(rows, schema.CHECKPOINTS)


def write_selected(out: Path, name: str, scores: dict[str, float] | None = None) -> None:
    """Record the checkpoint the generator should use (and the scores that chose it)."""
    write_text_atomic(json.dumps({"checkpoint": name, "scores": scores or {}}, indent=2, sort_keys=True),
                      Path(out) / SELECTED)


def write_pointer(out: Path, finetune: Path, checkpoint: str, epoch: int, **extra: Any) -> None:
    """Make ``out`` point at ``checkpoint`` (snapshot of ``epoch``) of the artifact ``finetune``.

    ``extra`` (scores, candidates, ...) is recorded beside it for the report.
    """
    data = {**extra, "checkpoint": checkpoint, "epoch": int(epoch),
            "finetune": os.path.relpath(Path(finetune).resolve(), Path(out).resolve())}
    write_text_atomic(json.dumps(data, indent=2, sort_keys=True), Path(out) / SELECTED)


def read_pointer(path: str | Path) -> dict[str, Any] | None:
    """The ``selected.json`` of a pointer directory with ``finetune`` made absolute; None if
    ``path`` is not a pointer (a fine-tuning artifact's own ``selected.json`` has no target)."""
    p = Path(path) / SELECTED
    data = json.loads(p.read_text()) if p.is_file() else {}
    if "finetune" not in data:
        return None
    data["finetune"] = (Path(path) / data["finetune"]).resolve()
    return data


@dataclass
class FinetunedModel:
    """A loaded checkpoint: what the generator needs to sample from it.

    Attributes:
        method: the fine-tuning method's name.
        rows: the ``conditionings`` table as Python rows (cond_row, label, cluster, n_images, ...).
        table: the learned tensor (``[n, 77, d]`` conditionings or ``[n, d]`` embeddings).
        table_key: its safetensors key, which names its family
            (:func:`raugment.lib.finetuned.families.family_of`).
        unet_dir: the fine-tuned UNet directory, or None when the UNet was frozen.
        artifact: the stage directory; checkpoint: the name that was loaded.
    """

    method: str
    rows: list[dict[str, Any]]
    table: Any
    table_key: str
    unet_dir: Path | None
    artifact: Path
    checkpoint: str


def resolve(path: str | Path, checkpoint: str | None = None) -> tuple[Path, Path, str]:
    """(artifact dir, snapshot dir, checkpoint name) for an artifact or a snapshot directory.

    ``path`` may be the stage directory (then ``checkpoint``, else ``selected.json``, else
    ``best_val`` decides), one ``checkpoints/epoch_XXX`` directory, or a pointer directory
    (:func:`write_pointer`; ``checkpoint`` must then be None).
    """
    p = Path(path)
    if (p / LEARNED).exists() and p.parent.name == CHECKPOINTS_DIR:
        return p.parent.parent, p, p.name
    pointer = read_pointer(p) if checkpoint is None else None
    if pointer is not None:
        target = pointer["finetune"]
        snapshot = target / CHECKPOINTS_DIR / epoch_tag(pointer["epoch"])
        if not (snapshot / LEARNED).exists():
            raise ValueError(f"{p} points at {snapshot}, which holds no {LEARNED}; re-run the "
                             "fine-tuning stage or point generate.conditioning at it")
        return target, snapshot, str(pointer["checkpoint"])
    if not (p / f"{CONDITIONINGS}.parquet").exists():
        raise ValueError(f"{p} is not a finetune artifact (no {CONDITIONINGS}.parquet); "
                         "point generate.conditioning at a finetune stage directory")
    if checkpoint is None:
        sel = p / SELECTED
        checkpoint = json.loads(sel.read_text())["checkpoint"] if sel.exists() else BEST_VAL
    tags = read_tags(p)
    if checkpoint not in tags:
        raise ValueError(f"{p} has no checkpoint {checkpoint!r}; it has {sorted(tags)}")
    return p, p / CHECKPOINTS_DIR / epoch_tag(tags[checkpoint]), checkpoint


def artifact_config(artifact: str | Path) -> dict[str, Any]:
    """The ``config.yaml`` a stage wrote (its section under ``config``); empty if absent."""
    import yaml

    p = Path(artifact) / CONFIG
    return (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}


def load_finetuned(path: str | Path, checkpoint: str | None = None) -> FinetunedModel:
    """Load a checkpoint of a fine-tuning artifact (see :func:`resolve` for ``path``)."""
    from safetensors.torch import load_file

    artifact, snap, name = resolve(path, checkpoint)
    meta = json.loads((snap / META).read_text())
    tensors = load_file(str(snap / LEARNED))
    ((key, table),) = tensors.items()
    rows = pq.read_table(artifact / f"{CONDITIONINGS}.parquet").to_pylist()
    unet_dir = snap / UNET if (snap / UNET).is_dir() else None
    return FinetunedModel(meta["method"], rows, table, key, unet_dir, artifact, name)
