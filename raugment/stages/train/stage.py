"""Train a classifier on an assembled manifest with Ray Train DDP, and score its best checkpoint.

Layers, from pure to Ray:

* :class:`PlateauRecipe` — the paper's schedule as a pure policy object: LR / 10 when validation
  top-1 has not improved for ``lr_patience`` epochs, stop after ``stop_patience`` epochs without
  improvement or at ``max_epochs``, remember the best epoch.
* :func:`fit` — the training loop of one worker, written against a small :class:`LoopContext`
  (rank, device, all-reduce, checkpoint load/report). It checkpoints every epoch, resumes from
  the last checkpoint without redoing finished epochs, keeps the best-validation weights and, at the
  end, scores exactly those weights on the test split. Resuming is exact: every RNG is re-seeded
  from ``(seed, rank, epoch)`` as an epoch starts (:func:`~raugment.runtime.contexts.seed_epoch`)
  and the checkpoint holds the weights, optimizer, scaler and recipe state, so a run stopped
  after any epoch ends bit for bit as the uninterrupted one (CPU, same worker count). After each
  epoch the ranks average their BatchNorm buffers (:func:`~raugment.runtime.contexts.sync_buffers`),
  so what they evaluate is the one model rank 0 saves.
* Runners (``train.runner``): ``worker_group`` — :class:`GroupContext` on a long-lived
  :class:`~raugment.runtime.worker_group.WorkerGroup` (DDP actors started once per study, checkpoints in
  the stage directory, a failed run retried on a new group); ``ray_train`` — :class:`RayContext` +
  :func:`train_loop_per_worker`, the thin Ray Train V2 wrapper (``TorchTrainer``,
  ``FailureConfig``, ``CheckpointConfig``; Tune uses it). :class:`LocalContext` runs the same loop
  in one plain process (benchmarks, quick tests).
* :func:`run` — stage "train": ``results.json``, ``history.parquet``, ``results_per_class.parquet``
  and the best checkpoint as a classifier bundle in ``model/``. :func:`run_repeats` trains several
  manifests x seeds and writes mean ± standard error (stage "repeats").

Data reaches the workers through :mod:`raugment.lib.loader` (a DataLoader streaming the Parquet shards).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import pyarrow as pa

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.artifacts import MODEL_DIR, RESULTS_FILE, read_results
from raugment.core.config import ConfigError, to_dict, with_overrides
from raugment.core.storage import Artifact, StageRun, run_stage, write_text_atomic
from raugment.runtime.contexts import GroupContext, LoopContext, RayContext, seed_epoch, sync_buffers
from raugment.stages.train.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from raugment.lib.loader import Unit

log = logging.getLogger(__name__)

STAGE = "train"
# metrics of one run that repeats and sweeps summarise
RUN_METRICS = (S.VAL_TOP1_BEST, S.TEST_TOP1, S.TEST_TOP5, S.BEST_EPOCH, S.EPOCHS_RUN, S.IMAGES_PER_S)

# Checkpoint directory layout (written by rank 0 each epoch).
CKPT_MODEL = "model.safetensors"
CKPT_BEST = "best.safetensors"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "state.json"
# worker_group runner: the stage's own checkpoint directory (``<stage dir>/checkpoint/latest``)
CHECKPOINT_DIR = "checkpoint"


# ---------------------------------------------------------------------------------------------
# The recipe (pure)
# ---------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """What the recipe says after one epoch's validation accuracy."""

    is_best: bool
    lr: float          # learning rate for the next epoch
    lr_reduced: bool
    stop: bool
    reason: str | None  # "no_improvement" / "max_epochs" when stopping


@dataclass
class PlateauRecipe:
    """Plateau LR schedule + early stopping + best-epoch tracking (paper section 3).

    An epoch improves when its validation top-1 is strictly higher than the best so far. After
    ``lr_patience`` consecutive epochs without improvement (counted since the best epoch or the
    last LR cut, whichever is later) the LR is multiplied by ``lr_factor``. Training stops once
    ``stop_patience`` consecutive epochs have not improved, or after ``max_epochs`` epochs.
    """

    lr: float
    lr_patience: int = 10
    lr_factor: float = 0.1
    stop_patience: int = 20
    max_epochs: int = 270
    best: float = -math.inf
    best_epoch: int = -1
    since_best: int = 0
    since_lr_change: int = 0
    epochs_done: int = 0
    stopped: bool = False
    reason: str | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PlateauRecipe:
        return cls(lr=cfg.lr, lr_patience=cfg.lr_patience, lr_factor=cfg.lr_factor,
                   stop_patience=cfg.stop_patience, max_epochs=cfg.max_epochs)

    def step(self, val_acc: float) -> Decision:
        """Record the validation accuracy of epoch ``epochs_done``; decide the next step."""
        if self.stopped:
            raise RuntimeError("the recipe has already stopped training")
        is_best = val_acc > self.best
        if is_best:
            self.best, self.best_epoch = float(val_acc), self.epochs_done
            self.since_best = self.since_lr_change = 0
        else:
            self.since_best += 1
            self.since_lr_change += 1
        reduced = self.since_lr_change >= self.lr_patience
        if reduced:
            self.lr *= self.lr_factor
            self.since_lr_change = 0
        self.epochs_done += 1
        if self.since_best >= self.stop_patience:
            self.stopped, self.reason = True, "no_improvement"
        elif self.epochs_done >= self.max_epochs:
            self.stopped, self.reason = True, "max_epochs"
        return Decision(is_best, self.lr, reduced, self.stopped, self.reason)

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["best"] = None if math.isinf(self.best) else self.best  # JSON has no -inf
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PlateauRecipe:
        state = dict(state)
        state["best"] = -math.inf if state.get("best") is None else state["best"]
        return cls(**state)


# ---------------------------------------------------------------------------------------------
# The training loop of one worker (pure torch, Ray-agnostic)
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopSpec:
    """Everything a worker needs; picklable (it travels in ``train_loop_config``)."""

    train: TrainConfig
    num_classes: int
    class_names: list[str]
    train_units: list[Unit]
    val_units: list[Unit]
    test_units: list[Unit]
    # Called as hook(epoch, rank) when an epoch starts (progress, fault injection in tests).
    epoch_hook: Callable[[int, int], None] | None = None
    # The labels trained and scored when the manifest leaves classes out (assemble.shortfall=
    # exclude): val/test hold only these, and only these compete for the prediction. None: all.
    scored: list[int] | None = None


@dataclass
class TrainState:
    """What a checkpoint holds; enough to resume without redoing a finished epoch."""

    # the file whose presence makes a checkpoint directory complete (the contexts' state_type contract)
    MARKER: ClassVar[str] = CKPT_STATE

    model: dict
    best: dict | None
    optimizer: dict
    recipe: dict
    history: list[dict] = field(default_factory=list)
    scaler: dict | None = None
    test_counts: list[list[int]] | None = None
    cpu_s: float = 0.0

    def write(self, directory: str | Path) -> None:
        """Weights as safetensors, optimizer state as a tensors-only torch file, the rest as JSON."""
        import torch
        from safetensors.torch import save_file

        d = Path(directory)
        save_file(self.model, str(d / CKPT_MODEL))
        if self.best is not None:
            save_file(self.best, str(d / CKPT_BEST))
        torch.save(self.optimizer, d / CKPT_OPTIMIZER)
        meta = {"recipe": self.recipe, "history": self.history, "scaler": self.scaler,
                "test_counts": self.test_counts, "cpu_s": self.cpu_s}
        (d / CKPT_STATE).write_text(json.dumps(meta))

    @classmethod
    def read(cls, directory: str | Path) -> TrainState:
        """Load a checkpoint directory (safetensors + ``torch.load(weights_only=True)``: no pickle)."""
        import torch
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / CKPT_STATE).read_text())
        return cls(model=load_file(str(d / CKPT_MODEL)),
                   best=load_file(str(d / CKPT_BEST)) if (d / CKPT_BEST).exists() else None,
                   optimizer=torch.load(d / CKPT_OPTIMIZER, weights_only=True),
                   recipe=meta["recipe"], history=meta["history"], scaler=meta.get("scaler"),
                   test_counts=meta.get("test_counts"), cpu_s=meta.get("cpu_s", 0.0))


def _cpu_seconds() -> float:
    # children = DataLoader workers of finished epochs
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _autocast_factory(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    import torch

    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class _Batches:
    """Per-epoch loaders of one split for this rank (CPU decode, or raw bytes for GPU decode)."""

    def __init__(self, spec: LoopSpec, ctx: LoopContext, units: list[Unit], train: bool):
        from raugment.lib import loader

        cfg = spec.train
        self.cfg, self.ctx, self.train = cfg, ctx, train
        self.gpu_decode = cfg.gpu_decode and ctx.device.type == "cuda"
        transform = None if self.gpu_decode else loader.build_transform(
            cfg.image_size, train, cfg.crop_scale_min, cfg.eval_crop)
        self.dataset = loader.build_dataset(units, transform, shuffle=train, seed=cfg.seed,
                                            rank=ctx.rank, world=ctx.world_size, drop_uneven=train,
                                            buffer_size=cfg.shuffle_buffer)
        per_rank = max(1, cfg.batch_size // ctx.world_size)
        self.loader = loader.make_loader(self.dataset, per_rank, cfg.loader_workers,
                                         pin_memory=ctx.device.type == "cuda")

    def epoch(self, epoch: int):
        from raugment.lib.loader import gpu_decode_batch

        self.dataset.epoch = epoch
        for images, labels in self.loader:
            if self.gpu_decode:
                images = gpu_decode_batch(images, self.ctx.device, self.cfg.image_size, self.train,
                                          self.cfg.crop_scale_min, self.cfg.eval_crop)
            yield images, labels


def _evaluate(model, batches: _Batches, spec: LoopSpec, ctx: LoopContext, autocast) -> torch.Tensor:
    from raugment.lib.evaluate import evaluate

    mem = _memory_format(spec.train)
    counts = evaluate(model, ((x.to(ctx.device, memory_format=mem), y) for x, y in batches.epoch(0)),
                      spec.num_classes, ctx.device, autocast, classes=spec.scored)
    return ctx.all_reduce(counts)


def _memory_format(cfg: TrainConfig):
    import torch

    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _train_epoch(model, batches, optimizer, scaler, autocast, device, memory_format) -> torch.Tensor:
    """One pass of SGD over ``batches``; ``[loss sum, images]`` of this rank (float64)."""
    import torch

    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in batches:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a no-op scale unless amp == fp16
        scaler.step(optimizer)
        scaler.update()
        totals[0] += loss.detach().double() * len(labels)
        totals[1] += len(labels)
    return totals


def fit(spec: LoopSpec, ctx: LoopContext[TrainState]) -> dict[str, Any]:
    """Train with the plateau recipe, checkpointing each epoch; then score the best weights on test.

    Resumes from ``ctx.load_checkpoint()`` when there is one. Every rank calls ``ctx.report`` the
    same number of times (once per epoch, once at the end). Returns the final metrics.
    """
    import torch

    from raugment.lib.evaluate import overall
    from raugment.models.classifier import build_model

    # "auto" GPU options become concrete for this rank's device (bf16 + channels-last + compile on
    # a GPU, none on a CPU); the stage key holds the same resolution (see result_section).
    spec = replace(spec, train=spec.train.resolved(ctx.device.type))
    cfg = spec.train
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    # torch's stub of Module.to lacks the (device, memory_format=...) form that Module.to accepts
    net = build_model(cfg.model, spec.num_classes).to(ctx.device, memory_format=_memory_format(cfg))  # type: ignore[call-overload]
    model = ctx.prepare_model(net)
    if cfg.compile:  # the training step only; state dicts and evaluation use the plain ``net``
        # a compiled Module is an OptimizedModule (a Module); the stub types the result as a Callable
        model = cast("torch.nn.Module", torch.compile(model))
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
    autocast = _autocast_factory(cfg.amp, ctx.device)
    recipe = PlateauRecipe.from_config(cfg)
    history: list[dict] = []
    best: dict | None = None
    test_counts = None
    cpu_before = 0.0

    resumed = ctx.load_checkpoint()
    if resumed is not None:
        net.load_state_dict(resumed.model)
        optimizer.load_state_dict(resumed.optimizer)
        if resumed.scaler:
            scaler.load_state_dict(resumed.scaler)
        recipe = PlateauRecipe.from_state(resumed.recipe)
        history, best, test_counts = resumed.history, resumed.best, resumed.test_counts
        cpu_before = resumed.cpu_s
        log.info("rank %d resumes after epoch %d", ctx.rank, recipe.epochs_done - 1)
    cpu0 = _cpu_seconds()

    def state() -> TrainState | None:
        """The checkpoint to report: built on rank 0 only (all ranks join the CPU-time sum)."""
        cpu = ctx.all_reduce(torch.tensor([_cpu_seconds() - cpu0], dtype=torch.float64, device=ctx.device))
        if ctx.rank != 0:
            return None
        return TrainState(model=_cpu_state(net.state_dict()), best=best, optimizer=optimizer.state_dict(),
                          recipe=recipe.state_dict(), history=history,
                          scaler=scaler.state_dict() if scaler.is_enabled() else None,
                          test_counts=test_counts, cpu_s=cpu_before + float(cpu.item()))

    train_batches = _Batches(spec, ctx, spec.train_units, train=True)
    val_batches = _Batches(spec, ctx, spec.val_units, train=False)
    mem = _memory_format(cfg)
    while not recipe.stopped:
        epoch = recipe.epochs_done
        if spec.epoch_hook is not None:
            spec.epoch_hook(epoch, ctx.rank)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr
        lr = recipe.lr
        # augmentation (crops, flips, loader worker seeds) per (seed, rank, epoch): differs between
        # ranks, and a run resumed at this epoch draws exactly what the uninterrupted run drew
        seed_epoch(cfg.seed, ctx.rank, epoch)
        t0 = time.perf_counter()
        totals = _train_epoch(model, train_batches.epoch(epoch), optimizer, scaler, autocast, ctx.device, mem)
        train_s = time.perf_counter() - t0
        totals = ctx.all_reduce(totals)
        sync_buffers(net, ctx)  # one set of BatchNorm statistics: every rank evaluates and saves it
        val = overall(_evaluate(net, val_batches, spec, ctx, autocast).tolist())
        decision = recipe.step(val["top1"])
        if decision.is_best:
            best = _cpu_state(net.state_dict())
        n_images = int(totals[1].item())
        row = {S.EPOCH: epoch, S.LR: lr, S.TRAIN_LOSS: float(totals[0].item()) / max(1, n_images),
               S.VAL_TOP1: val["top1"], S.VAL_TOP5: val["top5"], S.TRAIN_IMAGES: n_images,
               S.EPOCH_S: time.perf_counter() - t0, S.TRAIN_S: train_s}
        history.append(row)
        metrics = {**row, "train_images_per_s": n_images / max(train_s, 1e-9),
                   S.VAL_TOP1_BEST: recipe.best, S.BEST_EPOCH: recipe.best_epoch}
        ctx.report(metrics, state())

    if test_counts is None:
        net.load_state_dict(best)  # the best-validation weights are the ones scored
        seed_epoch(cfg.seed, ctx.rank, recipe.epochs_done)
        test_batches = _Batches(spec, ctx, spec.test_units, train=False)
        test_counts = _evaluate(net, test_batches, spec, ctx, autocast).tolist()
    test = overall(test_counts)
    # val_top1 here is the scored (best) epoch's, so sweeps that read the last report see it
    final = {S.VAL_TOP1: recipe.best, S.VAL_TOP1_BEST: recipe.best, S.BEST_EPOCH: recipe.best_epoch,
             S.EPOCHS_RUN: recipe.epochs_done, S.TEST_TOP1: test["top1"], S.TEST_TOP5: test["top5"],
             "n_test": test["n"], "stop_reason": recipe.reason, "final": True}
    ctx.report(final, state())
    return final


def fit_member(member, spec: LoopSpec, checkpoint_dir: str) -> dict[str, Any]:
    """Worker-group entry point: :func:`fit` on this rank, checkpoints under ``checkpoint_dir``."""
    return fit(spec, GroupContext(member, checkpoint_dir, TrainState))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config["spec"]`` is a :class:`LoopSpec`."""
    fit(config["spec"], RayContext(TrainState))


# ---------------------------------------------------------------------------------------------
# Stage "train" (driver side)
# ---------------------------------------------------------------------------------------------


def preflight(cfg: Config) -> None:
    """Checks before a study starts Ray: the classifier architecture is registered."""
    from raugment.models.classifier import MODELS

    if cfg.train.model not in MODELS:
        raise ConfigError(f"train.model: unknown model {cfg.train.model!r}; known: {', '.join(MODELS.names())}")


def build_spec(cfg: Config, dataset: Artifact, manifest: Artifact,
               epoch_hook: Callable[[int, int], None] | None = None) -> LoopSpec:
    """Index the manifest and the val/test splits; check there is something to train and score."""
    from raugment.lib import loader

    classes = dataset.read("classes").sort_by(S.LABEL)
    names = classes.column(S.CLASS_NAME).to_pylist()
    table = manifest.read("manifest")
    root = manifest.path.resolve().parents[1]  # <root>/<stage>/<key>
    present = sorted({int(label) for label in table.column(S.LABEL).to_pylist()})
    # a manifest that leaves classes out (assemble.shortfall=exclude) is scored on the rest only,
    # so that every classifier of a study compares on the same class set
    scored = present if len(present) < len(names) else None
    val_units, test_units = loader.split_index(dataset, "val"), loader.split_index(dataset, "test")
    if scored is not None:
        val_units, test_units = loader.restrict(val_units, scored), loader.restrict(test_units, scored)
        log.info("train: manifest holds %d of %d classes; scoring those only", len(scored), len(names))
    spec = LoopSpec(train=cfg.train, num_classes=len(names), class_names=names,
                    train_units=loader.build_index(table, root), val_units=val_units,
                    test_units=test_units, epoch_hook=epoch_hook, scored=scored)
    world = cfg.train.workers.num_workers
    n_train = loader.count(spec.train_units)
    if n_train < world:
        raise ValueError(f"manifest {manifest.path} has {n_train} images for {world} workers")
    if cfg.train.batch_size < world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is the global batch; it must be "
                         f">= train.workers.num_workers={world}")
    for split, units in (("val", spec.val_units), ("test", spec.test_units)):
        if not loader.count(units):
            raise ValueError(f"dataset {dataset.path} has no {split} split; the recipe selects on val "
                             "and scores on test")
    return spec


def fit_ray(spec: LoopSpec, cfg: Config, storage: Path, name: str,
            callbacks: Sequence[Any] = ()) -> TrainState:
    """Run :func:`fit` on a Ray Train ``TorchTrainer``; the final checkpoint's state."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raugment.runtime.cluster import init_ray, scaling_config

    init_ray(cfg.cluster, cfg.run.progress)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=scaling_config(cfg.train.workers),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.workers.max_failures),
            callbacks=list(callbacks) or None),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} ended without a checkpoint (fit reports one every epoch)")
    with result.checkpoint.as_directory() as d:
        return TrainState.read(d)


def fit_group(spec: LoopSpec, cfg: Config, checkpoint_dir: Path) -> TrainState:
    """Run :func:`fit` on a leased worker group (resuming from ``checkpoint_dir``); the final state.

    A failed run (actor death, an error on a rank) is retried on a new group from the last
    epoch's checkpoint, at most ``train.workers.max_failures`` times.
    """
    from raugment.runtime.cluster import init_ray
    from raugment.runtime.worker_group import run_with_retries

    init_ray(cfg.cluster, cfg.run.progress)
    run_with_retries(cfg.train.workers, fit_member, spec, str(checkpoint_dir.resolve()),
                     what=f"training {checkpoint_dir.parent.name}")
    return TrainState.read(checkpoint_dir / "latest")


def history_table(history: Sequence[dict]) -> pa.Table:
    """Per-epoch rows -> schema.HISTORY."""
    return pa.Table.from_pylist([{k: r.get(k) for k in S.HISTORY.names} for r in history], schema=S.HISTORY)


def write_outputs(run: StageRun, cfg: Config, spec: LoopSpec, state: TrainState, wall_s: float) -> dict:
    """results.json, history.parquet, results_per_class.parquet and the best model bundle."""
    from raugment.lib import loader
    from raugment.lib.evaluate import overall, results_table
    from raugment.models.classifier import save_classifier_state

    if state.test_counts is None or state.best is None:
        raise ValueError("the final training state lacks test counts or best weights: training did not finish")
    recipe = PlateauRecipe.from_state(state.recipe)
    test = overall(state.test_counts)
    seen = sum(int(r[S.TRAIN_IMAGES]) for r in state.history)
    train_s = sum(float(r[S.TRAIN_S]) for r in state.history)
    results = {
        S.VAL_TOP1_BEST: recipe.best, S.BEST_EPOCH: recipe.best_epoch, S.EPOCHS_RUN: recipe.epochs_done,
        S.TEST_TOP1: test["top1"], S.TEST_TOP5: test["top5"], "n_test": test["n"],
        "n_train": loader.count(spec.train_units), "n_val": loader.count(spec.val_units),
        "stop_reason": recipe.reason, "lr_final": recipe.lr, "model": cfg.train.model,
        "seed": cfg.train.seed, "wall_s": wall_s, "cpu_s": state.cpu_s,
        "classes_scored": len(spec.scored) if spec.scored is not None else spec.num_classes,
        S.IMAGES_PER_S: seen / train_s if train_s else 0.0, "checkpoint": MODEL_DIR,
    }
    write_text_atomic(json.dumps(results, indent=2, sort_keys=True), run.path / RESULTS_FILE)
    run.write_single(history_table(state.history), "history")
    per_class = results_table(state.test_counts, spec.class_names)
    if spec.scored is not None:  # classes left out of the manifest are not part of the result
        import pyarrow.compute as pc

        per_class = per_class.filter(pc.is_in(per_class.column(S.LABEL), value_set=pa.array(spec.scored, pa.int32())))
    run.write_single(per_class, "results_per_class")
    save_classifier_state(state.best, cfg.train.model, spec.num_classes, run.path / MODEL_DIR,
                          extra={"image_size": cfg.train.image_size, "class_names": spec.class_names,
                                 "best_epoch": recipe.best_epoch, "val_top1": recipe.best})
    return results


def result_section(cfg: TrainConfig) -> dict[str, Any]:
    """The train settings that can change a run's result (its stage key); resource and
    bookkeeping fields (loader processes, checkpoint retention, retries, repeat lists) are left out
    so changing them reuses finished runs (the runners give the same result for a seed)."""
    # "auto" GPU options are keyed by their resolved values: bf16 autocast, channels-last and
    # compiled kernels change a run's floating-point results, so a GPU run and a CPU run of the
    # same config must not share a directory, while an explicit setting equal to what "auto"
    # resolves to shares it. ``workers.use_gpu`` (kept in the key) fixes the device either way.
    data = to_dict(cfg.resolved())
    for key in ("loader_workers", "checkpoints_to_keep", "keep_ray_checkpoints", "runner", "seeds",
                "repeat_sets"):
        data.pop(key)
    data["workers"].pop("max_failures")
    return data


def run(cfg: Config, dataset: Artifact, manifest: Artifact, *, callbacks: Sequence[Any] = (),
        epoch_hook: Callable[[int, int], None] | None = None) -> Artifact:
    """Stage "train": train ``cfg.train.model`` on ``manifest``, select on val, score on test.

    Args:
        cfg: the whole config (reads ``train``, ``cluster``, ``run``).
        dataset: the dataset artifact (classes, val and test splits).
        manifest: an assemble artifact (table ``manifest``).
        callbacks: extra Ray Train ``UserCallback``\\ s (Tune passes ``TuneReportCallback``); given
            any, the run uses the ``ray_train`` runner whatever ``train.runner`` says.
        epoch_hook: ``hook(epoch, rank)`` at each epoch start on every worker (must pickle).
    """
    section = {"train": result_section(cfg.train)}
    ray_train = cfg.train.runner == "ray_train" or bool(callbacks)

    def body(run: StageRun) -> None:
        spec = build_spec(cfg, dataset, manifest, epoch_hook)
        t0 = time.perf_counter()
        if ray_train:
            storage = run.path / "ray"
            state = fit_ray(spec, cfg, storage, f"train-{run.key}-{uuid.uuid4().hex[:8]}", callbacks)
        else:
            storage = run.path / CHECKPOINT_DIR
            state = fit_group(spec, cfg, storage)
        wall = time.perf_counter() - t0
        results = write_outputs(run, cfg, spec, state, wall)
        if not cfg.train.keep_ray_checkpoints:
            shutil.rmtree(storage, ignore_errors=True)  # the best weights are kept in model/
        run.stats.add("epochs", results[S.EPOCHS_RUN])
        run.stats.add("train_images_seen", sum(int(r[S.TRAIN_IMAGES]) for r in state.history))
        if ray_train:  # a worker group's ranks charge their own CPU/GPU seconds (usage.workers)
            workers = cfg.train.workers
            gpus = workers.num_workers * workers.gpus_per_worker if workers.use_gpu else 0.0
            run.stats.charge("workers", state.cpu_s, wall * gpus, calls=workers.num_workers)
        run.stats.extra.update({k: results[k] for k in (S.TEST_TOP1, S.VAL_TOP1_BEST, S.IMAGES_PER_S)})
        log.info("train: test top-1 %.4f (best val %.4f at epoch %d of %d)", results[S.TEST_TOP1],
                 results[S.VAL_TOP1_BEST], results[S.BEST_EPOCH], results[S.EPOCHS_RUN])

    # worker_group keeps its checkpoints in the stage directory: a killed driver resumes from them
    return run_stage(cfg.run.root, STAGE, section, {"dataset": dataset, "manifest": manifest}, body,
                     resumable=not ray_train)


# ---------------------------------------------------------------------------------------------
# Repeats: mean ± standard error over resampled sets x seeds
# ---------------------------------------------------------------------------------------------


def run_repeats(cfg: Config, dataset: Artifact, manifests: Sequence[Artifact]) -> dict[str, Any]:
    """Train every manifest x ``cfg.train.seeds``; write and return mean ± s.e. (stage "repeats").

    Returns:
        ``{"runs": [{manifest, seed, path, metrics...}], "summary": {metric: {mean, se, n, min,
        max}}, "path": <repeats artifact>}``; ``se`` is None for a single run.
    """
    from raugment.core.stats import summarize_runs

    if not manifests:
        raise ValueError("run_repeats needs at least one manifest")
    from raugment.runtime.worker_group import keep_groups

    runs = []
    with keep_groups():  # one worker group trains them all
        for manifest in manifests:
            for seed in cfg.train.seeds:
                art = run(with_overrides(cfg, {"train.seed": seed}), dataset, manifest)
                runs.append({"manifest": str(manifest.path), "seed": seed, S.RUN_PATH: str(art.path),
                             **{k: read_results(art)[k] for k in RUN_METRICS}})
    summary = summarize_runs(runs, RUN_METRICS)
    inputs = {f"manifest.{i}": m for i, m in enumerate(manifests)}
    inputs["dataset"] = dataset
    section = {"train": result_section(cfg.train), "runs": [r[S.RUN_PATH] for r in runs]}

    def body(stage: StageRun) -> None:
        stage.write_single(pa.Table.from_pylist(runs), "runs")
        write_text_atomic(json.dumps({"summary": summary, "runs": runs}, indent=2, sort_keys=True),
                          stage.path / "repeats.json")
        stage.stats.add("runs", len(runs))

    art = run_stage(cfg.run.root, "repeats", section, inputs, body)
    return {"runs": runs, "summary": summary, S.RUN_PATH: str(art.path)}
