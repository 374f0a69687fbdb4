"""One-target studies (``raugment <stage>``): what each target plans, sections used as given, pins,
resuming, and pins refused before any work. Runs use the stand-in stages of the study tests (no Ray)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from raugment import cli
from raugment.config import load_config
from raugment.core.config import ConfigError, InputError
from raugment.core.storage import SUCCESS
from raugment.study.planner import DatasetSize, build_plan
from raugment.study.target import TARGETS, Pins, plan_target, run_target
from tests.helpers.planted import draw, make_artifact, make_dataset, png, row
from tests.study.test_study import FakeStages, SelectionStages

STUDY = ["study.methods=[retrieval, simple, ft_conditioning]", "study.ratios=[100, 500]", "study.sets=2",
         "retrieve.backend=local", "index.path=/pool", "run.progress=false"]


def _cfg(root="/tmp/none", *overrides):
    return load_config(None, [f"run.root={root}", *STUDY, *overrides])


def _stages(tp) -> Counter:
    return Counter(n.stage for n in tp.plan.nodes.values())


def _targets(tp) -> list[tuple[str, str | None]]:
    return [(tp.plan.nodes[t].stage, tp.plan.nodes[t].labels.get("method")) for t in tp.targets]


# ---- what each target plans --------------------------------------------------------------------

@pytest.mark.parametrize("stage, overrides, stages, targets", [
    ("dataset", [], {"dataset": 1}, [("dataset", None)]),
    ("index", [], {"index": 1}, [("index", "retrieval")]),
    ("retrieve", [], {"dataset": 1, "index": 1, "retrieve": 1}, [("retrieve", "retrieval")]),
    ("retrieve", ["retrieve.index=/some/index"], {"dataset": 1, "retrieve": 1},
     [("retrieve", "retrieval")]),
    ("finetune", [], {"dataset": 1, "finetune": 1}, [("finetune", "ft_conditioning")]),
    ("finetune", ["finetune.method=imagic"], {"dataset": 1, "finetune": 1}, [("finetune", "imagic")]),
    # best_train, best_val and the kept epochs: a pointer, a scoring set and a classifier each
    ("select", ["finetune.max_epochs=2", "finetune.keep_epochs=[1, 2]"],
     {"dataset": 1, "finetune": 1, "select": 5, "generate": 4, "assemble": 4, "train": 4},
     [("select", "ft_conditioning")]),
    ("generate", [], {"dataset": 1, "generate": 1}, [("generate", "simple")]),
    ("generate", ["generate.method=ft_conditioning", "study.select_checkpoint=false"],
     {"dataset": 1, "finetune": 1, "generate": 1}, [("generate", "ft_conditioning")]),
    ("generate", ["generate.method=ft_conditioning", "select.checkpoint=best_val"],
     {"dataset": 1, "finetune": 1, "select": 1, "generate": 1}, [("generate", "ft_conditioning")]),
    ("generate", ["generate.method=ft_conditioning", "generate.conditioning=/runs/finetune/x"],
     {"dataset": 1, "generate": 1}, [("generate", "ft_conditioning")]),
    ("filter", ["study.methods=[retrieval, simple]"],
     {"dataset": 1, "index": 1, "retrieve": 1, "generate": 1, "filter": 2},
     [("filter", "retrieval"), ("filter", "simple")]),
    ("dedup", ["study.methods=[simple]"], {"dataset": 1, "generate": 1, "filter": 1, "dedup": 1},
     [("dedup", "simple")]),
    ("dedup", ["study.methods=[simple]", "study.filter=false"], {"dataset": 1, "generate": 1, "dedup": 1},
     [("dedup", "simple")]),
    ("audit", ["study.methods=[simple]"], {"dataset": 1, "generate": 1, "filter": 1, "dedup": 1, "audit": 1},
     [("audit", "simple")]),
    ("assemble", [], {"dataset": 1, "assemble": 1}, [("assemble", "baseline")]),
    ("train", ["train.repeat_sets=2", "train.seeds=[0, 1]"], {"dataset": 1, "assemble": 2, "train": 4},
     [("train", "baseline")] * 4),
    ("tune", [], {"dataset": 1}, [("dataset", None)]),
])
def test_each_target_plans_its_stage_and_what_it_needs(stage, overrides, stages, targets):
    tp = plan_target(_cfg("/tmp/none", *overrides), stage)
    assert dict(_stages(tp)) == stages
    assert _targets(tp) == targets
    assert not tp.plan.runs  # no classifier rows: no study index, no report


def test_every_target_is_a_command():
    parser = cli.build_parser()
    for stage in TARGETS:
        assert cli.COMMANDS[stage].help and parser.parse_args([stage] if stage != "index" else ["index", "build"])


def test_methods_name_what_filter_and_train_plan():
    cfg = _cfg()
    tp = plan_target(cfg, "audit", methods=["simple"])
    assert _targets(tp) == [("audit", "simple")] and "retrieve" not in _stages(tp)
    # train: one manifest mixing both methods' post-processed images, their joint leakage audit
    tp = plan_target(cfg, "train", methods=["simple", "retrieval"])
    (assemble,) = tp.plan.by_stage("assemble")
    added = assemble.inputs["added"]
    assert list(added) == ["simple", "retrieval"]
    assert {tp.plan.nodes[i].stage for i in added.values()} == {"dedup"}
    joint = tp.plan.nodes[assemble.inputs["audit"]]
    assert joint.stage == "audit" and sorted(joint.inputs["added"]) == sorted(added.values())
    assert assemble.cfg.assemble.ratio == cfg.assemble.ratio and assemble.labels["method"] == "simple+retrieval"
    # one method: its own audit, as in the study
    tp = plan_target(cfg, "assemble", methods=["simple"])
    (assemble,) = tp.plan.by_stage("assemble")
    assert tp.plan.nodes[assemble.inputs["audit"]].labels["method"] == "simple"
    # the baseline ignores assemble.ratio
    (assemble,) = plan_target(cfg, "assemble").plan.by_stage("assemble")
    assert assemble.cfg.assemble.ratio == 0 and assemble.inputs["added"] == {}


def test_sets_follow_repeat_sets_from_the_given_set_index():
    tp = plan_target(_cfg("/tmp/none", "assemble.set_index=1", "assemble.num_sets=4", "train.repeat_sets=3",
                          "train.seeds=[7]"), "train")
    trains = [tp.plan.nodes[t] for t in tp.targets]
    assert [(n.labels["set_index"], n.cfg.train.seed) for n in trains] == [(1, 7), (2, 7), (3, 7)]
    assert {n.cfg.assemble.num_sets for n in tp.plan.by_stage("assemble")} == {4}
    with pytest.raises(ConfigError, match=r"train.repeat_sets=3 from assemble.set_index=2 needs assemble.num_sets"):
        plan_target(_cfg("/tmp/none", "assemble.set_index=2", "assemble.num_sets=4", "train.repeat_sets=3"), "train")


def test_target_sections_are_used_as_given():
    cfg = _cfg("/tmp/none", "generate.images_per_class=7", "generate.num_sets=1", "retrieve.images_per_class=5")
    sizes = {"default": DatasetSize(10, 1000, 130)}
    (gen,) = plan_target(cfg, "generate", sizes=sizes).plan.by_stage("generate")
    assert (gen.cfg.generate.images_per_class, gen.cfg.generate.num_sets) == (7, 1)
    assert gen.images["generate"] == 70
    (ret,) = plan_target(cfg, "retrieve", sizes=sizes).plan.by_stage("retrieve")
    assert ret.cfg.retrieve.images_per_class == 5
    # the control: the study derives both from its ratios (500 % of 130) and sets
    study = build_plan(cfg, sizes)
    pools = [n for n in study.by_stage("generate") if "checkpoint" not in n.labels]
    assert {n.cfg.generate.images_per_class for n in pools} == {1950}
    assert {n.cfg.generate.num_sets for n in pools} == {2}
    # (retrieval over-fetches by study.retrieval_margin = 25 % for what filter + dedup drop)
    assert {n.cfg.retrieve.images_per_class for n in study.by_stage("retrieve")} == {813}


def test_index_target_is_the_index_retrieval_would_build():
    tp = plan_target(_cfg(), "index")
    retrieve = next(n for n in build_plan(_cfg(), {"default": DatasetSize(1, 1, 1)}).nodes.values()
                    if n.stage == "retrieve")
    assert tp.targets == [retrieve.inputs["index"]]
    with pytest.raises(ConfigError, match=r"retrieve.index: retrieval reads that index.*index build --out DIR"):
        plan_target(_cfg("/tmp/none", "retrieve.index=/some/index"), "index")
    with pytest.raises(ConfigError, match=r"retrieve.backend: backend 'knn_service' reads no local index"):
        plan_target(_cfg("/tmp/none", "retrieve.backend=knn_service", "retrieve.service_url=http://x"), "index")


@pytest.mark.parametrize("stage, overrides, key", [
    ("generate", ["generate.method=retrieval"], "generate.method"),
    ("finetune", ["finetune.method=simple"], "finetune.method"),
    ("select", ["finetune.method=simple"], "finetune.method"),
])
def test_a_method_without_the_target_stage_names_the_key(stage, overrides, key):
    with pytest.raises(ConfigError, match=key):
        plan_target(_cfg("/tmp/none", *overrides), stage)


# ---- pins ---------------------------------------------------------------------------------------

def _added(root: Path, stage: str = "generate", tag: str = "a"):
    return make_artifact(root, stage, [row(f"{tag}{i}", png(draw(60 + i, 32)), label=i % 2, rank=i)
                                       for i in range(4)])


def _dataset(root: Path):
    return make_dataset(root, [row(f"d{i}", png(draw(i, 32)), label=i % 2, split="train") for i in range(4)])


def test_pins_replace_the_nodes_that_would_produce_them(tmp_path):
    gen, ds = _added(tmp_path / "in"), _dataset(tmp_path / "in")
    cfg = _cfg(tmp_path / "runs")
    # filter: the filter stage of the given images, nothing else
    tp = plan_target(cfg, "filter", Pins(added=[str(gen.path)]))
    assert dict(_stages(tp)) == {"generate": 1, "filter": 1}
    given = tp.plan.nodes[tp.plan.nodes[tp.targets[0]].inputs["added"]]
    assert given.given == str(gen.path) and given.labels["method"] == "generate"
    # dedup and audit: the pin is what they read (no filter before them)
    tp = plan_target(cfg, "dedup", Pins(added=[f"mine={gen.path}"]))
    assert dict(_stages(tp)) == {"generate": 1, "dedup": 1} and _targets(tp) == [("dedup", "mine")]
    tp = plan_target(cfg, "audit", Pins(added=[str(gen.path)], dataset=str(ds.path)))
    assert dict(_stages(tp)) == {"generate": 1, "dataset": 1, "audit": 1}
    assert all(n.given for n in tp.plan.nodes.values() if n.stage != "audit")
    # train: the given dataset, added images and audit; a planned method mixes in beside them
    audit = make_artifact(tmp_path / "in", "audit", [row("x", png(draw(1, 32)))], name="pairs")
    tp = plan_target(cfg, "train", Pins(dataset=str(ds.path), added=[f"g={gen.path}"], audit=str(audit.path)),
                     methods=["simple"])
    (assemble,) = tp.plan.by_stage("assemble")
    assert tp.plan.nodes[assemble.inputs["added"]["g"]].given == str(gen.path)
    assert tp.plan.nodes[assemble.inputs["added"]["simple"]].stage == "dedup"
    assert tp.plan.nodes[assemble.inputs["audit"]].given == str(audit.path)
    assert tp.plan.nodes[assemble.inputs["dataset"]].given == str(ds.path)
    assert [n.stage for n in tp.plan.nodes.values() if n.given is None and n.stage == "dataset"] == []


def test_bare_added_dirs_are_named_after_their_stage(tmp_path):
    a, b = _added(tmp_path / "in", tag="a"), _added(tmp_path / "in", tag="b")
    r = _added(tmp_path / "in", "retrieve", tag="r")
    pins = Pins(added=[str(a.path), str(b.path), str(r.path)])
    assert list(pins.added_by_method()) == ["generate", "generate-2", "retrieve"]
    with pytest.raises(InputError, match="twice"):
        Pins(added=[f"m={a.path}", f"m={b.path}"]).added_by_method()


def _dataset_without_classes(tmp: Path) -> Path:
    return make_artifact(tmp / "in", "dataset", [row("d", png(draw(0, 32)), split="train")]).path


@pytest.mark.parametrize("stage, pins, methods, fragments", [
    ("filter", lambda t, a: Pins(added=[str(t / "nope")]), [], ["--added", "no such directory"]),
    ("filter", lambda t, a: Pins(added=[str(a.parent)]), [], ["--added", "not a finished stage output", "re-run"]),
    ("train", lambda t, a: Pins(dataset=str(a)), [], ["--dataset", "a 'generate' stage output, not a 'dataset'"]),
    ("train", lambda t, a: Pins(audit=str(t / "nope")), [], ["--audit", "no such directory"]),
    ("train", lambda t, a: Pins(audit=str(a)), [], ["--audit", "not a 'audit' one"]),
    ("audit", lambda t, a: Pins(dataset=str(_dataset_without_classes(t))), [],
     ["--dataset", "without table 'classes'"]),
    ("filter", lambda t, a: Pins(audit=str(a)), [], ["takes no --audit"]),
    ("generate", lambda t, a: Pins(), ["simple"], ["takes no --method", "--dataset"]),
    ("dedup", lambda t, a: Pins(added=[f"simple={a}"]), ["simple"], ["'simple' is both a --method and an --added"]),
    ("train", lambda t, a: Pins(added=[f"g={a}"]), [], ["assemble.leakage=remove", "--audit DIR"]),
    ("filter", lambda t, a: Pins(), ["baseline"], ["baseline adds no images"]),
])
def test_bad_pins_are_refused_before_any_work(fake_stages, tmp_path, stage, pins, methods, fragments):
    stages = fake_stages(FakeStages())
    art = _added(tmp_path / "in").path
    cfg = _cfg(tmp_path / "runs", "assemble.leakage=remove")
    with pytest.raises(InputError) as exc:
        run_target(cfg, stage, pins(tmp_path, art), methods)
    for fragment in fragments:
        assert fragment in str(exc.value)
    assert stages.calls == [] and not (tmp_path / "runs").exists()


def test_unknown_method_and_unfinished_pin_exit_2_through_the_cli(fake_stages, tmp_path, capsys):
    stages = fake_stages(FakeStages())
    root = tmp_path / "runs"
    unfinished = tmp_path / "in" / "generate" / "k"
    unfinished.mkdir(parents=True)
    assert cli.main(["filter", "--added", str(unfinished), "--set", f"run.root={root}"]) == 2
    assert "input error: --added" in capsys.readouterr().err
    assert cli.main(["train", "--method", "simpel", "--set", f"run.root={root}"]) == 2
    err = capsys.readouterr().err
    assert "--method" in err and "simpel" in err
    assert stages.calls == [] and not root.exists()
    (unfinished / SUCCESS).write_text("")  # the control: a finished one is taken (no images: refused as such)
    assert cli.main(["filter", "--added", str(unfinished), "--set", f"run.root={root}"]) == 2
    assert "without table 'images'" in capsys.readouterr().err


# ---- running: the executor's contract, a second run skips everything ------------------------------

def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("study [")]


def test_a_target_runs_what_it_needs_and_a_second_run_skips_everything(fake_stages, tmp_path, caplog):
    cfg = _cfg(tmp_path, "study.methods=[simple]", "generate.images_per_class=3")
    first = fake_stages(FakeStages())
    caplog.set_level("INFO")
    (art,) = run_target(cfg, "dedup")
    assert first.calls == ["dataset", "generate", "filter", "dedup"]
    assert art.stage == "dedup" and art.path.parent.parent == tmp_path.resolve()
    assert not (tmp_path / "study").exists() and not (tmp_path / "report").exists()
    # the stage's own summary line, and its executor lines
    assert any(m.startswith(f"dedup: {art.path} -- ") for m in (r.getMessage() for r in caplog.records))
    assert len(_lines(caplog)) == 4
    again = fake_stages(FakeStages())
    caplog.clear()
    assert run_target(cfg, "dedup") == [art]
    lines = _lines(caplog)
    assert len(lines) == 4 and all("skipped, already complete" in x for x in lines)
    assert again.calls == first.calls  # each asked, each skipped by its key
    # train reuses every stage before it
    caplog.clear()
    run_target(cfg, "train", methods=["simple"])
    done = [x for x in _lines(caplog) if " done in " in x]
    assert [x.split("] ")[1].split(":")[0] for x in done] == ["audit simple", "assemble simple 100% set 0",
                                                              "train simple 100% set 0"]


def test_a_failed_stage_is_an_error_exit(fake_stages, tmp_path):
    class Failing(FakeStages):
        def filter(self, cfg, added):
            raise ValueError("filter broke")

    fake_stages(Failing())
    with pytest.raises(ValueError, match="filter broke"):
        run_target(_cfg(tmp_path, "study.methods=[simple]"), "dedup")
    # what ran before the failure is kept; the target's later stages never started
    assert sorted(p.parent.parent.name for p in tmp_path.glob("*/*/" + SUCCESS)) == ["dataset", "generate"]
    assert not (tmp_path / "dedup").exists()


def test_dedup_command_is_reachable_and_pinned_inputs_are_only_opened(fake_stages, tmp_path):
    stages = fake_stages(FakeStages())
    gen = _added(tmp_path / "in")
    assert cli.main(["dedup", "--added", str(gen.path), "--set", f"run.root={tmp_path / 'runs'}"]) == 0
    assert stages.calls == ["dedup"]
    assert (gen.path / SUCCESS).exists() and len(list((tmp_path / "runs" / "dedup").iterdir())) == 1


def test_train_with_several_classifiers_writes_their_mean(fake_stages, tmp_path, monkeypatch, caplog):
    from raugment.stages.train import stage as train

    fake_stages(FakeStages())
    seen = []

    def repeats(cfg, dataset, manifests):
        seen.append((cfg.train.seeds, [m.stage for m in manifests]))
        return {"summary": {"test_top1": {"mean": 0.5, "se": 0.01, "n": 4}}, "path": "/r"}

    monkeypatch.setattr(train, "run_repeats", repeats)
    caplog.set_level("INFO")
    arts = run_target(_cfg(tmp_path, "train.repeat_sets=2", "train.seeds=[0, 1]"), "train")
    assert len(arts) == 4 and {a.stage for a in arts} == {"train"}
    assert seen == [([0, 1], ["assemble", "assemble"])]
    assert "repeats: /r; test top-1 50.0 ± 1.0 % over 4 runs" in caplog.text


def test_select_target_runs_the_selection_and_its_scoring(fake_stages, tmp_path):
    stages = fake_stages(SelectionStages({1: 0.4, 2: 0.8, 3: 0.5}))
    (art,) = run_target(load_config(None, [f"run.root={tmp_path}", "run.progress=false"]), "select")
    assert art.stage == "select"
    assert stages.bodies == {"finetune": 1, "generate": 3, "train": 3}
    assert "assemble" in stages.calls and stages.calls.count("select") == 6


def test_tune_plans_its_inputs_then_sweeps(fake_stages, tmp_path, monkeypatch):
    from raugment.study import tune

    stages = fake_stages(FakeStages())
    got = {}

    def sweep(cfg, dataset, *, added=None, audit=None, **_):
        got.update(dataset=dataset.stage, added={m: a.stage for m, a in added.items()}, audit=audit and audit.stage)
        (dataset.path.parent.parent / "best.json").write_text("{}")
        return type("A", (), {"path": dataset.path.parent.parent})()

    monkeypatch.setattr(tune, "run", sweep)
    run_target(_cfg(tmp_path), "tune", methods=["simple"])
    assert got == {"dataset": "dataset", "added": {"simple": "dedup"}, "audit": "audit"}
    assert "assemble" not in stages.calls and "train" not in stages.calls


def test_a_combined_method_trains_on_both_pools_as_in_the_study():
    tp = plan_target(_cfg(), "train", methods=["retrieval+simple"])
    (assemble,) = tp.plan.by_stage("assemble")
    assert list(assemble.inputs["added"]) == ["retrieval", "simple"]
    assert assemble.cfg.assemble.sources == []  # as given: assemble mixes every added artifact it reads
    joint = tp.plan.nodes[assemble.inputs["audit"]]
    assert joint.stage == "audit" and sorted(joint.inputs["added"]) == sorted(assemble.inputs["added"].values())


def test_tune_with_the_study_pipeline_plans_the_dataset_only(fake_stages, tmp_path, monkeypatch):
    from raugment.study import tune

    stages = fake_stages(FakeStages())
    got = {}

    def sweep(cfg, dataset, *, added=None, audit=None, **_):
        got.update(dataset=dataset.stage, added=added, audit=audit)
        (dataset.path.parent.parent / "best.json").write_text("{}")
        return type("A", (), {"path": dataset.path.parent.parent})()

    monkeypatch.setattr(tune, "run", sweep)
    cfg = _cfg(tmp_path, "tune.pipeline=study", "study.methods=[ft_conditioning]")
    run_target(cfg, "tune")
    assert got == {"dataset": "dataset", "added": {}, "audit": None} and stages.calls == ["dataset"]
    with pytest.raises(InputError, match=r"tune\.pipeline=study.*drop --method"):
        plan_target(cfg, "tune", methods=["simple"])
