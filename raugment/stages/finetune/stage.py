"""Stage ``finetune``: fine-tune Stable Diffusion to the training images (paper 3.1, methods 5-9).

``run(cfg, dataset) -> Artifact`` trains every class in **one** DDP run (gloo on CPU, NCCL on
GPU) on a table of learned rows indexed by class (and k-means cluster). ``finetune.runner`` says
where that run goes: ``worker_group`` (default) leases a long-lived
:class:`~raugment.runtime.worker_group.WorkerGroup` (no Ray Train start-up; inside a study the group is
kept like the classifiers' ones, see :func:`~raugment.runtime.worker_group.keep_groups`) and checkpoints
into ``<stage dir>/checkpoint/latest``; ``ray_train`` starts a Ray Train ``TorchTrainer``. Both
run the same loop (:class:`raugment.stages.finetune.loop.WorkerLoop`) and give the same result for a
seed.

* ``ft_conditioning`` ⑤ / ``ft_cluster_conditioning`` ⑥ / ``imagic`` ⑦ learn ``[rows, 77, d]``
  conditionings initialised from the text encoding of the no-whitespace simple prompt;
* ``textual_inversion`` ⑧ / ``pseudoword_dm`` ⑨ learn one pseudo-word embedding per class;
* ``imagic`` and ``pseudoword_dm`` also fine-tune the UNet.

The generator reads the artifact by config (``generate.method=<same name>``,
``generate.conditioning=<this artifact or one of its checkpoint directories>``); see
:mod:`raugment.stages.generate.finetuned`. :func:`select_checkpoint` picks the
checkpoint whose generated images train the best classifier; in a study the scores come from
ordinary generate -> assemble -> train runs per candidate, and the ``select`` stage
(:mod:`raugment.stages.select.stage`) records the choice for the generator.

The methods are plug-ins, one module each in ``raugment/stages/finetune/methods/``; the other
parts are :mod:`~raugment.stages.finetune.policy` (LR scaling, early stop, checkpoint policy,
splits), :mod:`~raugment.stages.finetune.loop` (the worker loop),
:mod:`~raugment.stages.finetune.kmeans` (clustering features) and :mod:`raugment.lib.finetuned`
(the families and the artifact on disk).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raugment.config import Config
from raugment.core import schema
from raugment.core.config import DIFFUSERS_HINT, check_local_model
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.lib.finetuned.artifact import (
    BEST_VAL,
    CHECKPOINTS,
    CONDITIONINGS,
    ITEMS,
    CheckpointRef,
    checkpoints_table,
    list_checkpoints,
    write_selected,
)
from raugment.lib.finetuned.families import CondRow, pseudo_token
from raugment.stages.finetune.methods import FinetuneMethod, get_method
from raugment.stages.finetune.policy import split_train_val

log = logging.getLogger(__name__)

STAGE = "finetune"
TRAIN_DIR = "ray_train"  # runner ray_train: Ray Train's storage path in the stage directory
CHECKPOINT_DIR = "checkpoint"  # runner worker_group: the resumable state in ``checkpoint/latest``

__all__ = [
    "CheckpointRef",
    "build_trainer",
    "list_checkpoints",
    "loop_config",
    "plan_rows",
    "result_section",
    "run",
]


# --------------------------------------------------------------------------------------------
# Planning: which image trains which row (pure)
# --------------------------------------------------------------------------------------------


def plan_rows(labels: Sequence[int], class_names: dict[int, str], clusters: Sequence[int] | np.ndarray,
              pseudowords: bool) -> tuple[list[CondRow], np.ndarray]:
    """The learned table's rows (one per class x cluster present) and each image's row.

    Args:
        labels: class of each training image.
        class_names: label -> class name.
        clusters: cluster of each image within its class (all 0 without clustering).
        pseudowords: name each row's pseudo-word (textual inversion methods).

    Returns:
        (rows ordered by label then cluster, ``[n]`` row index of each image).
    """
    keys = sorted(set(zip((int(x) for x in labels), (int(c) for c in clusters))))
    index = {k: i for i, k in enumerate(keys)}
    per_image = np.array([index[(int(lab), int(c))] for lab, c in zip(labels, clusters)], dtype=np.int64)
    sizes = np.bincount(per_image, minlength=len(keys))
    rows = [CondRow(row=i, label=lab, class_name=class_names[lab], cluster=c, n_images=int(sizes[i]),
                    token=pseudo_token(lab) if pseudowords else "") for i, (lab, c) in enumerate(keys)]
    return rows, per_image


def _check(cfg: Config) -> FinetuneMethod:
    """Config checks that need the registry or the file system, before any work."""
    fcfg = cfg.finetune
    method = get_method(fcfg.method, key="finetune.method")
    check_local_model(fcfg.model, "finetune.model", "model_index.json", DIFFUSERS_HINT)
    return method


def preflight(cfg: Config) -> None:
    """Checks before a study starts Ray: a known method and a diffusers model that is there."""
    _check(cfg)


def _write_plan(run: StageRun, cfg: Config, method: FinetuneMethod, dataset: Artifact) -> None:
    """``conditionings.parquet`` (learned rows) and ``items.parquet`` (image -> row, train/val)."""
    from raugment.core.artifacts import read_classes, read_split

    train = read_split(dataset, "train", columns=[schema.ID, schema.LABEL])
    if train.num_rows == 0:
        raise ValueError(f"dataset {dataset.path} has no training images to fine-tune on")
    classes = read_classes(dataset)
    names = dict(zip(classes.column(schema.LABEL).to_pylist(), classes.column(schema.CLASS_NAME).to_pylist()))
    ids, labels = train.column(schema.ID).to_pylist(), train.column(schema.LABEL).to_pylist()
    clusters = method.cluster_images(cfg, dataset, ids, labels)
    rows, per_image = plan_rows(labels, names, clusters, method.pseudowords)
    # stratify the held-out part by class (clusters of one image would otherwise lose it)
    split = split_train_val(labels, cfg.finetune.val_fraction, cfg.finetune.seed)
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[split.val] = True
    run.write_single(schema.to_table([{schema.COND_ROW: r.row, schema.LABEL: r.label, schema.CLASS_NAME: r.class_name,
                                       schema.CLUSTER: r.cluster, schema.N_IMAGES: r.n_images, schema.TOKEN: r.token}
                                      for r in rows], schema.CONDITIONINGS), CONDITIONINGS)
    # items last: its presence tells a resumed run that the plan is complete
    run.write_single(schema.to_table([{schema.ID: i, schema.LABEL: lab, schema.CLUSTER: int(c),
                                       schema.COND_ROW: int(r), schema.SPLIT: "val" if v else "train"}
                                      for i, lab, c, r, v in zip(ids, labels, clusters, per_image, is_val)],
                                     schema.FINETUNE_ITEMS), ITEMS)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def result_section(cfg: Config) -> dict[str, Any]:
    """The ``finetune`` settings that make the stage key.

    ``runner`` is left out: both runners run the same :class:`~raugment.stages.finetune.loop.WorkerLoop`
    with the same seeding (``torch.manual_seed(finetune.seed)`` at the start of every rank, the
    global RNGs re-seeded and generators drawn per epoch and rank, the same thread count for the
    same ``cpus_per_worker``, DDP wrapping only the learned parts in both), and their contexts
    differ only in where a checkpoint goes, so a seed gives the same tables and snapshots
    (``tests/test_finetune.py`` checks it). Every other field stays, so keys of configs without
    ``runner`` are unchanged.
    """
    from raugment.core.config import to_dict

    data = to_dict(cfg.finetune)
    data.pop("runner")
    return data


def loop_config(cfg: Config, run: StageRun, dataset: Artifact, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """What every rank's :class:`~raugment.stages.finetune.loop.WorkerLoop` reads (absolute paths)."""
    from raugment.core.config import to_dict

    section = to_dict(cfg.finetune)
    if Path(cfg.finetune.model).exists():  # workers run in another directory: pass local paths whole
        section["model"] = str(Path(cfg.finetune.model).resolve())
    return {"finetune": section, "out": str(run.path.resolve()),
            "images": [str(f.resolve()) for f in dataset.files("images")], **(extra or {})}


def build_trainer(cfg: Config, run: StageRun, dataset: Artifact, extra: dict[str, Any] | None = None):
    """The ``TorchTrainer`` of one fine-tuning run (runner ``ray_train``).

    Its name and storage path are fixed by the stage key, so re-running a killed stage resumes
    the same Ray Train run from its last checkpoint (Train V2 resumes by name + storage path),
    and a failed worker group restarts from it up to ``workers.max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raugment.runtime.cluster import scaling_config
    from raugment.stages.finetune.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, run, dataset, extra),
        scaling_config=scaling_config(cfg.finetune.workers),
        run_config=RunConfig(name=f"finetune-{run.key}", storage_path=str((run.path / TRAIN_DIR).resolve()),
                             failure_config=FailureConfig(max_failures=cfg.finetune.workers.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))


def _fit_ray_train(cfg: Config, run: StageRun, dataset: Artifact, extra: dict[str, Any] | None) -> dict:
    """Runner ``ray_train``: the progress of the trainer's last checkpoint."""
    from raugment.stages.finetune.loop import PROGRESS

    result = build_trainer(cfg, run, dataset, extra).fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning wrote no checkpoint under {run.path / TRAIN_DIR}")
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / PROGRESS).read_text())


def _fit_group(cfg: Config, run: StageRun, dataset: Artifact, extra: dict[str, Any] | None) -> dict:
    """Runner ``worker_group``: the loop on a leased group, resuming from (and checkpointing to)
    ``<stage dir>/checkpoint/latest``; a failed run is retried on a new group up to
    ``finetune.workers.max_failures`` times. The progress of the last checkpoint."""
    from raugment.runtime.worker_group import run_with_retries
    from raugment.stages.finetune.loop import PROGRESS, finetune_member

    checkpoint = (run.path / CHECKPOINT_DIR).resolve()
    run_with_retries(cfg.finetune.workers, finetune_member, loop_config(cfg, run, dataset, extra),
                     str(checkpoint), what=f"fine-tuning {run.key}")
    latest = checkpoint / "latest" / PROGRESS
    if not latest.exists():
        raise RuntimeError(f"fine-tuning wrote no checkpoint under {checkpoint}")
    return json.loads(latest.read_text())


def _finish(run: StageRun, cfg: Config, progress: dict, train_s: float) -> None:
    """Tables and stats once training is done; the history comes from the last checkpoint."""
    refs = list_checkpoints(run.path)
    if not refs:
        raise RuntimeError(f"fine-tuning wrote no snapshot under {run.path}")
    run.write_single(checkpoints_table(refs, run.path), CHECKPOINTS)
    write_selected(run.path, BEST_VAL)
    items = Artifact(STAGE, run.key, run.path).read(ITEMS, columns=[schema.LABEL, schema.SPLIT])
    splits = items.column(schema.SPLIT).to_pylist()
    run.stats.add("train_images", splits.count("train"))
    run.stats.add("val_images", splits.count("val"))
    run.stats.add("classes", len(set(items.column(schema.LABEL).to_pylist())))
    run.stats.add("rows", Artifact(STAGE, run.key, run.path).read(CONDITIONINGS).num_rows)
    events = [json.loads(line) for line in (run.path / "events.jsonl").read_text().splitlines()]
    epochs = {e["epoch"]: e for e in events if e["event"] == "epoch"}  # a repeated epoch counts once
    run.stats.add("epochs", progress["epoch"])
    run.stats.add("steps", sum(e["steps"] for e in epochs.values()))
    run.stats.add("restarts", sum(e["event"] == "start" for e in events) - 1)
    last = epochs[progress["epoch"]]
    run.stats.extra.update({
        "method": cfg.finetune.method, "lr": last["lr"], "unet_lr": last["unet_lr"],
        "step_s_mean": float(np.mean([e["step_s"] for e in epochs.values()])),
        "early_stopped": progress["stopped"], "history": progress["history"],
        "checkpoints": {r.name: r.epoch for r in refs}, "latents_cached": cfg.finetune.cache_latents,
        "runner": cfg.finetune.runner, "train_s": train_s,
    })
    workers = cfg.finetune.workers
    if workers.use_gpu and cfg.finetune.runner == "ray_train":  # worker-group ranks charge their own
        run.stats.charge("workers", 0.0, train_s * workers.num_workers * workers.gpus_per_worker,
                         calls=workers.num_workers)
    if not cfg.finetune.keep_train_state:  # the full optimizer state is only needed to resume
        for name in (TRAIN_DIR, CHECKPOINT_DIR):
            shutil.rmtree(run.path / name, ignore_errors=True)


def run(cfg: Config, dataset: Artifact, *, fail_after_epoch: int | None = None) -> Artifact:
    """Fine-tune ``cfg.finetune.method`` on the training split of ``dataset``.

    Args:
        cfg: the whole config; this stage reads ``finetune`` (and ``cluster`` to reach Ray).
        dataset: a ``dataset`` stage artifact.
        fail_after_epoch: fault injection for tests and drills: a worker raises once, right after
            reporting this epoch, and the run must resume from its checkpoint (both runners
            retry up to ``finetune.workers.max_failures`` times).

    Returns:
        The ``finetune`` artifact (layout in :mod:`raugment.lib.finetuned.artifact`).

    Raises:
        ConfigError: unknown method or a local model directory that is not a diffusers bundle.
    """
    method = _check(cfg)

    def body(run: StageRun) -> None:
        from raugment.runtime.cluster import init_ray

        if not (run.path / f"{ITEMS}.parquet").exists():  # a resumed run keeps its plan
            _write_plan(run, cfg, method, dataset)
        init_ray(cfg.cluster, progress=cfg.run.progress)
        fault = ({"fail_after_epoch": fail_after_epoch, "fail_marker": str(run.path.resolve() / ".failed-once")}
                 if fail_after_epoch else None)
        t0 = time.perf_counter()
        fit = _fit_ray_train if cfg.finetune.runner == "ray_train" else _fit_group
        progress = fit(cfg, run, dataset, fault)
        _finish(run, cfg, progress, time.perf_counter() - t0)

    # resumable with either runner: the plan, the latent cache, the snapshots and the training
    # state (Ray Train's storage path or checkpoint/latest) all live in the stage directory
    return run_stage(cfg.run.root, STAGE, result_section(cfg), {"dataset": dataset}, body, resumable=True)
