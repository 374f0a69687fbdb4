"""``raugment run study.yaml``: execute a study's plan, resumably, and write its report.

The planner (:mod:`raugment.study.planner`) turns the config into stage runs (nodes); this module runs
them in order, each through its stage module's ``run(cfg, *inputs)``, so every stage keeps its own
skip-if-complete contract: re-running a study (after a kill, or with more methods or ratios)
only runs what is missing. Sizes that depend on the data (quotas from the largest class) are taken
from the finished dataset stage, so the plan is the same on every re-run.

The study's own output is a small stage artifact ``study/<key>`` with the table ``runs`` (one row
per classifier: dataset, method, ratio, set, seed and the stage directories behind it) and
``plan.json``; :mod:`raugment.stages.report.stage` renders it.

Progress: Ray Data's progress bars inside the stages, and one summary line per stage in the log.
``<root>/_study/nodes.json`` records which node produced which directory, so ``--dry-run`` shows
what is done and uses measured costs for it.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.artifacts import class_counts
from raugment.core.config import ConfigError, InputError, PreflightError, canonical_json, dump_yaml, to_dict
from raugment.core.storage import SUCCESS, Artifact, StageRun, run_stage, write_text_atomic
from raugment.runtime.cluster import keep_pools, release_idle_pools
from raugment.runtime.worker_group import keep_groups, release_idle
from raugment.study.planner import (
    CENSUS_INPUTS,
    DatasetSize,
    InputRef,
    Node,
    Plan,
    apply_measured,
    build_plan,
    dataset_configs,
    dataset_nodes,
    format_plan,
    node_id,
    plan_to_dict,
    topological,
)

log = logging.getLogger(__name__)

STATE_DIR = "_study"
STATE_FILE = "nodes.json"

# Stages that may run while leased pools sit idle: they use no Ray, lease pools themselves, run
# ActorGroups (whose placement gives idle pools back when it stalls) or release idle pools before
# their own Ray Data work (hashing). Before any other stage (training, fine-tuning, tuning, a new
# stage) a study gives every idle pool back, so none can hold the CPUs that stage waits for.
POOL_SAFE_STAGES = ("generate", "filter", "index", "retrieve", "dedup", "audit", "assemble", "select",
                    "report")


# ----------------------------------------------------------------------------------------------
# Study state: node id -> artifact directory (relative to the run root)
# ----------------------------------------------------------------------------------------------


def read_state(root: str | Path) -> dict[str, str]:
    """Node ids this run root has finished, with their directories (empty if none)."""
    p = Path(root) / STATE_DIR / STATE_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def _record(root: Path, state: dict[str, str], node: Node, artifact: Artifact) -> None:
    state[node.id] = str(artifact.path.relative_to(root))
    write_text_atomic(json.dumps(state, indent=1, sort_keys=True), root / STATE_DIR / STATE_FILE)


# ----------------------------------------------------------------------------------------------
# Sizes from finished dataset stages
# ----------------------------------------------------------------------------------------------


def measured_size(dataset_artifact: Artifact) -> DatasetSize:
    """Training-split size of a finished dataset stage."""
    return DatasetSize.from_counts(class_counts(dataset_artifact, "train"))


def known_sizes(cfg: Config, state: Mapping[str, str]) -> dict[str, DatasetSize]:
    """Sizes of the study's datasets whose stage is finished in this root (no work, no Ray)."""
    root = Path(cfg.run.root).resolve()
    out = {}
    for name, ds_cfg in dataset_configs(cfg).items():
        rel = state.get(node_id("dataset", ds_cfg, {}))
        if rel and (root / rel / SUCCESS).exists():
            out[name] = measured_size(Artifact.open(root / rel))
    return out


def plan_study(cfg: Config) -> Plan:
    """The plan as it stands: measured sizes and costs where this root has them, else estimates."""
    state = read_state(cfg.run.root)
    plan = build_plan(cfg, known_sizes(cfg, state))
    apply_measured(plan, state, cfg.run.root)
    return plan


# ----------------------------------------------------------------------------------------------
# Running nodes
# ----------------------------------------------------------------------------------------------


def _resolve(ref: InputRef, done: Mapping[str, Artifact]) -> Any:
    if ref is None:
        return None
    if isinstance(ref, str):
        return done[ref]
    if isinstance(ref, list):
        return [done[r] for r in ref]
    return {k: done[v] for k, v in ref.items()}


def optional_inputs(node: Node) -> set[str]:
    """Inputs a node runs without when they failed: an assemble run's census pools (the other
    methods' pools it checks for shortfalls); a failed method must not take every classifier
    of the study down with it."""
    out: set[str] = set()
    for name in CENSUS_INPUTS:
        ref = node.inputs.get(name)
        out.update(ref.values() if isinstance(ref, dict) else [])
    required = Node(node.id, node.stage, node.cfg,
                    {k: v for k, v in node.inputs.items() if k not in CENSUS_INPUTS}).input_ids()
    return out - set(required)


def node_args(node: Node, done: Mapping[str, Artifact]) -> list[Any]:
    """A node's input artifacts in the planned order; census pools that did not finish are left
    out of their mapping (:func:`optional_inputs`)."""
    return [{k: done[v] for k, v in ref.items() if v in done} if name in CENSUS_INPUTS and isinstance(ref, dict)
            else _resolve(ref, done) for name, ref in node.inputs.items()]


def run_node(node: Node, done: Mapping[str, Artifact]) -> Artifact:
    """Run one node through ``raugment.<stage>.run(cfg, *inputs)`` (:func:`node_args`)."""
    module = importlib.import_module(f"raugment.stages.{node.stage}.stage")
    return module.run(node.cfg, *node_args(node, done))


def _describe(node: Node) -> str:
    lab = node.labels
    parts = [node.stage]
    if lab.get("method"):
        parts.append(str(lab["method"]))
    if lab.get("checkpoint"):  # a checkpoint-selection run
        parts.append(f"checkpoint {lab['checkpoint']}")
    if "ratio" in lab and lab.get("method") != "baseline":
        parts.append(f"{lab['ratio']:g}%")
    if "set_index" in lab:
        parts.append(f"set {lab['set_index']}")
    if "seed" in lab and lab.get("seed") != lab.get("set_index"):
        parts.append(f"seed {lab['seed']}")
    if lab.get("dataset") not in (None, "default"):
        parts.insert(0, f"[{lab['dataset']}]")
    return " ".join(parts)


def _summary(artifact: Artifact) -> str:
    stats = artifact.stats
    counts = ", ".join(f"{k}={v}" for k, v in sorted(stats.get("counts", {}).items())) or "-"
    failures = stats.get("failures", {})
    failed = sum(failures.values())
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1])[:4])
    return (f"{counts}; {failed} failed{' (' + reasons + ')' if failed else ''}; "
            f"wall {stats.get('wall_s', 0):.1f} s, cpu {stats.get('cpu_s', 0):.1f} s, "
            f"gpu {stats.get('gpu_s', 0):.1f} s")


def deferred_order(nodes: list[Node], deferred: tuple[str, ...] | list[str]) -> list[Node]:
    """A topological order that runs nodes of the ``deferred`` stages only when nothing else is
    ready (plan order otherwise), so trainings come together at the end unless a node needs them."""
    order = topological(nodes)
    ids = {n.id for n in order}
    placed: set[str] = set()
    out: list[Node] = []
    while order:
        ready = [n for n in order if all(i in placed or i not in ids for i in n.input_ids())]
        node = next((n for n in ready if n.stage not in deferred), ready[0])
        order.remove(node)
        placed.add(node.id)
        out.append(node)
    return out


class Executor:
    """Runs nodes in plan order, records them in the state file, logs one line per stage run.

    With ``keep_going`` a stage run that raises is recorded in :attr:`failed` (with the reason)
    and everything downstream of it is left out, while the rest of the study goes on (the paper
    too drops what retrieval could not fill); otherwise the error ends the study. Either way
    every finished stage is kept, and a re-run retries only what is missing.
    """

    def __init__(self, root: Path, state: dict[str, str], keep_going: bool = True):
        self.root = root
        self.state = state
        self.keep_going = keep_going
        self.done: dict[str, Artifact] = {}
        self.failed: dict[str, str] = {}
        self._lock = threading.Lock()

    def run(self, nodes: list[Node], parallel: int = 1,
            parallel_stages: tuple[str, ...] | list[str] = ("train",)) -> None:
        """Run ``nodes`` (those not done yet), inputs first, ``parallel_stages`` as late as possible.

        Up to ``parallel`` runs of ``parallel_stages`` are in flight at once (threads; each stage
        takes its own Ray resources); any other node first waits for its inputs still running.
        Deferring the parallel stages (training) lets them reuse warm worker groups back to back;
        idle groups are shut down before any other stage runs, so their CPUs never starve a Ray
        Data pool.
        """
        todo = [n for n in deferred_order(nodes, parallel_stages) if n.id not in self.done]
        counter = iter(range(1, len(todo) + 1))
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="study") as pool:
            running: dict[str, Future] = {}
            for node in todo:
                for dep in node.input_ids():
                    if dep in running:
                        running.pop(dep).result()
                if node.stage not in POOL_SAFE_STAGES:  # idle actor pools must not hold its CPUs
                    release_idle_pools()
                if parallel > 1 and node.stage in parallel_stages:
                    running[node.id] = pool.submit(self._one, node, counter, len(todo))
                else:
                    if node.stage not in parallel_stages:
                        release_idle()
                    self._one(node, counter, len(todo))
            for future in running.values():
                future.result()

    def _one(self, node: Node, counter: Iterator[int], total: int) -> None:
        optional = optional_inputs(node)
        failed_inputs = [i for i in node.input_ids() if i in self.failed and i not in optional]
        if failed_inputs:
            with self._lock:
                self.failed[node.id] = f"input {failed_inputs[0]} failed"
                log.warning("study [%d/%d] %s: left out, an input failed", next(counter), total,
                            _describe(node))
            return
        t0 = time.time()
        try:
            artifact = run_node(node, self.done)
        except Exception as exc:
            if not self.keep_going:
                raise
            with self._lock:
                self.failed[node.id] = f"{type(exc).__name__}: {exc}"
                log.error("study [%d/%d] %s: FAILED -- %s", next(counter), total, _describe(node),
                          self.failed[node.id])
            return
        skipped = (artifact.path / SUCCESS).stat().st_mtime < t0
        what = "skipped, already complete" if skipped else f"done in {time.time() - t0:.1f} s"
        with self._lock:
            self.done[node.id] = artifact
            _record(self.root, self.state, node, artifact)
            log.info("study [%d/%d] %s: %s -- %s [%s]", next(counter), total, _describe(node),
                     what, _summary(artifact), artifact.path)


def write_index(cfg: Config, plan: Plan, done: Mapping[str, Artifact],
                failed: Mapping[str, str] | None = None) -> Artifact:
    """The study artifact: table ``runs`` (one row per finished classifier) and ``plan.json``
    (every stage run, with the reasons of those that failed)."""
    root = Path(cfg.run.root).resolve()

    def rel(nid: str) -> str:
        return str(done[nid].path.relative_to(root))

    rows = []
    for r in plan.runs:
        if r.train not in done:
            continue
        dataset_id = str(plan.nodes[r.train].inputs["dataset"])
        artifacts = {"dataset": rel(dataset_id), "assemble": rel(r.assemble), "train": rel(r.train),
                     **{role: rel(nid) for role, nid in r.artifacts.items()}}
        rows.append({S.DATASET: r.dataset, S.METHOD: r.method, S.RATIO: float(r.ratio),
                     S.SET_INDEX: r.set_index, S.SEED: r.seed,
                     S.ARTIFACTS: json.dumps(artifacts, sort_keys=True)})
    for nid, art in done.items():
        if nid in plan.nodes:
            plan.nodes[nid].path = str(art.path.relative_to(root))
    plan_data = plan_to_dict(plan)
    plan_data["failed"] = [{"id": nid, "stage": plan.nodes[nid].stage, "labels": plan.nodes[nid].labels,
                            "reason": reason} for nid, reason in sorted((failed or {}).items())]
    # Where and how fast the study runs does not change what it found: keep those out of the key.
    study_section = {k: v for k, v in to_dict(cfg.study).items()
                     if k not in ("node_gpus", "node_cpus", "parallel", "parallel_stages", "costs",
                                  "keep_going")}
    section = {"study": study_section,
               "runs": [[r[S.DATASET], r[S.METHOD], r[S.RATIO], r[S.SET_INDEX], r[S.SEED], r[S.ARTIFACTS]]
                        for r in rows],
               "failed": sorted(failed or {})}

    def body(run: StageRun) -> None:
        run.write(S.to_table(rows, S.STUDY_RUNS), "runs", shard="0")
        write_text_atomic(json.dumps(plan_data, indent=1, default=str), run.path / "plan.json")
        run.stats.add("classifiers", len(rows))
        run.stats.add("stage_runs", len(plan.nodes))

    return run_stage(root, "study", section, {}, body)


def check_methods(cfg: Config) -> None:
    """Every study method is a known method or a variant of one (before planning names a stage):
    ``retrieval``, a registered generation method or a registered fine-tuning method."""
    PreflightError.raise_if(method_problems(cfg))


def method_problems(cfg: Config) -> list[ValueError]:
    """One error per study method that is neither known nor a variant of a known one."""
    from raugment.study.planner import method_pipeline, unknown_method

    problems: list[ValueError] = []
    for i, method in enumerate(cfg.study.methods):
        base = cfg.study.variants.get(method, {}).get("method", method)
        if method_pipeline(base) is None:
            problems.append(unknown_method(f"study.variants.{method}.method" if method in cfg.study.variants
                                           else f"study.methods[{i}]", base))
    return problems


def preflight(cfg: Config) -> Plan:
    """Every check that needs neither Ray nor a model, for every stage the study will run.

    Runs before anything is written or started, so a bad key, an unknown name, a missing path or
    an unreadable index is a clear error and leaves nothing behind. Each stage module may define
    ``preflight(cfg)``; it is called once per distinct stage config of the plan.

    Returns:
        The plan with expected sizes (the real plan is made after the dataset stages).

    Raises:
        ConfigError, InputError: the one problem found; :class:`PreflightError` listing all of
            them when there are several.
    """
    plan, problems = preflight_problems(cfg)
    PreflightError.raise_if(problems)
    assert plan is not None  # no problem means the plan was built
    return plan


def preflight_problems(cfg: Config) -> tuple[Plan | None, list[ValueError]]:
    """The plan with expected sizes (None when it cannot be built) and every problem preflight
    finds: unknown methods, then each stage run's own checks (:func:`check_plan`). The stages are
    checked over a plan of the known methods, so a misspelt method hides no other problem."""
    problems = method_problems(cfg)
    try:
        planned = known_methods_only(cfg) if problems else cfg
        # Sizes only scale quotas and costs; before the dataset stage runs, a placeholder will do.
        plan = build_plan(planned, {name: DatasetSize(1, 1, 1) for name in dataset_configs(planned)})
    except (ConfigError, InputError) as exc:
        problems.append(exc)
        return None, problems
    problems.extend(plan_problems(plan))
    return plan, problems


def known_methods_only(cfg: Config) -> Config:
    """``cfg`` without the study methods no registry knows (what preflight can still check)."""
    from raugment.core.config import with_overrides

    bad = {str(p).split(":", 1)[0] for p in method_problems(cfg)}
    keep = [m for i, m in enumerate(cfg.study.methods)
            if f"study.methods[{i}]" not in bad and f"study.variants.{m}.method" not in bad]
    return with_overrides(cfg, {"study.methods": keep})


def check_plan(plan: Plan) -> None:
    """:func:`check_node` once per distinct stage config of ``plan`` (given artifacts are not run:
    they are not checked); every problem found is reported (:class:`PreflightError`)."""
    PreflightError.raise_if(plan_problems(plan))


def plan_problems(plan: Plan) -> list[ValueError]:
    """The problems :func:`check_node` finds over ``plan``, each message once, in stage order."""
    seen: set[tuple[str, str]] = set()
    problems: list[ValueError] = []
    messages: set[str] = set()
    for node in topological(list(plan.nodes.values())):
        key = (node.stage, canonical_json(to_dict(node.cfg)))
        if node.given is None and key not in seen:
            seen.add(key)
            try:
                check_node(node)
            except (ConfigError, InputError) as exc:
                for problem in exc.problems if isinstance(exc, PreflightError) else [exc]:
                    if str(problem) not in messages:
                        messages.add(str(problem))
                        problems.append(problem)
    return problems


def node_problems(node: Node) -> list[ValueError]:
    """What :func:`check_node` finds: the stage's own preflight and its resource requests, each
    checked even when the other fails."""
    from raugment.runtime.cluster import check_resources

    check = getattr(importlib.import_module(f"raugment.stages.{node.stage}.stage"), "preflight", None)
    problems: list[ValueError] = []
    for step in (lambda: check(node.cfg) if check is not None else None,
                 lambda: check_resources(node.cfg.cluster, getattr(node.cfg, node.stage, None), node.stage)):
        try:
            step()
        except PreflightError as exc:
            problems.extend(exc.problems)
        except (ConfigError, InputError) as exc:
            problems.append(exc)
    return problems


def check_node(node: Node) -> None:
    """A stage run's own ``preflight(cfg)`` (when its module has one) and its resource requests."""
    PreflightError.raise_if(node_problems(node))


def run(cfg: Config, report: bool = True) -> tuple[Artifact, Artifact | None]:
    """Run the whole study (resuming whatever is finished) and, by default, its report.

    Order: :func:`preflight` (no Ray, nothing written), the dataset stages (no Ray either; their
    listing finds empty or duplicate classes), then the plan. Ray is started by the first stage
    that needs it (each calls ``cluster.init_ray``), so a re-run that skips every stage never
    starts it.

    Returns:
        (study artifact, report artifact or None).
    """
    preflight(cfg)
    root = Path(cfg.run.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # The dataset stages first (a failure there ends the study): quotas depend on their counts.
    datasets = dataset_nodes(cfg)
    first = Executor(root, read_state(root), keep_going=False)
    first.run(datasets)
    sizes = {n.labels["dataset"]: measured_size(first.done[n.id]) for n in datasets}
    plan = build_plan(cfg, sizes)
    write_text_atomic(dump_yaml(cfg), root / STATE_DIR / "config.yaml")
    log.info("study plan: %d stage runs, %d classifiers", len(plan.nodes), len(plan.runs))
    ex = Executor(root, first.state, keep_going=cfg.study.keep_going)
    ex.done.update(first.done)
    # trainings reuse worker groups, generate/filter/index runs their actor pools; all are shut
    # down before the report
    with keep_groups(), keep_pools():
        ex.run(list(plan.nodes.values()), cfg.study.parallel, cfg.study.parallel_stages)
    study = write_index(cfg, plan, ex.done, ex.failed)
    log.info("study index: %s", study.path)
    if ex.failed:
        log.error("study: %d stage runs failed or were left out (see the report); re-run to retry "
                  "them", len(ex.failed))
    rep = None
    if report and study.read("runs").num_rows == 0:  # every classifier failed: nothing to compare
        failed = failures(study)
        cause = next((f for f in failed if "input failed" not in f["reason"]), failed[0] if failed else None)
        log.error("study: no classifier finished, so there is no report; %d stage runs failed or were left "
                  "out (listed in %s)%s", len(failed), study.path / "plan.json",
                  f"; the first cause: {cause['stage']} {cause['labels']}: {cause['reason']}" if cause else "")
    elif report:
        from raugment.stages.report import stage as report_mod

        rep = report_mod.run(cfg, study)
    return study, rep


def cli(cfg: Config, args) -> int:
    """``raugment run [study.yaml] [--dry-run]``."""
    if getattr(args, "dry_run", False):
        return dry_run(cfg)
    study, rep = run(cfg)
    if rep is not None:
        print(f"report: {rep.path / 'report.html'}")
    return 1 if failures(study) else 0


def dry_run(cfg: Config) -> int:
    """``--dry-run``: print the plan (costs can be read before the data is there), then every
    problem the real run's preflight would stop on; 2 when there is any, else 0. Nothing is
    written and Ray is not started."""
    import sys

    _, problems = preflight_problems(cfg)
    try:
        known = known_methods_only(cfg) if method_problems(cfg) else cfg
        print(format_plan(plan_study(known)))
    except (ConfigError, InputError) as exc:
        if str(exc) not in {str(p) for p in problems}:
            problems.append(exc)
    for problem in problems:
        kind = "input error" if isinstance(problem, InputError) else "config error"
        print(f"raugment run: {kind}: {problem}", file=sys.stderr)
    if problems:
        print(f"raugment run: preflight found {len(problems)} problem(s); the run would stop before "
              "starting anything", file=sys.stderr)
        return 2
    return 0


def failures(study: Artifact) -> list[dict[str, Any]]:
    """The stage runs of a study that failed or were left out, with their reasons."""
    plan = json.loads((study.path / "plan.json").read_text())
    return plan.get("failed", [])
