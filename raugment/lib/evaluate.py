"""Top-1 / top-5 accuracy, overall and per class, and per-class improvement over a baseline.

Evaluation accumulates a small integer table per class — ``[n, top1 hits, top5 hits]`` — which
sums across batches and across DDP workers (one ``all_reduce``), so distributed evaluation gives
exactly the single-process numbers. From it come the overall accuracies of ``results.json`` and
the per-class table ``results_per_class.parquet`` (schema.RESULTS_PER_CLASS); the paper's Figure
5A is :func:`per_class_improvement` of two such tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from raugment.core import schema as S

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from raugment.core.storage import Artifact

RESULTS_FILE = "results_per_class.parquet"
TOPK = 5


def score_batch(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                k: int = TOPK) -> torch.Tensor:
    """Per-class ``[n, top1 hits, topk hits]`` (int64, shape ``[num_classes, 3]``) of one batch.

    With fewer than ``k`` classes, top-k is over all classes (always a hit).
    """
    import torch

    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit1 = (top[:, 0] == labels).long()
    hitk = (top == labels[:, None]).any(dim=1).long()
    counts = torch.zeros(num_classes, 3, dtype=torch.int64, device=logits.device)
    counts[:, 0].index_add_(0, labels, torch.ones_like(labels, dtype=torch.int64))
    counts[:, 1].index_add_(0, labels, hit1)
    counts[:, 2].index_add_(0, labels, hitk)
    return counts


def evaluate(model: torch.nn.Module, batches: Iterable, num_classes: int,
             device: torch.device | str = "cpu",
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             classes: Sequence[int] | None = None) -> torch.Tensor:
    """Run ``model`` over ``(images, labels)`` batches; the summed per-class counts (on ``device``).

    Args:
        model: the classifier (put into eval mode here, left in eval mode).
        batches: iterable of ``(images [B,3,H,W], labels [B])``; images already normalised.
        num_classes: rows of the result.
        device: where the model lives.
        autocast: context factory for mixed precision (e.g. ``torch.autocast`` partial).
        classes: the labels the classifier competes over (None: all): the others' logits are
            never predicted (classes a study left out, ``assemble.shortfall=exclude``).
    """
    import torch

    model.eval()
    total = torch.zeros(num_classes, 3, dtype=torch.int64, device=device)
    absent = None
    if classes is not None:
        absent = torch.ones(num_classes, dtype=torch.bool, device=device)
        absent[torch.as_tensor(list(classes), dtype=torch.long, device=device)] = False
    with torch.inference_mode():
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            logits = logits.float()
            if absent is not None:
                logits = logits.masked_fill(absent, float("-inf"))
            total += score_batch(logits, labels, num_classes)
    return total


def overall(counts: Sequence[Sequence[int]]) -> dict[str, float | int]:
    """``{"n", "top1", "top5"}`` from per-class counts (accuracies as fractions; 0 if empty)."""
    n = sum(int(c[0]) for c in counts)
    top1 = sum(int(c[1]) for c in counts)
    top5 = sum(int(c[2]) for c in counts)
    return {"n": n, "top1": top1 / n if n else 0.0, "top5": top5 / n if n else 0.0}


def results_table(counts: Sequence[Sequence[int]], class_names: Sequence[str] | None = None) -> pa.Table:
    """Per-class counts -> schema.RESULTS_PER_CLASS (accuracy NaN-free: 0 for classes without test images)."""
    rows = []
    for label, (n, h1, h5) in enumerate((int(a), int(b), int(c)) for a, b, c in counts):
        rows.append({S.LABEL: label,
                     S.CLASS_NAME: class_names[label] if class_names else None,
                     S.N_TEST: n,
                     S.ACC_TOP1: h1 / n if n else 0.0,
                     S.ACC_TOP5: h5 / n if n else 0.0})
    return S.to_table(rows, S.RESULTS_PER_CLASS)


def read_results(run: Artifact | pa.Table) -> pa.Table:
    """The per-class results of a train artifact (or a table already read)."""
    if isinstance(run, pa.Table):
        return run
    return run.read("results_per_class")


def _mean_top1(runs: Artifact | pa.Table | Sequence[Artifact | pa.Table]) -> dict[int, tuple[str, float]]:
    """label -> (class name, mean top-1 over runs)."""
    if isinstance(runs, (list, tuple)):
        tables = [read_results(r) for r in runs]
    else:
        tables = [read_results(runs)]
    if not tables:
        raise ValueError("per_class_improvement needs at least one result table per side")
    sums: dict[int, list] = {}
    for t in tables:
        for label, name, acc in zip(t.column(S.LABEL).to_pylist(), t.column(S.CLASS_NAME).to_pylist(),
                                    t.column(S.ACC_TOP1).to_pylist()):
            entry = sums.setdefault(label, [name, 0.0, 0])
            entry[1] += acc
            entry[2] += 1
    return {label: (name, total / n) for label, (name, total, n) in sums.items()}


def per_class_improvement(results: Artifact | pa.Table | Sequence[Artifact | pa.Table],
                          baseline_results: Artifact | pa.Table | Sequence[Artifact | pa.Table]) -> pa.Table:
    """Per-class top-1 change against the unaugmented baseline (the paper's Figure 5A).

    Either side may be one run or several (repeats): top-1 is averaged over runs per class first.

    Returns:
        columns label, class_name, top1, baseline_top1, improvement (= top1 - baseline_top1,
        fractions), sorted by label.

    Raises:
        ValueError: if the two sides do not cover the same classes.
    """
    aug = _mean_top1(results)
    base = _mean_top1(baseline_results)
    if set(aug) != set(base):
        missing = sorted(set(aug) ^ set(base))[:5]
        raise ValueError(f"results and baseline cover different classes (e.g. labels {missing}); "
                         "compare runs on the same dataset")
    labels = sorted(aug)
    return pa.table({
        S.LABEL: pa.array(labels, pa.int32()),
        S.CLASS_NAME: pa.array([aug[k][0] or base[k][0] for k in labels], pa.string()),
        S.ACC_TOP1: pa.array([aug[k][1] for k in labels], pa.float64()),
        S.BASELINE_TOP1: pa.array([base[k][1] for k in labels], pa.float64()),
        S.IMPROVEMENT: pa.array([aug[k][1] - base[k][1] for k in labels], pa.float64()),
    })
