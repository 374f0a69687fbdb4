"""Pure training policy of the fine-tuning stage: no torch, no Ray, easy to test.

* Square-root learning-rate scaling (paper 3.1): the gradient variance stays constant when the
  global batch grows, so the LR grows with the square root of the batch ratio.
* Early stopping on the validation loss with a patience, bounded by ``max_epochs``.
* Checkpoint policy: which epochs keep a snapshot (best train loss, best validation loss and the
  epochs in ``keep_epochs``; Imagic keeps its first 8 epochs).
* The held-out validation split, stratified by class and reproducible from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from raugment.lib.finetuned.artifact import BEST_TRAIN, BEST_VAL, epoch_tag


def scaled_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """``base_lr * sqrt(global_batch / base_batch)``.

    Args:
        base_lr: learning rate tuned at ``base_batch``.
        global_batch: per-worker batch size times the number of workers.
        base_batch: the batch size at which ``base_lr`` was tuned.
    """
    if global_batch <= 0 or base_batch <= 0:
        raise ValueError(f"batch sizes must be > 0, got global={global_batch}, base={base_batch}")
    return base_lr * math.sqrt(global_batch / base_batch)


@dataclass
class EpochRecord:
    """Losses of one finished epoch (1-based)."""

    epoch: int
    train_loss: float
    val_loss: float


@dataclass
class EarlyStopper:
    """Stop when the validation loss has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True when training should stop."""
        if val_loss < self.best - self.min_delta:
            self.best = val_loss
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load(self, state: dict) -> None:
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])


def checkpoint_tags(history: Sequence[EpochRecord], keep_epochs: Iterable[int]) -> dict[int, list[str]]:
    """Which epochs keep a snapshot, and under which names.

    Args:
        history: the finished epochs so far, in order.
        keep_epochs: epochs kept whatever their loss (1, 2, 3; 1..8 for Imagic).

    Returns:
        epoch -> tags, e.g. ``{1: ["epoch_001"], 3: ["best_train", "best_val", "epoch_003"]}``.
        Ties keep the earlier epoch.
    """
    tags: dict[int, list[str]] = {}
    if not history:
        return tags
    best_train = min(history, key=lambda r: (r.train_loss, r.epoch)).epoch
    best_val = min(history, key=lambda r: (r.val_loss, r.epoch)).epoch
    keep = set(keep_epochs)
    for rec in history:
        names = []
        if rec.epoch == best_train:
            names.append(BEST_TRAIN)
        if rec.epoch == best_val:
            names.append(BEST_VAL)
        if rec.epoch in keep:
            names.append(epoch_tag(rec.epoch))
        if names:
            tags[rec.epoch] = names
    return tags


@dataclass
class Split:
    """Positions of the training and held-out validation items."""

    train: list[int] = field(default_factory=list)
    val: list[int] = field(default_factory=list)


def split_train_val(groups: Sequence[int], val_fraction: float, seed: int) -> Split:
    """Hold out ``val_fraction`` of each group (class, or class x cluster), reproducibly.

    A group with at least two items gives at least one to validation (so every class is seen by
    the validation loss) and keeps at least one for training; a single-item group trains only.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    groups_arr = np.asarray(groups)
    split = Split()
    for g in np.unique(groups_arr):
        idx = np.flatnonzero(groups_arr == g)
        rng.shuffle(idx)
        n_val = 0
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        split.val.extend(int(i) for i in idx[:n_val])
        split.train.extend(int(i) for i in idx[n_val:])
    split.train.sort()
    split.val.sort()
    return split


def epoch_order(n_items: int, world_size: int, batch_size: int, epoch: int, seed: int) -> np.ndarray:
    """A shuffled order of item positions for one epoch, padded so that every DDP rank takes the
    same number of full batches (ranks that ran out of data would deadlock the all-reduce).

    Returns:
        ``[steps, world_size, batch_size]`` positions into the training items.
    """
    if n_items <= 0:
        raise ValueError("no training items")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_items)
    per_step = world_size * batch_size
    steps = math.ceil(n_items / per_step)
    padded = np.resize(order, steps * per_step)  # wraps around: a few items twice per epoch
    return padded.reshape(steps, world_size, batch_size)
