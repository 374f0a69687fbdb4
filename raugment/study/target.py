"""One-target studies: ``raugment <stage>`` plans one stage and whatever it needs, and runs it as a study would.

The stage graph is written once, in :mod:`raugment.study.planner`: a one-target study uses the
study's own builders (:data:`~raugment.study.planner.PIPELINES`, :func:`~raugment.study.planner.
plan_given`, :func:`~raugment.study.planner.plan_classifiers`) on a config whose ``study``
switches say which stages the target needs, keeps the target's stage runs and their inputs, and
runs them through the study's :class:`~raugment.study.executor.Executor`: resumable, every
finished stage skipped, nothing started or written before the same preflight as a study passed.
It writes no study index and no report, and its first failure is an error exit.

Two differences from a study:

* The user's sections are used as given (:attr:`~raugment.study.planner.PlanContext.as_given`):
  ``generate.images_per_class``, ``generate.num_sets``, ``retrieve.images_per_class`` and the
  ``assemble`` section are not derived from ``study.ratios`` and ``study.pool_factor``.
* Pins: an artifact the user gives (``--dataset DIR``, ``--added [METHOD=]DIR``, ``--audit DIR``)
  becomes a *given* node in place of the stage run that would produce it; it is opened, never run.
  ``--added`` stands for what the target stage reads: the input of ``filter``, ``dedup`` or
  ``audit``, the added images ``assemble`` mixes in. A pin that is not a finished stage output is
  an :class:`~raugment.core.config.InputError` before any work.

What each target runs (``--method NAME`` is repeatable; ``study.*`` switches as in a study):

=========  ===================================================================================
dataset    the dataset stage (one per ``study.datasets`` entry)
index      the index retrieval would build (``retrieve.backend`` with a local index and
           ``retrieve.index`` unset; otherwise an error: ``index build --out DIR`` builds one
           outside the run root)
retrieve   method ``retrieval``: dataset -> [index] -> retrieve, ``retrieve.images_per_class`` per class
finetune   ``finetune.method``: dataset -> finetune
select     ``finetune.method``: dataset -> finetune -> checkpoint selection (``select`` section)
generate   ``generate.method``: dataset -> generate; a fine-tuned method first runs finetune
           [-> select when ``study.select_checkpoint``], unless ``generate.conditioning`` names
           the fine-tuning artifact
filter     per method (``--method``, ``--added``, else ``study.methods``): its source -> filter
dedup      per method: its source -> [filter when ``study.filter``] -> dedup
audit      per method: ... -> audit (a pinned ``--added`` is what the audit reads)
assemble   one manifest mixing every ``--method``/``--added`` (none: the baseline at ratio 0) at
           ``assemble.ratio``, for sets ``assemble.set_index`` .. + ``train.repeat_sets`` - 1
train      assemble as above, then one classifier per set and ``train.seeds`` entry; several
           also write mean ± s.e. (stage ``repeats``)
tune       the inputs of assemble as above, then the Ray Tune sweep of ``tune.space``
           (``tune.pipeline: study``: the dataset only; each trial runs the method's graph)
=========  ===================================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raugment.config import Config
from raugment.core.config import ConfigError, InputError, section_hash, with_overrides
from raugment.study.planner import (
    BASELINE,
    PIPELINES,
    DatasetSize,
    InputRef,
    Node,
    Plan,
    PlanContext,
    added_inputs,
    dataset_configs,
    method_config,
    node_id,
    plan_classifiers,
    plan_datasets,
    plan_generate,
    plan_given,
)

if TYPE_CHECKING:
    from raugment.core.storage import Artifact

log = logging.getLogger(__name__)

RETRIEVAL = "retrieval"  # the method whose pipeline retrieves (and builds the index it reads)
POSTPROCESS = ("filter", "dedup", "audit")  # in pipeline order
CLASSIFIER_TARGETS = ("assemble", "train", "tune")
OPTIONS = ("method", "added", "dataset", "audit")


@dataclass(frozen=True)
class Target:
    """A stage command: its help line and which of :data:`OPTIONS` it takes."""

    help: str
    options: tuple[str, ...] = ()


_ADDED = ("method", "added", "dataset")
TARGETS: dict[str, Target] = {
    "dataset": Target("read a dataset and write its splits"),
    "index": Target("build the local CLIP kNN index that retrieval reads"),
    "retrieve": Target("retrieve and download CLIP nearest neighbours (method retrieval)", ("dataset",)),
    "finetune": Target("fine-tune the diffusion model (finetune.method)", ("dataset",)),
    "select": Target("pick finetune.method's checkpoint by its classifiers' validation accuracy", ("dataset",)),
    "generate": Target("generate images with generate.method (fine-tuning first when it needs it)", ("dataset",)),
    "filter": Target("filter added images (per method)", _ADDED),
    "dedup": Target("filter, then de-duplicate added images (per method)", _ADDED),
    "audit": Target("audit added images for test-set leakage (per method)", _ADDED),
    "assemble": Target("assemble an augmented training set", (*_ADDED, "audit")),
    "train": Target("assemble, then train and evaluate classifiers with Ray Train", (*_ADDED, "audit")),
    "tune": Target("sweep config keys with Ray Tune (assemble -> train trials)", (*_ADDED, "audit")),
}

# target -> the pipeline role (planner.PIPELINES' return value) of its stage run, for one method
ROLES = {"index": "index", "retrieve": "source", "generate": "source", "finetune": "finetune",
         "select": "select", "filter": "filter", "dedup": "dedup", "audit": "audit"}
# target -> the config key that names its method, and why that method may have no such stage
METHOD_KEYS = {
    "retrieve": ("retrieve.backend", "retrieval plans no retrieve stage"),
    "finetune": ("finetune.method", "not a fine-tuning method"),
    "select": ("finetune.method", "not a fine-tuning method"),
    "generate": ("generate.method", "not a generation method (retrieval: `raugment retrieve`)"),
}


def _missing_stage(cfg: Config, stage: str, method: str) -> ConfigError:
    """The error for a target whose method plans no stage run of ``stage``."""
    if stage == "index":
        key, why = (("retrieve.index", "retrieval reads that index") if cfg.retrieve.index else
                    ("retrieve.backend", f"backend {cfg.retrieve.backend!r} reads no local index"))
        return ConfigError(f"{key}: {why}, so retrieval plans no index to build; `raugment index build` builds "
                           "the one retrieval would build (a local backend, retrieve.index unset), or one outside "
                           "the run root with `raugment index build --out DIR`")
    key, why = METHOD_KEYS.get(stage, ("--method", f"method has no {stage} stage"))
    return ConfigError(f"{key}: `raugment {stage}` plans method {method!r}, which runs no {stage} stage: {why}")


@dataclass
class Pins:
    """Finished artifacts the user gives instead of the stage runs that would produce them.

    Attributes:
        dataset: ``--dataset DIR``, a dataset stage output.
        added: ``--added [METHOD=]DIR`` items: what the target stage reads as added images.
        audit: ``--audit DIR``, a leakage audit for ``assemble.leakage=remove``.
    """

    dataset: str | None = None
    added: list[str] = field(default_factory=list)
    audit: str | None = None

    @classmethod
    def of(cls, args: Any) -> Pins:
        """The pins of a stage command's parsed arguments (absent options: none)."""
        return cls(dataset=getattr(args, "dataset", None), added=list(getattr(args, "added", None) or []),
                   audit=getattr(args, "audit", None))

    def given(self) -> list[str]:
        """The options given, as the command line names them."""
        return [o for o, v in (("dataset", self.dataset), ("added", self.added), ("audit", self.audit)) if v]

    def added_by_method(self) -> dict[str, str]:
        """``--added`` items as method -> directory; a bare ``DIR`` is named after its stage
        (``generate``, ``filter``, ...; ``generate-2`` for a second one)."""
        out: dict[str, str] = {}
        for item in self.added:
            method, sep, path = item.partition("=")
            if not sep:
                method, path = Path(item).resolve().parent.name, item
                n = 1
                while (f"{method}-{n}" if n > 1 else method) in out:
                    n += 1
                method = f"{method}-{n}" if n > 1 else method
            if not method or not path:
                raise InputError(f"--added {item!r} must look like METHOD=DIR or DIR (a stage output directory)")
            if method in out:
                raise InputError(f"--added names method {method!r} twice; give each artifact its own METHOD=")
            out[method] = path
        return out


# option -> (the stage that writes what it names, or None for any; the tables it must hold)
PIN_KINDS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "dataset": ("dataset", ("images", "classes")),
    "added": (None, ("images",)),
    "audit": ("audit", ("pairs",)),
}


def open_pin(option: str, path: str) -> Artifact:
    """The finished artifact ``path`` given as ``--option`` (a key of :data:`PIN_KINDS`).

    Raises:
        InputError: ``path`` is missing, unfinished or damaged, another stage's output, or lacks a
            table the option needs.
    """
    from raugment.core.storage import SUCCESS, Artifact

    stage, tables = PIN_KINDS[option]
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"--{option} {path}: no such directory; pass a finished stage output "
                         f"(<run.root>/{stage or '<stage>'}/<key>)")
    if not (p / SUCCESS).exists():
        raise InputError(f"--{option} {path}: not a finished stage output (no {SUCCESS}); re-run the stage "
                         "that writes it, or pass a finished one")
    try:
        art = Artifact.open(p)
    except InputError as exc:
        raise InputError(f"--{option} {path}: {exc}") from None
    if stage is not None and art.stage != stage:
        raise InputError(f"--{option} {path}: a {art.stage!r} stage output, not a {stage!r} one; pass "
                         f"<run.root>/{stage}/<key>")
    missing = [t for t in tables if not art.has(t)]
    if missing:
        raise InputError(f"--{option} {path}: a {art.stage!r} stage output without table {missing[0]!r}; pass "
                         + (f"a {stage} stage output" if stage else "a generate, retrieve, filter or dedup output"))
    return art


@dataclass
class TargetPlan:
    """A pruned plan: the target's stage runs and everything they read.

    Attributes:
        plan: the nodes (given ones carry :attr:`Node.given`); no classifier runs (no report).
        targets: ids of the target's stage runs, in plan order.
        feeds: ``tune`` only: the inputs its trials read (``dataset``, ``added``, ``audit``).
    """

    plan: Plan
    targets: list[str]
    feeds: dict[str, InputRef] | None = None


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def target_methods(cfg: Config, stage: str, methods: Sequence[str] = (), pins: Pins | None = None) -> list[str]:
    """The methods a target plans from their pipelines (pinned ones excluded): see the table above.

    Raises:
        InputError: ``--method`` on a target that takes none, baseline among added methods, or a
            post-processing target with nothing to process.
    """
    pins = pins or Pins()
    check_options(stage, methods, pins)
    if stage == "dataset":
        return []
    if stage in ("index", "retrieve"):
        return [RETRIEVAL]
    if stage in ("finetune", "select"):
        return [cfg.finetune.method]
    if stage == "generate":
        return [cfg.generate.method]
    names = list(methods)
    if BASELINE in names:
        if stage in POSTPROCESS:
            raise InputError(f"--method {BASELINE} adds no images to {stage}; name a method that does")
        if len(names) > 1 or pins.added:
            raise InputError(f"--method {BASELINE} mixes with no other method: it is what `raugment {stage}` "
                             "runs without --method and --added")
        return []
    if names or pins.added:
        return names
    if stage in POSTPROCESS:
        names = [m for m in cfg.study.methods if m != BASELINE]
        if not names:
            raise InputError(f"`raugment {stage}` has no methods: study.methods is empty; name some with "
                             "--method NAME or give artifacts with --added DIR")
    return names


def check_options(stage: str, methods: Sequence[str], pins: Pins) -> None:
    """Refuse options the target does not take (``--audit`` for ``filter``, ...)."""
    if stage not in TARGETS:
        raise ValueError(f"unknown target stage {stage!r}; known: {', '.join(TARGETS)}")
    given = pins.given() + (["method"] if methods else [])
    bad = [o for o in given if o not in TARGETS[stage].options]
    if bad:
        takes = ", ".join(f"--{o}" for o in TARGETS[stage].options) or "none of them"
        raise InputError(f"`raugment {stage}` takes no --{bad[0]} (it takes {takes})")


def _study_switches(cfg: Config, stage: str) -> dict[str, Any]:
    """``study`` overrides that make the pipelines plan what ``stage`` needs and no more
    (``study`` is in no stage run's identity, so they change no key)."""
    s = cfg.study
    out: dict[str, Any] = {}
    if stage in POSTPROCESS:  # the stages before the target as the study says, the target on
        i = POSTPROCESS.index(stage)
        out.update({f"study.{p}": getattr(s, p) if j < i else j == i for j, p in enumerate(POSTPROCESS)})
    elif stage not in CLASSIFIER_TARGETS:
        out.update({f"study.{p}": False for p in POSTPROCESS})
    if stage == "select":
        out["study.select_checkpoint"] = True
    elif stage in ("dataset", "index", "retrieve", "finetune"):
        out["study.select_checkpoint"] = False
    return out


def _pin_switches(stage: str) -> dict[str, Any]:
    """``study`` overrides for a pinned ``--added``: it is the target stage's input."""
    return {f"study.{p}": p == stage for p in POSTPROCESS}


def _given(ctx: PlanContext, art: Artifact, cfg: Config, labels: Mapping[str, Any]) -> str:
    node = Node(id=f"given-{art.stage}-{section_hash({'path': str(art.path)})}", stage=art.stage, cfg=cfg,
                labels={"dataset": ctx.dataset_name, **labels}, given=str(art.path))
    return ctx.plan.add(node)


def _method_roles(ctx: PlanContext, cfg: Config, method: str, stage: str) -> dict[str, str]:
    """The nodes of ``method``'s pipeline, by role."""
    base, pipeline, m_cfg = method_config(cfg, method)
    build: Callable[..., dict[str, str]] = PIPELINES.get(pipeline)
    if stage == "generate" and cfg.generate.conditioning:
        build = plan_generate  # generate.conditioning names the fine-tuning artifact: none is planned
    return build(ctx, method, base, m_cfg)


def _stage_node(ctx: PlanContext, cfg: Config, stage: str, method: str, roles: Mapping[str, str]) -> str:
    nid = roles.get(ROLES[stage])
    if nid is None or ctx.plan.nodes[nid].stage != stage:
        raise _missing_stage(cfg, stage, method)
    return nid


def _audit_of(ctx: PlanContext, cfg: Config, roles: Mapping[str, Mapping[str, str]]) -> str | None:
    """The leakage audit of the mixed added images: the method's own audit for one method, one
    audit over all of them for several (when each has one, ``study.audit``), else None."""
    audits = [r.get("audit") for r in roles.values()]
    if not audits or None in audits:
        return None
    if len(audits) == 1:
        return audits[0]
    inputs: dict[str, InputRef] = {"dataset": ctx.dataset_node,
                                   "added": list(_mixed(roles).values())}
    return ctx.plan.add(Node(id=node_id("audit", cfg, inputs), stage="audit", cfg=cfg, inputs=inputs,
                             labels={"dataset": ctx.dataset_name, "method": "+".join(roles)}))


def _mixed(roles: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Source name -> added-images node of every method (a combined one gives each of its parts)."""
    return {name: nid for m, r in roles.items() for name, nid in added_inputs(m, r).items()}


def _classifier_nodes(ctx: PlanContext, cfg: Config, stage: str, roles: Mapping[str, Mapping[str, str]],
                      audit: str | None) -> tuple[list[str], dict[str, InputRef] | None]:
    """assemble/train/tune: the manifests mixing every method's added images, and their classifiers."""
    added = _mixed(roles)
    audit = audit or _audit_of(ctx, cfg, roles)
    if added and audit is None and cfg.assemble.leakage == "remove":
        raise InputError("assemble.leakage=remove needs a leakage audit of the added images: pass --audit DIR, "
                         "or name the methods with --method (their audits are planned when study.audit), or "
                         "set assemble.leakage=keep")
    if stage == "tune":
        feeds: dict[str, InputRef] = {"dataset": ctx.dataset_node, "added": added, "audit": audit}
        return [ctx.dataset_node, *added.values(), *([audit] if audit else [])], feeds
    a = cfg.assemble
    first, n = a.set_index, cfg.train.repeat_sets
    if first + n > a.num_sets:
        raise ConfigError(f"train.repeat_sets={n} from assemble.set_index={first} needs assemble.num_sets >= "
                          f"{first + n}, got {a.num_sets}; raise assemble.num_sets or lower train.repeat_sets")
    ratio = a.ratio if added else 0.0  # no added images: the baseline
    targets: list[str] = []
    for s in range(first, first + n):
        a_cfg = with_overrides(cfg, {"assemble.ratio": ratio, "assemble.set_index": s})
        labels = {"method": "+".join(added) or BASELINE, "ratio": ratio, "set_index": s}
        seeds = cfg.train.seeds if stage == "train" else []
        assemble, trains = plan_classifiers(ctx, a_cfg, added, audit, labels, seeds)
        targets += [t for _, t in trains] if stage == "train" else [assemble]
    return targets, None


def plan_target(cfg: Config, stage: str, pins: Pins | None = None, methods: Sequence[str] = (),
                sizes: Mapping[str, DatasetSize] | None = None) -> TargetPlan:
    """The plan of one target stage and everything it needs (see the module's table).

    Args:
        cfg: the config; its sections are used as given.
        stage: a key of :data:`TARGETS`.
        pins: artifacts given instead of the stage runs that would produce them.
        methods: ``--method`` names (filter, dedup, audit, assemble, train, tune).
        sizes: dataset name -> size (from its finished dataset stage); before the dataset stage
            has run a placeholder will do (sizes scale estimates and the selection's check only).

    Raises:
        InputError: an option the target does not take, or a pin that is not a finished artifact.
        ConfigError: the config plans no such stage run (e.g. ``generate.method`` is ``retrieval``).
    """
    pins = pins or Pins()
    names = target_methods(cfg, stage, methods, pins)
    if stage == "tune" and cfg.tune.pipeline == "study":
        if methods or pins.added or pins.audit:
            raise InputError("tune.pipeline=study: each trial makes its own added images for the method of "
                             "study.methods; drop --method/--added/--audit (or set tune.pipeline=train)")
        names = []  # the trials plan the rest
    cfg = with_overrides(cfg, _study_switches(cfg, stage))
    if (pins.given() or stage == "tune") and len(dataset_configs(cfg)) > 1:
        what = f"--{pins.given()[0]} gives one dataset's artifact" if pins.given() else "tune sweeps one dataset"
        raise InputError(f"{what}, but study.datasets names {len(cfg.study.datasets)}; pick one "
                         "(--set 'study.datasets={}' and that dataset's section)")
    pinned = {m: open_pin("added", p) for m, p in pins.added_by_method().items()}
    clash = sorted(set(pinned) & set(names))
    if clash:
        raise InputError(f"method {clash[0]!r} is both a --method and an --added METHOD=DIR; drop one")
    dataset_pin = open_pin("dataset", pins.dataset) if pins.dataset else None
    audit_pin = open_pin("audit", pins.audit) if pins.audit else None
    placeholder = {name: DatasetSize(1, 1, 1) for name in dataset_configs(cfg)}
    plan, contexts = plan_datasets(cfg, {**placeholder, **(sizes or {})}, as_given=True)
    targets: list[str] = []
    feeds = None
    for ctx, ds_cfg in contexts:
        if dataset_pin is not None:
            ctx = replace(ctx, dataset_node=_given(ctx, dataset_pin, ds_cfg, {}))
        if stage == "dataset":
            targets.append(ctx.dataset_node)
            continue
        roles = {m: _method_roles(ctx, ds_cfg, m, stage) for m in names}
        pin_cfg = with_overrides(ds_cfg, _pin_switches(stage))
        for m, art in pinned.items():
            roles[m] = plan_given(ctx, m, pin_cfg, _given(ctx, art, ds_cfg, {"method": m}))
        if stage in CLASSIFIER_TARGETS:
            audit = _given(ctx, audit_pin, ds_cfg, {}) if audit_pin is not None else None
            found, feeds = _classifier_nodes(ctx, ds_cfg, stage, roles, audit)
            targets += found
        else:
            targets += [_stage_node(ctx, ds_cfg, stage, m, r) for m, r in roles.items()]
    return TargetPlan(prune(plan, targets), targets, feeds)


def prune(plan: Plan, targets: Iterable[str]) -> Plan:
    """The nodes of ``plan`` that ``targets`` need (themselves and their inputs, transitively), in
    plan order; no classifier runs."""
    keep: set[str] = set()
    todo = list(targets)
    while todo:
        nid = todo.pop()
        if nid not in keep:
            keep.add(nid)
            todo.extend(plan.nodes[nid].input_ids())
    out = Plan(node_gpus=plan.node_gpus, node_cpus=plan.node_cpus)
    out.nodes = {nid: n for nid, n in plan.nodes.items() if nid in keep}
    return out


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def run_target(cfg: Config, stage: str, pins: Pins | None = None, methods: Sequence[str] = ()) -> list[Artifact]:
    """Run one target (see the module's table), resuming whatever is finished; log its summary.

    Order as in a study: the preflight of every stage run of the pruned plan (no Ray, nothing
    written; the pins opened), the dataset stages (their sizes fix the selection's quotas), then
    the rest through one :class:`~raugment.study.executor.Executor` with ``keep_going`` off.

    Returns:
        the target's artifacts (``tune``: the sweep's artifact; ``train`` with several runs: the
        classifiers, after the ``repeats`` artifact is written).
    """
    from raugment.core.storage import Artifact
    from raugment.runtime.cluster import keep_pools
    from raugment.runtime.worker_group import keep_groups
    from raugment.study import executor as ex

    pins = pins or Pins()
    names = target_methods(cfg, stage, methods, pins)
    if stage == "tune" and cfg.tune.pipeline == "study":
        if methods or pins.added or pins.audit:
            raise InputError("tune.pipeline=study: each trial makes its own added images for the method of "
                             "study.methods; drop --method/--added/--audit (or set tune.pipeline=train)")
        names = []  # the trials plan the rest
    if methods:
        try:
            ex.check_methods(with_overrides(cfg, {"study.methods": names, "study.baseline": True}))
        except ConfigError as exc:  # named as the option, not as the study key it was checked as
            raise InputError(f"--method: {str(exc).split(']: ', 1)[-1]}") from None
    elif stage in POSTPROCESS and not pins.added:
        ex.check_methods(cfg)
    sizes: dict[str, DatasetSize] = {}
    if pins.dataset:  # (plan_target refuses pins with several datasets)
        sizes = {next(iter(dataset_configs(cfg))): ex.measured_size(open_pin("dataset", pins.dataset))}
    tp = plan_target(cfg, stage, pins, methods, sizes)
    ex.check_plan(tp.plan)
    root = Path(cfg.run.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    runner = ex.Executor(root, ex.read_state(root), keep_going=False)
    runner.done.update({n.id: Artifact.open(n.given) for n in tp.plan.nodes.values() if n.given})
    datasets = [n for n in tp.plan.by_stage("dataset") if n.given is None]
    if datasets and stage != "dataset":
        runner.run(datasets)
        sizes = {n.labels["dataset"]: ex.measured_size(runner.done[n.id]) for n in datasets}
        tp = plan_target(cfg, stage, pins, methods, sizes)
    log.info("raugment %s: %d stage runs", stage, sum(n.given is None for n in tp.plan.nodes.values()))
    with keep_groups(), keep_pools():
        runner.run(list(tp.plan.nodes.values()), cfg.study.parallel, cfg.study.parallel_stages)
    arts = [runner.done[t] for t in tp.targets]
    if stage == "tune":
        return [_tune(cfg, tp.feeds or {}, runner.done)]
    for art in arts:
        log.info("%s: %s -- %s", stage, art.path, SUMMARIES.get(stage, _counts)(art))
    if stage == "train":
        _repeats(tp, runner.done)
    return arts


def _tune(cfg: Config, feeds: Mapping[str, InputRef], done: Mapping[str, Artifact]) -> Artifact:
    from raugment.study import tune
    from raugment.study.executor import _resolve

    inputs = {k: _resolve(ref, done) for k, ref in feeds.items()}
    art = tune.run(cfg, inputs["dataset"], added=inputs["added"], audit=inputs["audit"])
    log.info("tune results: %s; best: %s", art.path / "results.parquet",
             (art.path / "best.json").read_text().strip())
    return art


def _repeats(tp: TargetPlan, done: Mapping[str, Artifact]) -> None:
    """Several classifiers of one dataset: their mean ± s.e. (stage ``repeats``), logged."""
    from raugment.core import schema as S
    from raugment.core.stats import format_mean_se
    from raugment.stages.train import stage as train

    by_dataset: dict[str, list[Node]] = {}
    for t in tp.targets:
        by_dataset.setdefault(str(tp.plan.nodes[t].inputs["dataset"]), []).append(tp.plan.nodes[t])
    for dataset, nodes in by_dataset.items():
        if len(nodes) < 2:
            continue
        manifests = list(dict.fromkeys(str(n.inputs["manifest"]) for n in nodes))
        out = train.run_repeats(nodes[0].cfg, done[dataset], [done[m] for m in manifests])
        top1 = out["summary"][S.TEST_TOP1]
        log.info("repeats: %s; test top-1 %s %% over %d runs", out[S.RUN_PATH],
                 format_mean_se(top1["mean"], top1["se"]), top1["n"])


# ----------------------------------------------------------------------------------------------
# What each target's artifact holds, in one log line
# ----------------------------------------------------------------------------------------------


def _counts(art: Artifact) -> str:
    st = art.stats
    counts = ", ".join(f"{k}={v}" for k, v in sorted(st.get("counts", {}).items())) or "-"
    return f"{counts}; failures {st.get('failures') or 'none'}"


def _dataset(art: Artifact) -> str:
    from raugment.core.artifacts import SPLIT_ORDER

    counts = art.stats.get("counts", {})
    return (f"{counts.get('classes', 0)} classes; {', '.join(f'{s}={counts.get(s, 0)}' for s in SPLIT_ORDER)}; "
            f"failures {art.stats.get('failures') or 'none'}")


def _retrieve(art: Artifact) -> str:
    st = art.stats
    return (f"{st.get('counts')} (precision@n {st.get('precision_at_n')}, shortfall {st.get('shortfall') or 'none'}, "
            f"failures {st.get('failures')})")


def _finetune(art: Artifact) -> str:
    from raugment.lib.finetuned.artifact import list_checkpoints

    return "checkpoints:" + "".join(f"\n  {r.name:<11} epoch {r.epoch:3d}  train {r.train_loss:.4f}  "
                                    f"val {r.val_loss:.4f}" for r in list_checkpoints(art.path))


def _generate(art: Artifact) -> str:
    st = art.stats
    if st.get("unfilled_classes"):
        log.warning("generate: unfilled classes: %s", st["unfilled_classes"])
    return f"{st.get('counts', {}).get('images')} images (failures: {st.get('failures')})"


def _audit(art: Artifact) -> str:
    from raugment.core.artifacts import GALLERY

    return f"{_counts(art)} (gallery: {art.path / GALLERY})"


def _train(art: Artifact) -> str:
    from raugment.core import schema as S
    from raugment.core.artifacts import RESULTS_FILE, read_results

    return f"test top-1 {read_results(art)[S.TEST_TOP1]:.4f} ({art.path / RESULTS_FILE})"


SUMMARIES: dict[str, Callable[[Artifact], str]] = {
    "dataset": _dataset, "retrieve": _retrieve, "finetune": _finetune, "generate": _generate,
    "audit": _audit, "train": _train,
}
