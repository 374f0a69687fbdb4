"""Ray Tune sweeps over dotted config keys (classifier LR, DM fine-tuning LR, clusters k, ratio).

Ray 2.60 runs Ray Train V2, where ``Tuner(trainer)`` is refused. The supported composition, used
here: each trial is a small Tune *function* (``tune.with_resources(fn, {"CPU": trial_cpus})``,
0.01 CPU so it never competes with its own Train workers) that builds the trial's config with
:func:`raugment.core.config.with_overrides` and calls a **pipeline** — by default
:func:`train_pipeline` (assemble -> train, whose ``TorchTrainer`` forwards each epoch's metrics to
Tune through ``TuneReportCallback``, so ASHA can stop weak trials). ``train_pipeline`` reads only
``assemble.*`` and ``train.*``, so a space with other keys is refused for it. Sweeping keys of
earlier stages (``finetune.lr``, ``finetune.clusters``) takes ``tune.pipeline: study``:
:func:`study_pipeline` runs the study's graph for one method in each trial (finetune -> select ->
generate -> filter/dedup/audit -> assemble -> train; ``jobs/configs/tune_ft_*.yaml``). Any
importable function ``(cfg, inputs) -> metrics`` may be passed as ``pipeline=`` instead. Stages
keep their content-keyed caching inside trials, so two trials that share, say, a fine-tuned model
compute it once.

When Tune stops a trial early, its Train workers' placement group is freed through the State API,
which needs the Ray dashboard (without it the next trial waits forever); :func:`run` checks that it
is up.

Output: stage "tune" with ``results.parquet`` — one row per trial: the swept dotted keys, the
trial id and status, and the run metrics (val_top1_best, test_top1, ...) — and ``best.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from raugment.config import Config, from_dict
from raugment.core import schema as S
from raugment.core.config import ConfigError, to_dict, with_overrides
from raugment.core.storage import Artifact, StageRun, run_stage, write_text_atomic

log = logging.getLogger(__name__)

STAGE = "tune"
Pipeline = Callable[[Config, Mapping[str, Artifact]], dict]
STATUS = "status"
FINISHED = "pipeline_finished"  # set in a trial's last report (Tune's own "done" also marks stopped trials)


def tune_callbacks() -> list:
    """``[TuneReportCallback()]`` inside a Tune trial (per-epoch metrics reach Tune), else ``[]``."""
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if not _in_tune_session():
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def train_pipeline(cfg: Config, inputs: Mapping[str, Artifact]) -> dict:
    """The default trial: assemble (unless ``inputs["manifest"]`` is given) -> train.

    Args:
        cfg: the trial's config (the sweep's overrides applied).
        inputs: ``dataset``, and either ``manifest`` or ``added.<method>`` artifacts (+ ``audit``).

    Returns:
        the train run's ``results.json`` plus its path.
    """
    from raugment.stages.assemble import stage as assemble
    from raugment.stages.train import stage as train

    dataset = inputs["dataset"]
    manifest = inputs.get("manifest")
    if manifest is None:
        added = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith("added.")}
        manifest = assemble.run(cfg, dataset, added, inputs.get("audit"))
    art = train.run(cfg, dataset, manifest, callbacks=tune_callbacks())
    return {**train.read_results(art), S.RUN_PATH: str(art.path)}


def study_pipeline(cfg: Config, inputs: Mapping[str, Artifact]) -> dict:
    """A trial that runs the study's graph for its one method (``tune.pipeline: study``).

    The plan is :func:`raugment.study.planner.build_plan` of ``cfg`` (the trial's overrides
    applied) for ``study.methods`` (one method) at ``study.ratios`` (one ratio), one set, no
    baseline; its nodes run in order, each through its stage (finished keys are skipped, so
    trials share what their configs share). Only the final classifier reports its epochs to
    Tune (checkpoint-selection classifiers run without).

    Args:
        cfg: the trial's config.
        inputs: ``dataset``: the dataset artifact (its sizes size the plan).

    Returns:
        the final classifier's ``results.json`` plus its path.
    """
    from raugment.stages.train import stage as train
    from raugment.study.executor import measured_size, run_node
    from raugment.study.planner import build_plan, dataset_configs, topological

    dataset = inputs["dataset"]
    cfg = with_overrides(cfg, {"study.baseline": False, "study.sets": 1})
    plan = build_plan(cfg, {name: measured_size(dataset) for name in dataset_configs(cfg)})
    (spec,) = plan.runs
    done: dict[str, Artifact] = {}
    for node in topological(plan.nodes.values()):
        if node.stage == "dataset":
            done[node.id] = dataset
        elif node.id == spec.train:
            done[node.id] = train.run(node.cfg, *(done[str(i)] for i in node.inputs.values()),
                                      callbacks=tune_callbacks())
        else:
            done[node.id] = run_node(node, done)
    art = done[spec.train]
    return {**train.read_results(art), S.RUN_PATH: str(art.path)}


PIPELINES: dict[str, Pipeline] = {"train": train_pipeline, "study": study_pipeline}
TRAIN_PIPELINE_SECTIONS = ("assemble", "train")  # what train_pipeline reads


def trial(params: dict[str, Any], *, base: dict, inputs: dict[str, str], pipeline: Pipeline,
          metric: str) -> None:
    """One Tune trial: config = base + ``params`` (dotted keys), run ``pipeline``, report its result."""
    from ray import tune

    cfg = with_overrides(from_dict(base), params)
    result = pipeline(cfg, {name: Artifact.open(path) for name, path in inputs.items()})
    final = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    # The sweep metric must be in every report (ASHA reads it); the final value is the best epoch's.
    final.setdefault(metric, result.get(S.VAL_TOP1_BEST))
    tune.report({**final, FINISHED: True})


def build_param_space(space: Mapping[str, list]) -> dict[str, Any]:
    """``{"train.lr": [0.1, 0.01]}`` -> a Tune grid over the dotted keys."""
    from ray import tune

    return {key: tune.grid_search(list(values)) for key, values in space.items()}


def _check_space(cfg: Config, inputs: Mapping[str, Artifact], pipeline: Pipeline) -> None:
    from raugment.study.executor import measured_size
    from raugment.study.planner import build_plan, dataset_configs
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty; give dotted keys and values, e.g. "
                          "tune.space={'train.lr': [0.1, 0.03]}")
    for key, values in cfg.tune.space.items():
        for value in values:
            with_overrides(cfg, {key: value})  # unknown key / wrong type -> ConfigError now
    if pipeline is train_pipeline:
        unread = [k for k in cfg.tune.space if k.split(".", 1)[0] not in TRAIN_PIPELINE_SECTIONS]
        if unread:
            raise ConfigError(
                f"tune.space.{unread[0]}: a tune.pipeline=train trial (assemble -> train on the given added "
                f"images) never reads it, so every trial would be the same; sweep only "
                f"{', '.join(s + '.*' for s in TRAIN_PIPELINE_SECTIONS)}, or set tune.pipeline=study so each "
                "trial runs the study's graph for its method (fine-tuning and generation included)")
    if pipeline is study_pipeline:
        s = cfg.study
        if len(s.methods) != 1 or len(s.ratios) != 1 or len(dataset_configs(cfg)) != 1:
            raise ConfigError(
                "tune.pipeline=study: each trial trains one classifier, so give one method in study.methods "
                f"(got {s.methods}), one ratio in study.ratios (got {s.ratios}) and one dataset")
        if inputs.keys() - {"dataset"}:
            raise ConfigError("tune.pipeline=study: trials make their own added images; pass the dataset only")
        bad = sorted(k for k in cfg.tune.space if k.startswith(("study.", "run.", "cluster.")))
        if bad:
            raise ConfigError(f"tune.space.{bad[0]}: a tune.pipeline=study trial cannot sweep it; sweep "
                              "stage sections (finetune.*, generate.*, assemble.*, train.*, ...)")
        one = with_overrides(cfg, {"study.baseline": False, "study.sets": 1})
        build_plan(one, {name: measured_size(inputs["dataset"]) for name in dataset_configs(cfg)})  # bad methods
    if "manifest" in inputs and any(k.startswith("assemble.") for k in cfg.tune.space):
        raise ConfigError("tune.space sweeps assemble.* keys but a fixed manifest was given; "
                          "pass the added artifacts instead so each trial assembles its own set")


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "asha":
        # one report per epoch + the train loop's final one + the trial's own
        return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.max_epochs + 2,
                             grace_period=cfg.tune.grace_period,
                             reduction_factor=cfg.tune.reduction_factor)
    return FIFOScheduler()


def results_table(results: list[dict[str, Any]], space_keys: list[str]) -> pa.Table:
    """One row per trial: swept keys, trial id, status, metrics (missing metrics are null)."""
    metrics = [S.VAL_TOP1_BEST, S.BEST_EPOCH, S.EPOCHS_RUN, S.TEST_TOP1, S.TEST_TOP5, S.IMAGES_PER_S]
    rows = []
    for r in results:
        row = {k: r["config"].get(k) for k in space_keys}
        row.update({S.TRIAL_ID: r[S.TRIAL_ID], STATUS: r[STATUS], S.RUN_PATH: r["metrics"].get(S.RUN_PATH)})
        row.update({m: r["metrics"].get(m) for m in metrics})
        rows.append(row)
    return pa.Table.from_pylist(rows)


def _dashboard_up() -> bool:
    from ray._private.worker import get_dashboard_url

    return bool(get_dashboard_url())


def run(cfg: Config, dataset: Artifact, *, added: Mapping[str, Artifact] | None = None,
        manifest: Artifact | None = None, audit: Artifact | None = None,
        pipeline: Pipeline | None = None) -> Artifact:
    """Stage "tune": sweep ``cfg.tune.space`` with ``pipeline`` as the trial; table ``results``.

    Args:
        cfg: the base config; ``tune`` says what to sweep and how.
        dataset: the dataset artifact.
        added: method -> added-image artifact (each trial assembles at its own ratio).
        manifest: a fixed assembled manifest instead (no ``assemble.*`` keys in the space then).
        audit: the leakage audit artifact, for ``assemble.leakage: remove``.
        pipeline: the trial body, an importable function ``(cfg, inputs) -> metrics``; default:
            the one ``tune.pipeline`` names (:data:`PIPELINES`).
    """
    pipeline = pipeline or PIPELINES[cfg.tune.pipeline]
    inputs: dict[str, Artifact] = {"dataset": dataset}
    inputs.update({f"added.{m}": a for m, a in (added or {}).items()})
    if manifest is not None:
        inputs["manifest"] = manifest
    if audit is not None:
        inputs["audit"] = audit
    _check_space(cfg, inputs, pipeline)
    # Trials run in other processes (maybe other nodes with a shared file system): absolute root.
    base_cfg = replace(cfg, run=replace(cfg.run, root=str(Path(cfg.run.root).resolve())))
    base = to_dict(base_cfg)
    section = {"tune": to_dict(cfg.tune), "config": {k: v for k, v in base.items() if k not in ("cluster", "run")},
               "seed": cfg.run.seed, "pipeline": f"{pipeline.__module__}.{pipeline.__qualname__}"}

    def body(run: StageRun) -> None:
        from ray import tune

        from raugment.runtime.cluster import init_ray

        init_ray(cfg.cluster, cfg.run.progress)
        if not _dashboard_up():
            log.warning("the Ray dashboard is not running: trials that Tune stops early may leave "
                        "their Train workers' resources held, and the next trial then waits forever")
        fn = functools.partial(trial, base=base, inputs={k: str(a.path.resolve()) for k, a in inputs.items()},
                               pipeline=pipeline, metric=cfg.tune.metric)
        tuner = tune.Tuner(
            tune.with_resources(fn, {"CPU": cfg.tune.trial_cpus}),
            param_space=build_param_space(cfg.tune.space),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode,
                                        scheduler=_scheduler(cfg), num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent),
            run_config=tune.RunConfig(name=f"tune-{run.key}-{uuid.uuid4().hex[:8]}",
                                      storage_path=str((run.path / "ray").resolve())),
        )
        grid = tuner.fit()
        results: list[dict[str, Any]] = []
        # a ResultGrid is a sequence through __len__/__getitem__ (it declares no __iter__)
        for r in (grid[i] for i in range(len(grid))):
            metrics = dict(r.metrics or {})
            status = "error" if r.error is not None else ("complete" if metrics.get(FINISHED) else "stopped")
            run.stats.add(status)
            results.append({"config": {k: (r.config or {}).get(k) for k in cfg.tune.space},
                            "metrics": metrics, STATUS: status,
                            S.TRIAL_ID: metrics.get("trial_id") or Path(r.path).name})
        table = results_table(results, list(cfg.tune.space))
        run.write_single(table, "results")
        done = [r for r in results if r[STATUS] == "complete" and r["metrics"].get(cfg.tune.metric) is not None]
        best = (max if cfg.tune.mode == "max" else min)(
            done, key=lambda r: r["metrics"][cfg.tune.metric]) if done else None
        write_text_atomic(json.dumps({"metric": cfg.tune.metric, "mode": cfg.tune.mode,
                                      "best": best and {"config": best["config"],
                                                        cfg.tune.metric: best["metrics"][cfg.tune.metric],
                                                        S.TEST_TOP1: best["metrics"].get(S.TEST_TOP1)}},
                                     indent=2, sort_keys=True, default=str), run.path / "best.json")
        if not done:
            raise RuntimeError(f"no trial of the sweep completed; see {run.path / 'ray'}")

    return run_stage(cfg.run.root, STAGE, section, inputs, body)


def read_results(artifact: Artifact) -> pa.Table:
    """The per-trial results table of a tune artifact."""
    return artifact.read("results")
