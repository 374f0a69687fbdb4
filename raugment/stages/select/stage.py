"""Stage ``select``: the fine-tuning checkpoint a fine-tuned method generates from (paper 3.1).

The paper keeps several checkpoints per fine-tuning run (best train loss, best validation loss,
epochs 1-3; Imagic's first 8 epochs) and picks the one whose generated images train the
classifier with the best validation accuracy. The study plans that as ordinary stage runs (see
:mod:`raugment.study.planner`): per candidate a ``select`` *pointer* run, a small ``generate`` run from
it, ``assemble`` and ``train``; then one ``select`` *choice* run reads the classifiers' validation
top-1 and points at the winner; the method's main ``generate`` run takes that as its input.

Both kinds of run write only ``selected.json`` (:func:`raugment.lib.finetuned.artifact.write_pointer`),
which the generator follows to the snapshot:

* pointer (``select.checkpoint`` set): the named checkpoint. Its key is the snapshot's *epoch*,
  not the name, so names that share a snapshot (``best_val`` and ``epoch_002``) meet in one
  artifact, and the generation and classifier behind it run once. A name the fine-tuning run did
  not keep (it stopped before that epoch) points at ``best_val`` instead, with a warning.
* choice (``scores`` = candidate name -> train artifact): the candidate with the highest
  validation top-1 (ties: the earlier epoch, :func:`raugment.stages.select.stage.select_checkpoint`), with
  every candidate's epoch, score and classifier recorded for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.lib.finetuned.artifact import (
    BEST_VAL,
    CheckpointRef,
    list_checkpoints,
    read_tags,
    write_pointer,
    write_selected,
)

log = logging.getLogger(__name__)

STAGE = "select"
RULE = "highest validation top-1 of the scoring classifier; ties: the earlier epoch"


def _pointer(cfg: Config, finetune: Artifact) -> Artifact:
    tags = read_tags(finetune.path)
    name = cfg.select.checkpoint
    if name not in tags:
        if BEST_VAL not in tags:
            raise ValueError(f"{finetune.path} has no checkpoint {name!r} and no {BEST_VAL!r}; it has "
                             f"{sorted(tags)}")
        log.warning("select: %s kept no checkpoint %r (it has %s); using %s", finetune.path, name,
                    sorted(tags), BEST_VAL)
        name = BEST_VAL
    epoch = tags[name]

    def body(run: StageRun) -> None:
        write_pointer(run.path, finetune.path, name, epoch)
        run.stats.add("epoch", epoch)

    # keyed by the snapshot, not the name: names sharing an epoch share everything downstream
    return run_stage(cfg.run.root, STAGE, {"snapshot": epoch}, {"finetune": finetune}, body)


def _choice(cfg: Config, finetune: Artifact, scores: Mapping[str, Artifact]) -> Artifact:
    from raugment.core.artifacts import read_results
    from raugment.stages.select.stage import select_checkpoint

    root = Path(cfg.run.root).resolve()
    refs = [r for r in list_checkpoints(finetune.path) if r.name in scores]
    not_kept = sorted(set(scores) - {r.name for r in refs})
    if not refs:
        raise ValueError(f"{finetune.path} kept none of the candidate checkpoints {sorted(scores)}")
    val = {r.name: float(read_results(scores[r.name])[S.VAL_TOP1_BEST]) for r in refs}

    def body(run: StageRun) -> None:
        best = select_checkpoint(refs, lambda ref: val[ref.name])
        candidates = [{"name": r.name, "epoch": r.epoch, "val_top1": val[r.name],
                       "train_loss": r.train_loss, "val_loss": r.val_loss, "chosen": r.name == best.name,
                       "classifier": _relative(scores[r.name].path, root)} for r in refs]
        write_pointer(run.path, finetune.path, best.name, best.epoch, scores=val, candidates=candidates,
                      not_kept=not_kept, rule=RULE)
        run.stats.add("candidates", len(refs))
        run.stats.add("snapshots_scored", len({r.epoch for r in refs}))
        run.stats.extra.update({"checkpoint": best.name, "epoch": best.epoch, "val_top1": val[best.name]})
        log.info("select: %s (epoch %d, val top-1 %.4f) of %s", best.name, best.epoch, val[best.name],
                 ", ".join(f"{n} {v:.4f}" for n, v in val.items()))

    inputs: dict[str, Any] = {"finetune": finetune, **{f"score.{k}": v for k, v in sorted(scores.items())}}
    return run_stage(cfg.run.root, STAGE, {"candidates": sorted(scores), "rule": RULE}, inputs, body)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def run(cfg: Config, finetune: Artifact, scores: Mapping[str, Artifact] | None = None) -> Artifact:
    """Point at one checkpoint of ``finetune``: ``cfg.select.checkpoint``, or the best of ``scores``.

    Args:
        cfg: the whole config; reads ``select`` and ``run.root``.
        finetune: a ``finetune`` stage artifact.
        scores: candidate checkpoint name -> the ``train`` artifact of its scoring classifier.

    Returns:
        The ``select`` artifact; pass it to the generate stage as its ``finetune`` input.

    Raises:
        ConfigError: neither a checkpoint name nor scores.
    """
    if scores:
        return _choice(cfg, finetune, scores)
    if not cfg.select.checkpoint:
        raise ConfigError("select.checkpoint: name the checkpoint to use (e.g. best_val), or give the "
                          "candidates' scoring classifiers")
    return _pointer(cfg, finetune)


def select_checkpoint(checkpoints: Sequence[CheckpointRef], score_fn: Callable[[CheckpointRef], float],
                      artifact: Artifact | None = None) -> CheckpointRef:
    """The checkpoint with the highest ``score_fn``; snapshots shared by names are scored once.

    Args:
        checkpoints: from :func:`list_checkpoints` (``best_train``, ``best_val``, ``epoch_001``...).
        score_fn: checkpoint -> downstream validation accuracy (higher is better); the study's
            ``select`` stage reads it from each candidate's scoring classifier. Ties keep the
            earlier epoch.
        artifact: when given, the choice and all scores are written to its ``selected.json``, and
            the generator then uses this checkpoint by default.
    """
    if not checkpoints:
        raise ValueError("no checkpoints to select from")
    by_epoch: dict[int, float] = {}
    scores: dict[str, float] = {}
    for ref in checkpoints:
        if ref.epoch not in by_epoch:
            by_epoch[ref.epoch] = float(score_fn(ref))
            log.info("checkpoint %s (epoch %d): score %.4f", ref.name, ref.epoch, by_epoch[ref.epoch])
        scores[ref.name] = by_epoch[ref.epoch]
    best = max(checkpoints, key=lambda r: (scores[r.name], -r.epoch))
    if artifact is not None:
        write_selected(artifact.path, best.name, scores)
    return best
