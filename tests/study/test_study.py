import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from raugment.config import load_config
from raugment.core.storage import Artifact
from raugment.study.executor import read_state
from tests import REPO

# The smallest study that has every kind of stage run: dataset, a generation pool with its
# filter / dedup / audit, assemble and train, for the baseline and one method.
SMALL = {
    "dataset": {"source": "synthetic", "protocol": "subsample", "fraction": 0.5,
                "synthetic": {"num_classes": 2, "train_per_class": 12, "test_per_class": 4, "size": 32}},
    "generate": {"height": 32, "width": 32, "steps": 2, "image_format": "PNG",
                 "pool": {"concurrency": 1, "num_cpus": 0.5, "num_gpus": 0, "batch_size": 8}},
    "filter": {"filters": ["min_size"], "min_side": 16},
    "audit": {"gallery_limit": 10, "thumb_side": 32},
    "train": {"model": "tiny_cnn", "batch_size": 8, "max_epochs": 2, "image_size": 32, "loader_workers": 0,
              "workers": {"num_workers": 1, "cpus_per_worker": 0.5}},
    "study": {"methods": ["simple"], "ratios": [100], "sets": 1, "pool_factor": 1.0},
    "run": {"progress": False},
}


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)  # Ray's own JSON schema (ray/autoscaler/ray-schema.json), offline
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and config["head_node_type"] == "head"
    assert types["cpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["min_workers"] == 0
    assert any("pip install" in c and "raugment" in c for c in config["setup_commands"])
    raw["available_node_types"]["gpu_worker"]["max_wrokers"] = 2  # a typo must not pass
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(raw))


def test_submitted_job_finds_the_package():
    # `ray job submit --working-dir .` runs the command in the uploaded directory: the same as this.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "jobs.study", "--help"], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0 and "--dry-run" in out.stdout
    # every job script runs a command of the CLI, and every stage command has its script
    from raugment.cli import COMMANDS
    from raugment.study.target import TARGETS

    commands = {p.stem: re.search(r'main\(\["([a-z-]+)"', p.read_text()).group(1)
                for p in (REPO / "jobs").glob("*.py") if p.name != "__init__.py"}
    assert set(commands.values()) <= set(COMMANDS) and set(TARGETS) <= set(commands.values())
    presets = sorted(p.name for p in (REPO / "jobs" / "configs").glob("*.yaml"))
    for name in ("caltech256.yaml", "demo.yaml", "imagenet10.yaml", "imagenet_full.yaml"):
        assert name in presets
        load_config(REPO / "jobs" / "configs" / name)  # every preset is a valid config


def _write_config(path: Path, root: Path, address: str | None = None) -> Path:
    data = json.loads(json.dumps(SMALL))
    data["run"]["root"] = str(root)
    if address:
        data["cluster"] = {"address": address}
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_sd(tmp: Path) -> str:
    from raugment.demo.tiny import write_tiny_bundles

    return str(write_tiny_bundles(tmp, parts=["sd"])["sd"].resolve())


def _comparable(report_dir: Path) -> dict:
    data = json.loads((report_dir / "report.json").read_text())
    data.pop("costs")  # wall/CPU seconds differ between runs; everything else must not
    for row in data["cost_per_image"]:  # the same pool images, measured hours apart
        for key in [k for k in row if k.endswith("_h") or k.endswith("_per_1000")]:
            row.pop(key)
    return data


# ---- the runner on stand-in stages (no Ray): resume after a crash, sharing, skip lines ----------

def _png(label: int, i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * label, 10 * i, 90)).save(buf, format="PNG")
    return buf.getvalue()


class Killed(BaseException):
    """Like a kill: not an ``Exception``, so ``study.keep_going`` does not catch it."""


class FakeStages:
    """Stand-ins for the stage modules, written through the real stage contract (run_stage).

    Results depend only on the config and inputs, so two runs of a study must agree; ``crash_at``
    makes the n-th stage run raise, like a killed process.
    """

    def __init__(self, crash_at: int | None = None, fail_stage: str | None = None):
        self.calls: list[str] = []
        self.crash_at = crash_at
        self.fail_stage = fail_stage

    def __call__(self, node, done):
        from raugment.study.executor import node_args

        self.calls.append(node.stage)
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise Killed()
        if node.stage == self.fail_stage and node.labels.get("ratio") == 200.0:
            raise ValueError("not enough images to resample")
        return getattr(self, node.stage)(node.cfg, *node_args(node, done))

    @staticmethod
    def _images(run, method, split, n=3):
        from raugment.core import schema as S

        rows = [{S.ID: f"{method}-{label}-{i}", S.LABEL: label, S.CLASS_NAME: f"class {label}",
                 S.SPLIT: split, S.METHOD: method, S.IMAGE: _png(label, i)}
                for label in range(2) for i in range(n)]
        run.write(S.to_table(rows), "images", shard="0")
        run.stats.add("images", len(rows))

    def dataset(self, cfg):
        from raugment.core.storage import run_stage

        return run_stage(cfg.run.root, "dataset", cfg.dataset, {},
                         lambda r: self._images(r, "original", "train"))

    def generate(self, cfg, dataset, finetune):
        from raugment.core.storage import run_stage

        return run_stage(cfg.run.root, "generate", cfg.generate, {"dataset": dataset},
                         lambda r: self._images(r, cfg.generate.method, "added", 4))

    def filter(self, cfg, added):
        from raugment.core.storage import run_stage

        def body(r):
            self._images(r, "simple", "added", 4)
            r.stats.fail("nsfw", 1)
        return run_stage(cfg.run.root, "filter", cfg.filter, {"added": added}, body)

    def dedup(self, cfg, added):
        from raugment.core.storage import run_stage

        return run_stage(cfg.run.root, "dedup", cfg.dedup, {f"a{i}": a for i, a in enumerate(added)},
                         lambda r: self._images(r, "simple", "added", 3))

    def audit(self, cfg, dataset, added):
        from raugment.core.storage import run_stage, write_text_atomic

        def body(r):
            write_text_atomic(json.dumps({"candidates": 0, "leakage_rate": 0.0}), r.path / "summary.json")
            write_text_atomic("<html></html>", r.path / "gallery.html")
        return run_stage(cfg.run.root, "audit", cfg.audit, {"dataset": dataset, "a0": added[0]}, body)

    def assemble(self, cfg, dataset, added, audit, census=None, census_audit=None):
        from raugment.core.storage import run_stage

        inputs = {"dataset": dataset, **{k: v for k, v in added.items()}}
        return run_stage(cfg.run.root, "assemble", cfg.assemble, inputs, lambda r: r.stats.add("images", 1))

    def train(self, cfg, dataset, manifest):
        import pyarrow.parquet as pq

        from raugment.core import schema as S
        from raugment.core.config import section_hash
        from raugment.core.storage import run_stage, write_text_atomic

        def body(r):
            # a "result" that depends on what was trained on, and on nothing else
            h = int(section_hash(cfg.train, {"m": manifest.key}), 16)
            top1 = 0.5 + (h % 400) / 1000
            write_text_atomic(json.dumps({S.TEST_TOP1: top1, S.TEST_TOP5: 1.0, S.VAL_TOP1_BEST: top1}),
                              r.path / "results.json")
            rows = [{S.LABEL: k, S.CLASS_NAME: f"class {k}", S.N_TEST: 10, S.ACC_TOP1: top1 - 0.1 * k,
                     S.ACC_TOP5: 1.0} for k in range(2)]
            pq.write_table(S.to_table(rows, S.RESULTS_PER_CLASS), r.path / "results_per_class.parquet")
        return run_stage(cfg.run.root, "train", cfg.train, {"dataset": dataset, "manifest": manifest}, body)


def _fake_cfg(root):
    return load_config(None, [f"run.root={root}", "study.methods=[simple]", "study.ratios=[100, 200]",
                              "study.sets=2", "run.progress=false"])


def test_crashed_study_resumes_without_redoing_work_and_reports_the_same(fake_stages, tmp_path, caplog):
    from raugment.study import executor as study

    whole = fake_stages(FakeStages())
    _, rep_a = study.run(_fake_cfg(tmp_path / "a"))
    # 1 dataset + generate/filter/dedup/audit + (2 baseline + 2 ratios x 2 sets) x (assemble + train)
    assert len(whole.calls) == 1 + 4 + 2 * (2 + 4)
    fake_stages(FakeStages(crash_at=9))
    with pytest.raises(Killed):
        study.run(_fake_cfg(tmp_path / "b"))
    finished = read_state(tmp_path / "b")
    assert len(finished) == 8
    fake_stages(FakeStages())
    caplog.set_level("INFO", logger="raugment.study.executor")
    _, rep_b = study.run(_fake_cfg(tmp_path / "b"))
    # the resumed run redid only what the crash left undone ...
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study [")]
    assert sum("skipped, already complete" in x for x in lines) == 8
    assert sum(" done in " in x for x in lines) == len(whole.calls) - 8
    assert _comparable(rep_b.path) == _comparable(rep_a.path)  # ... and reports the same
    assert rep_b.path.relative_to(tmp_path / "b") == rep_a.path.relative_to(tmp_path / "a")
    # a further run: every stage says it was already complete
    again = fake_stages(FakeStages())
    caplog.clear()
    study.run(_fake_cfg(tmp_path / "b"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study [")]
    assert len(lines) == len(whole.calls) and all("skipped, already complete" in x for x in lines)
    assert len(again.calls) == len(whole.calls)  # asked, and each stage skipped by its key


def test_a_failed_stage_leaves_out_its_dependents_and_the_study_goes_on(fake_stages, tmp_path, capsys):
    from raugment.cli import main
    from raugment.study import executor as study

    fake_stages(FakeStages(fail_stage="assemble"))
    assert main(["run", "--set", f"run.root={tmp_path}", "--set", "study.methods=[simple]",
                 "--set", "study.ratios=[100, 200]", "--set", "study.sets=2"]) == 1
    rep = Path(capsys.readouterr().out.split("report:")[1].split()[0]).parent
    data = json.loads((rep / "report.json").read_text())
    ds = data["datasets"]["default"]
    assert set(ds["table"]["simple"]) == {"100"}  # the 200 % runs are missing, the rest is there
    assert ds["table"]["baseline"]["0"]["test_top1"]["n"] == 2
    failed = {(f["stage"], f["labels"].get("set_index")): f["reason"] for f in data["failed"]}
    assert failed[("assemble", 0)] == "ValueError: not enough images to resample"
    assert failed[("train", 1)].startswith("input assemble-")
    assert len(failed) == 4
    assert "Failed or left-out stage runs" in (rep / "report.md").read_text()
    # with keep_going off, the first failure ends the study
    fake_stages(FakeStages(fail_stage="assemble"))
    cfg = load_config(None, [f"run.root={tmp_path / 'strict'}", "study.methods=[simple]",
                             "study.ratios=[200]", "study.sets=1", "study.keep_going=false"])
    with pytest.raises(ValueError, match="not enough images"):
        study.run(cfg)


def test_parallel_training_gives_the_same_study(fake_stages, tmp_path):
    from raugment.study import executor as study

    fake_stages(FakeStages())
    _, rep_a = study.run(_fake_cfg(tmp_path / "a"))
    fake_stages(FakeStages())
    cfg = load_config(None, [f"run.root={tmp_path / 'p'}", "study.methods=[simple]", "study.ratios=[100, 200]",
                             "study.sets=2", "study.parallel=3"])
    _, rep_p = study.run(cfg)
    assert _comparable(rep_p.path) == _comparable(rep_a.path)


# ---- shortfalls: a class that filter + dedup left short is left out, the study completes ----------

class ShortfallStages(FakeStages):
    """FakeStages whose dedup leaves class 1 one image short of its quota (2 of 3), with the real
    assemble stage; the stand-in train scores the classes its manifest holds, as train does."""

    def dataset(self, cfg):
        from raugment.core import schema as S
        from raugment.core.storage import run_stage

        def body(r):
            self._images(r, "original", "train")
            r.write_single(S.to_table([{S.LABEL: k, S.CLASS_ID: str(k), S.CLASS_NAME: f"class {k}", S.COUNT_TRAIN: 3}
                                       for k in range(2)],
                                      S.CLASSES), "classes")
        return run_stage(cfg.run.root, "dataset", cfg.dataset, {}, body)

    def dedup(self, cfg, added):
        from raugment.core import schema as S
        from raugment.core.storage import run_stage

        def body(r):
            rows = [{S.ID: f"simple-{label}-{i}", S.LABEL: label, S.CLASS_NAME: f"class {label}", S.SPLIT: "added",
                     S.SOURCE: "generated", S.METHOD: "simple", S.IMAGE: _png(label, i)}
                    for label, n in ((0, 3), (1, 2)) for i in range(n)]
            r.write(S.to_table(rows), "images", shard="0")
        return run_stage(cfg.run.root, "dedup", cfg.dedup, {f"a{i}": a for i, a in enumerate(added)}, body)

    def assemble(self, cfg, dataset, added, audit, census=None, census_audit=None):
        from raugment.stages.assemble import stage as assemble

        census_args = [census, census_audit] if census is not None else []  # as the plan gives them
        return assemble.run(cfg, dataset, added, audit, *census_args)

    def train(self, cfg, dataset, manifest):
        from raugment.core import schema as S
        from raugment.core.storage import run_stage, write_text_atomic

        def body(r):
            labels = sorted(set(manifest.read("manifest").column(S.LABEL).to_pylist()))
            write_text_atomic(json.dumps({S.TEST_TOP1: 0.5, S.TEST_TOP5: 1.0, S.VAL_TOP1_BEST: 0.5}),
                              r.path / "results.json")
            rows = [{S.LABEL: k, S.CLASS_NAME: f"class {k}", S.N_TEST: 10, S.ACC_TOP1: 0.5, S.ACC_TOP5: 1.0}
                    for k in labels]
            r.write_single(S.to_table(rows, S.RESULTS_PER_CLASS), "results_per_class")
        return run_stage(cfg.run.root, "train", cfg.train, {"dataset": dataset, "manifest": manifest}, body)


def test_a_class_that_filter_and_dedup_left_short_is_left_out_and_the_study_completes(fake_stages, tmp_path):
    from raugment.study import executor as study

    fake_stages(ShortfallStages())
    cfg = load_config(None, [f"run.root={tmp_path}", "study.methods=[simple]", "study.ratios=[100]",
                             "study.sets=2", "run.progress=false"])
    index, rep = study.run(cfg)
    assert study.failures(index) == []  # no classifier failed over the missing image
    runs = index.read("runs").to_pylist()
    assert Counter(r["method"] for r in runs) == {"baseline": 2, "simple": 2}
    for r in runs:  # the baseline too: every classifier trains and scores on class 0 only
        manifest = Artifact.open(tmp_path / json.loads(r["artifacts"])["assemble"]).read("manifest")
        assert set(manifest.column("label").to_pylist()) == {0}
    ds = _report(rep)
    assert ds["shortfalls"]["excluded"] == {"class 1": ["simple: 2 of 3 images at 100 %"]}
    md = (rep.path / "report.md").read_text()
    assert "1 class(es) left out of every classifier" in md and "class 1 (simple: 2 of 3 images" in md
    assert "(the baseline's too) leaves out 1 class(es) that a method could not fill: class 1" in md
    # allow: the method uses what there is, the baseline keeps both classes
    fake_stages(ShortfallStages())
    cfg = load_config(None, [f"run.root={tmp_path / 'allow'}", "study.methods=[simple]", "study.ratios=[100]",
                             "study.sets=1", "run.progress=false", "study.shortfall=allow"])
    index, rep = study.run(cfg)
    assert study.failures(index) == []
    assert [(r["class_name"], r["available"], r["action"]) for r in _report(rep)["shortfalls"]["rows"]] == \
        [("class 1", 2, "allowed")]
    # fail: today's behaviour, one line naming the class
    fake_stages(ShortfallStages())
    cfg = load_config(None, [f"run.root={tmp_path / 'fail'}", "study.methods=[simple]", "study.ratios=[100]",
                             "study.sets=1", "run.progress=false", "study.shortfall=fail"])
    index, _ = study.run(cfg)
    (failed,) = [f for f in study.failures(index) if f["stage"] == "assemble"]
    assert "'class 1' (label 1): simple has 2 of 3" in failed["reason"]


class FailingMethodStages(ShortfallStages):
    def generate(self, cfg, dataset, finetune):
        if cfg.generate.method == "clip_templates":
            raise ValueError("the diffusion model ran out of memory")
        return super().generate(cfg, dataset, finetune)


def test_a_failed_method_does_not_take_the_other_classifiers_down_through_the_census(fake_stages, tmp_path):
    from raugment.study import executor as study

    fake_stages(FailingMethodStages())
    cfg = load_config(None, [f"run.root={tmp_path}", "study.methods=[simple, clip_templates]", "study.ratios=[100]",
                             "study.sets=1", "run.progress=false"])
    index, rep = study.run(cfg)
    assert Counter(r["method"] for r in index.read("runs").to_pylist()) == {"baseline": 1, "simple": 1}
    failed = {(f["stage"], f["labels"].get("method")) for f in study.failures(index)}
    assert ("generate", "clip_templates") in failed and ("train", "clip_templates") in failed
    assert not {m for _, m in failed} & {"baseline", "simple"}
    assert _report(rep)["shortfalls"]["excluded"] == {"class 1": ["simple: 2 of 3 images at 100 %"]}


class FailingTrainStages(FakeStages):
    def train(self, cfg, dataset, manifest):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_study_whose_every_classifier_failed_ends_in_one_error_line_not_a_report_crash(
        fake_stages, tmp_path, caplog):
    """Issue 18: when every classifier fails (a model that does not load, say), the report stage
    used to crash on an uncaught "has no runs"; now the study ends with one error line naming the
    cause, the failures stay listed in plan.json, and the CLI exits 1."""
    from raugment.study import executor as study

    fake_stages(FailingTrainStages())
    cfg = load_config(None, [f"run.root={tmp_path}", "study.methods=[simple]", "study.ratios=[100]",
                             "study.sets=1", "run.progress=false"])
    with caplog.at_level("ERROR"):
        index, rep = study.run(cfg)
    assert rep is None and index.read("runs").num_rows == 0
    assert {f["stage"] for f in study.failures(index)} == {"train"}
    line = next(r.getMessage() for r in caplog.records if "no classifier finished" in r.getMessage())
    assert "illegal memory access" in line and "plan.json" in line


# ---- checkpoint selection on stand-in stages: planted scores, the choice, resume, report ---------

class SelectionStages(FakeStages):
    """FakeStages plus a fine-tuning stand-in (epochs 1-3; ``finetuned.TAGS``) and the real
    select stage. A classifier trained on images generated from snapshot ``e`` gets the planted
    validation top-1 ``planted[e]``; ``bodies`` counts the stage runs that did work, by stage."""

    def __init__(self, planted: dict[int, float], **kw):
        super().__init__(**kw)
        self.planted = planted
        self.bodies: Counter = Counter()

    def finetune(self, cfg, dataset):
        from raugment.core.storage import run_stage
        from tests.helpers.finetuned import fill

        def body(r):
            self.bodies["finetune"] += 1
            fill(r)
        return run_stage(cfg.run.root, "finetune", cfg.finetune, {"dataset": dataset}, body)

    def select(self, cfg, finetune, scores=None):
        from raugment.stages.select import stage as select

        return select.run(cfg, finetune, scores)

    def generate(self, cfg, dataset, finetune):
        from raugment.core.storage import run_stage, write_text_atomic
        from raugment.lib.finetuned.artifact import resolve

        def body(r):
            self.bodies["generate"] += 1
            self._images(r, cfg.generate.method, "added", 4)
            if finetune is not None:  # which snapshot these images come from
                write_text_atomic(resolve(finetune.path)[1].name, r.path / "snapshot.txt")
        inputs = {"dataset": dataset, **({"finetune": finetune} if finetune is not None else {})}
        return run_stage(cfg.run.root, "generate", cfg.generate, inputs, body)

    def train(self, cfg, dataset, manifest):
        import yaml

        from raugment.core import schema as S
        from raugment.core.storage import run_stage, write_text_atomic

        def body(r):
            self.bodies["train"] += 1
            # the score of the snapshot behind the manifest (assemble -> generate -> snapshot.txt)
            inputs = yaml.safe_load((manifest.path / "config.yaml").read_text())["input_paths"]
            snaps = [Path(p) / "snapshot.txt" for p in inputs.values() if (Path(p) / "snapshot.txt").exists()]
            top1 = self.planted[int(snaps[0].read_text().split("_")[1])] if snaps else 0.5
            write_text_atomic(json.dumps({S.TEST_TOP1: top1, S.TEST_TOP5: 1.0, S.VAL_TOP1_BEST: top1}),
                              r.path / "results.json")
            rows = [{S.LABEL: k, S.CLASS_NAME: f"class {k}", S.N_TEST: 10, S.ACC_TOP1: top1, S.ACC_TOP5: 1.0}
                    for k in range(2)]
            r.write_single(S.to_table(rows, S.RESULTS_PER_CLASS), "results_per_class")
        return run_stage(cfg.run.root, "train", cfg.train, {"dataset": dataset, "manifest": manifest}, body)


def _selection_cfg(root, *overrides):
    return load_config(None, [f"run.root={root}", "study.methods=[simple, ft_conditioning]", "study.ratios=[100]",
                              "study.sets=1", "run.progress=false", *overrides])


def _report(rep):
    return json.loads((rep.path / "report.json").read_text())["datasets"]["default"]


@pytest.mark.parametrize("planted, chosen, parallel", [
    ({1: 0.4, 2: 0.8, 3: 0.5}, "epoch_002", 1),
    ({1: 0.4, 2: 0.8, 3: 0.8}, "epoch_002", 3),  # a tie keeps the earlier epoch; trained 3 at a time
    ({1: 0.9, 2: 0.3, 3: 0.1}, "best_val", 3),   # best_val is epoch 1 (first in name order)
])
def test_study_selects_the_checkpoint_of_the_best_scoring_classifier(fake_stages, tmp_path, caplog, planted,
                                                                     chosen, parallel):
    from raugment.study import executor as study

    stages = fake_stages(SelectionStages(planted))
    cfg = _selection_cfg(tmp_path, f"study.parallel={parallel}")
    _, rep = study.run(cfg)
    # 5 candidate names (best_train, best_val, epochs 1-3) over 3 snapshots: each generated and
    # scored once, plus the method pools (simple, ft) and the study's 3 classifiers
    assert stages.bodies == {"finetune": 1, "generate": 3 + 2, "train": 3 + 3}
    data = _report(rep)["checkpoints"]
    assert set(data) == {"ft_conditioning"}  # only the fine-tuned method
    sel = data["ft_conditioning"]
    assert sel["selection"] == "scored" and sel["checkpoint"] == chosen
    epoch_of = {"best_train": 3, "best_val": 1, "epoch_001": 1, "epoch_002": 2, "epoch_003": 3}
    assert {c["name"]: c["val_top1"] for c in sel["candidates"]} == {n: planted[e] for n, e in epoch_of.items()}
    # the method's pool was generated from the chosen snapshot
    root = tmp_path.resolve()
    run = next(r for r in _study_runs(root) if r["method"] == "ft_conditioning")
    assert (root / run["artifacts"]["source"] / "snapshot.txt").read_text() == f"epoch_{epoch_of[chosen]:03d}"
    # the costs count each stage run once: 3 scoring classifiers + the study's one for the method
    costs = json.loads((rep.path / "report.json").read_text())["costs"]
    assert [c["runs"] for c in costs if (c["method"], c["stage"]) == ("ft_conditioning", "train")] == [4]
    plan = study.plan_study(cfg)
    cands = [n for n in plan.by_stage("train") if "checkpoint" in n.labels]
    assert len(cands) == 5 and sum(n.cost == "measured" for n in cands) == 5
    assert len({n.path for n in cands}) == 3  # 5 names, 3 snapshots
    md = (rep.path / "report.md").read_text()
    assert "Checkpoint selection (fine-tuned methods)" in md
    assert f"| ft_conditioning | {chosen} | {epoch_of[chosen]} | {100 * planted[epoch_of[chosen]]:.2f} | chosen |" in md
    # a resumed study re-scores nothing: every stage run is skipped by its key
    again = fake_stages(SelectionStages(planted))
    caplog.clear()
    caplog.set_level("INFO", logger="raugment.study.executor")
    study.run(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study [")]
    assert lines and all("skipped, already complete" in x for x in lines) and not again.bodies


def _study_runs(root):
    import pyarrow.parquet as pq

    from raugment.core.storage import latest

    rows = pq.read_table(latest(root, "study").path / "runs").to_pylist()
    return [{**r, "artifacts": json.loads(r["artifacts"])} for r in rows]


def test_study_with_selection_off_uses_best_val_and_says_so(fake_stages, tmp_path):
    from raugment.study import executor as study

    stages = fake_stages(SelectionStages({1: 0.4, 2: 0.8, 3: 0.5}))
    _, rep = study.run(_selection_cfg(tmp_path, "study.select_checkpoint=false"))
    assert "select" not in stages.calls and stages.bodies["train"] == 3
    sel = _report(rep)["checkpoints"]["ft_conditioning"]
    assert (sel["selection"], sel["checkpoint"], sel["epoch"]) == ("off", "best_val", 1)
    report_md = (rep.path / "report.md").read_text()
    assert "| ft_conditioning | best_val | 1 | - | used (selection off: best_val) |" in report_md


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_real_checkpoint_selection_on_tiny_models(ray_session, tiny_sd, tmp_path):
    """The real chain: fine-tune 2 epochs -> per epoch generate, assemble, train -> select -> pool."""
    import pyarrow.parquet as pq
    import torch

    from raugment.core.artifacts import read_results
    from raugment.study import executor as study

    torch.set_num_threads(1)
    data = json.loads(json.dumps(SMALL))
    data["run"]["root"] = str(tmp_path)
    data["study"].update({"methods": ["ft_conditioning"], "baseline": False, "filter": False, "dedup": False,
                          "audit": False})
    data["generate"]["model"] = str(tiny_sd)
    data["finetune"] = {"model": str(tiny_sd), "resolution": 32, "batch_size": 2, "max_epochs": 2, "patience": 5,
                        "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, "feature_weights": None}
    data["select"] = {"candidates": ["epoch_001", "epoch_002"], "ratio": 50}
    cfg = load_config(None, base=data)
    _st, rep = study.run(cfg)
    root = tmp_path.resolve()
    (run,) = _study_runs(root)
    chosen = json.loads((root / run["artifacts"]["select"] / "selected.json").read_text())
    val = {c["name"]: read_results(Artifact.open(root / c["classifier"]))["val_top1_best"]
           for c in chosen["candidates"]}
    assert set(val) == {"epoch_001", "epoch_002"}
    best = max(val.values())
    assert chosen["checkpoint"] == min(n for n, v in val.items() if v == best)  # argmax, ties: earlier
    # the method's pool was generated from the chosen snapshot
    params = pq.read_table(root / run["artifacts"]["source"] / "prompts.parquet").column("params").to_pylist()
    assert {Path(json.loads(p)["snapshot"]).name for p in params} == {f"epoch_{chosen['epoch']:03d}"}
    md = (rep.path / "report.md").read_text()
    assert "Checkpoint selection (fine-tuned methods)" in md and "| chosen |" in md
    # consecutive generation runs of the study share the actor process (cluster.POOLS); each
    # fine-tuned run loads its own pipeline (its setup changes the weights)
    gens = [json.loads(f.read_text()) for f in root.glob("generate/*/stats.json")]
    assert len(gens) == 3 and any(g["actors_reused"] for g in gens)
    assert len({g["pids"][0] for g in gens}) < 3 and all(g["pipeline_loads"] == 1 for g in gens)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(2400)
def test_killed_study_resumes_to_the_same_report(ray_session, tmp_path, caplog):
    """End to end with the real stages and a real kill (minutes on 2 busy cores)."""
    from raugment.study import executor as study

    sd = _tiny_sd(tmp_path / "models")
    overrides = [f"generate.model={sd}", f"filter.safety_model={sd}"]
    # Uninterrupted run.
    cfg_a = load_config(_write_config(tmp_path / "a.yaml", tmp_path / "a"), overrides)
    _, rep_a = study.run(cfg_a)
    # Same study in another process, killed once its first stages are done ...
    address = ray_session.get_runtime_context().gcs_address
    cfg_b = _write_config(tmp_path / "b.yaml", tmp_path / "b", address)
    cmd = [sys.executable, "-m", "raugment.cli", "run", str(cfg_b), *(arg for o in overrides for arg in ("--set", o))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(read_state(tmp_path / "b")) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = read_state(tmp_path / "b")
    assert 2 <= len(done_before) < len(read_state(tmp_path / "a"))  # killed part-way
    # ... then resumed here: the report is the one of the uninterrupted run.
    cfg_b = load_config(tmp_path / "b.yaml", [*overrides, "cluster.address=null"])
    caplog.set_level("INFO", logger="raugment.study.executor")
    _, rep_b = study.run(cfg_b)
    assert _comparable(rep_b.path) == _comparable(rep_a.path)
    assert rep_b.path.relative_to(tmp_path / "b") == rep_a.path.relative_to(tmp_path / "a")
    # A third run skips every stage and says so.
    caplog.clear()
    study.run(cfg_b)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study [")]
    assert lines and all("skipped, already complete" in line for line in lines)


def test_trainings_run_after_every_other_ready_stage_and_a_skip_run_starts_no_ray(fake_stages, tmp_path,
                                                                                 monkeypatch):
    from raugment.study import executor as study
    from raugment.study.planner import Node

    calls = fake_stages(FakeStages()).calls
    started = []
    monkeypatch.setattr("raugment.runtime.cluster.init_ray", lambda *a, **k: started.append(1))
    study.run(_fake_cfg(tmp_path))
    trains = [i for i, s in enumerate(calls) if s == "train"]
    assert len(trains) == 6 and trains == list(range(len(calls) - 6, len(calls)))  # all at the end
    assert started == []  # the study itself never starts Ray: the stages that need it do
    # a node that needs a training still gets it first, and the other trainings wait for it
    n = {k: Node(k, stage, None, inputs=inp) for k, stage, inp in [
        ("d", "dataset", {}), ("t1", "train", {"dataset": "d"}), ("s", "select", {"model": "t1"}),
        ("g", "generate", {"dataset": "d", "ckpt": "s"}), ("t2", "train", {"dataset": "d"}),
        ("a", "assemble", {"dataset": "d"})]}
    order = [x.id for x in study.deferred_order(list(n.values()), ["train"])]
    assert order == ["d", "a", "t1", "s", "g", "t2"]


class MixingStages(FakeStages):
    """Stand-ins with a retrieval (ranked, ``source`` retrieved), pass-through post-processing and
    the real assemble stage, so a study's manifests show what each method really mixes."""

    dataset = ShortfallStages.dataset  # with the classes table the real assemble reads

    def index(self, cfg):
        from raugment.core.storage import run_stage

        return run_stage(cfg.run.root, "index", cfg.index, {}, lambda r: r.stats.add("vectors", 1))

    def retrieve(self, cfg, dataset, index):
        from raugment.core import schema as S
        from raugment.core.storage import run_stage

        def body(r):
            rows = [{S.ID: f"retrieved-{label}-{i}", S.LABEL: label, S.CLASS_NAME: f"class {label}",
                     S.SPLIT: "added", S.SOURCE: "retrieved", S.METHOD: "retrieval", S.RANK: i,
                     S.IMAGE: _png(label, i)} for label in range(2) for i in range(4)]
            r.write(S.to_table(rows), "images", shard="0")
        return run_stage(cfg.run.root, "retrieve", cfg.retrieve, {"dataset": dataset}, body)

    @staticmethod
    def _copy(stage, section, cfg, added):
        from raugment.core.storage import run_stage

        return run_stage(cfg.run.root, stage, section, {"added": added},
                         lambda r: r.write(added.read("images"), "images", shard="0"))

    def filter(self, cfg, added):
        return self._copy("filter", cfg.filter, cfg, added)

    def dedup(self, cfg, added):
        return self._copy("dedup", cfg.dedup, cfg, added[0])

    def assemble(self, cfg, dataset, added, audit, census=None, census_audit=None):
        from raugment.stages.assemble import stage

        census_args = [census, census_audit] if census is not None else []  # as the plan gives them
        return stage.run(cfg, dataset, added, audit, *census_args)


def test_a_retrieval_plus_generation_study_assembles_from_both_pools(fake_stages, tmp_path):
    from raugment.core import schema as S
    from raugment.study import executor as study

    stages = fake_stages(MixingStages())
    cfg = load_config(None, [f"run.root={tmp_path}", "study.methods=[retrieval, simple, retrieval+simple]",
                             "study.ratios=[100]", "study.sets=2", "run.progress=false"])
    runs_art, rep = study.run(cfg)
    assert Counter(stages.calls)["retrieve"] == 1 and Counter(stages.calls)["generate"] == 1
    runs = runs_art.read("runs").to_pylist()
    mixed = [r for r in runs if r[S.METHOD] == "retrieval+simple"]
    assert len(mixed) == 2
    for r in mixed:
        manifest = Artifact.open(tmp_path / json.loads(r[S.ARTIFACTS])["assemble"]).read("manifest").to_pylist()
        added = Counter((m[S.LABEL], m[S.METHOD]) for m in manifest if m[S.SOURCE] != "original")
        # each class: 3 originals at 100 % -> 3 added, split 2 retrieved (top ranks) + 1 generated
        assert added == {(0, "retrieval"): 2, (0, "simple"): 1, (1, "retrieval"): 2, (1, "simple"): 1}
        ret = sorted(m[S.ID] for m in manifest if m[S.METHOD] == "retrieval")
        assert ret == ["retrieved-0-0", "retrieved-0-1", "retrieved-1-0", "retrieved-1-1"]
    report = json.loads((rep.path / "report.json").read_text())
    assert "retrieval+simple" in report["datasets"]["default"]["table"]
