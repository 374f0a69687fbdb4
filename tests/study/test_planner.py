import json
import math
import subprocess
import sys
from collections import Counter

import pytest

from raugment.config import load_config
from raugment.core.config import ConfigError
from raugment.study.planner import (
    DEFAULT_COSTS,
    DatasetSize,
    apply_measured,
    build_plan,
    format_plan,
    generation_quota,
    index_cost,
    known_methods,
    method_pipeline,
    plugin_costs,
    ratio_rows,
    retrieval_quota,
    summary_rows,
)

SIZE = DatasetSize(classes=10, train_images=900, max_per_class=130)


def _cfg(*overrides):
    return load_config(None, ["dataset.source=imagefolder", "dataset.path=/nowhere",
                              "study.expected={classes: 10, train_images: 900, max_per_class: 130}",
                              *overrides])


def test_four_ratios_five_sets_share_every_common_artifact():
    cfg = _cfg("study.methods=[retrieval, simple, clip_templates, ft_conditioning]",
               "study.ratios=[100, 500, 1000, 2500]", "study.sets=5", "study.select_checkpoint=false")
    plan = build_plan(cfg)
    stages = Counter(n.stage for n in plan.nodes.values())
    # one of each shared artifact: dataset, index, retrieval, one pool per generating method ...
    assert stages["dataset"] == 1 and stages["index"] == 1 and stages["retrieve"] == 1
    assert stages["generate"] == 3 and stages["finetune"] == 1
    assert stages["filter"] == stages["dedup"] == stages["audit"] == 4
    # ... and one assemble + one classifier per (method, ratio, set), baseline once per set
    assert stages["assemble"] == stages["train"] == 4 * 4 * 5 + 5
    assert len(plan.runs) == 85 and len({r.train for r in plan.runs}) == 85
    # every run of a method reads the same added images, whatever its ratio and set
    for method in ("retrieval", "simple", "clip_templates", "ft_conditioning"):
        sources = {r.artifacts["source"] for r in plan.runs if r.method == method}
        added = {r.artifacts["added"] for r in plan.runs if r.method == method}
        assert len(sources) == 1 and len(added) == 1
    # the shared pools are sized for the largest ratio
    (ret,) = plan.by_stage("retrieve")
    # (over-fetched by study.retrieval_margin: what filter + dedup drop is topped up)
    assert ret.cfg.retrieve.images_per_class == retrieval_quota(2500, SIZE, 0.25) == math.ceil(1.25 * 25 * 130)
    for gen in plan.by_stage("generate"):
        assert gen.cfg.generate.images_per_class == generation_quota(2500, SIZE, 3.0) == 3 * 25 * 130
        assert gen.cfg.generate.num_sets == 5
    (ft,) = plan.by_stage("finetune")
    ft_gen = next(g for g in plan.by_stage("generate") if g.labels["method"] == "ft_conditioning")
    assert ft_gen.inputs["finetune"] == ft.id and ft_gen.cfg.generate.method == "ft_conditioning"
    # inputs always come before their readers
    seen = set()
    for node in plan.nodes.values():
        assert set(node.input_ids()) <= seen
        seen.add(node.id)


def test_node_ids_are_stable_when_the_study_grows():
    small = build_plan(_cfg("study.methods=[simple]", "study.ratios=[100]", "study.sets=2"))
    more = build_plan(_cfg("study.methods=[simple, clip_templates]", "study.ratios=[100]", "study.sets=3"))
    # adding a method and a set keeps every earlier stage run: a re-run only adds work
    assert set(small.nodes) < set(more.nodes)


def test_retrieval_quota_counts_what_filter_and_dedup_drop():
    plan = build_plan(_cfg("study.methods=[retrieval]", "study.ratios=[100]", "study.sets=1"))
    (ret,) = plan.by_stage("retrieve")
    assert ret.cfg.retrieve.images_per_class == 163  # 130 per class + 25 %
    bare = build_plan(_cfg("study.methods=[retrieval]", "study.ratios=[100]", "study.sets=1",
                           "study.filter=false", "study.dedup=false", "study.audit=false"))
    assert bare.by_stage("retrieve")[0].cfg.retrieve.images_per_class == 130  # nothing drops after it
    exact = build_plan(_cfg("study.methods=[retrieval]", "study.ratios=[100]", "study.sets=1",
                            "study.retrieval_margin=0"))
    assert exact.by_stage("retrieve")[0].cfg.retrieve.images_per_class == 130


def test_every_classifier_checks_every_pool_for_shortfalls_at_the_largest_ratio():
    plan = build_plan(_cfg("study.methods=[retrieval, simple]", "study.ratios=[100, 500]", "study.sets=2"))
    pools = {m: next(r.artifacts["added"] for r in plan.runs if r.method == m) for m in ("retrieval", "simple")}
    audits = {m: next(r.artifacts["audit"] for r in plan.runs if r.method == m) for m in ("retrieval", "simple")}
    assert len(plan.runs) == 2 + 2 * 2 * 2
    for r in plan.runs:  # the baseline's too: all of them train and score on one class set
        node = plan.nodes[r.assemble]
        assert node.inputs["census"] == pools and node.inputs["census_audit"] == audits
        assert node.cfg.assemble.shortfall == "exclude" and node.cfg.assemble.census_ratio == 500
    allow = build_plan(_cfg("study.methods=[retrieval]", "study.shortfall=allow"))
    for node in allow.by_stage("assemble"):
        assert "census" not in node.inputs and node.cfg.assemble.shortfall == "allow"


def test_sets_and_ratios_differ_only_where_they_matter():
    plan = build_plan(_cfg("study.methods=[simple]", "study.ratios=[100, 500]", "study.sets=2"))
    runs = [r for r in plan.runs if r.method == "simple"]
    assert len({(r.ratio, r.set_index) for r in runs}) == 4
    trains = [plan.nodes[r.train] for r in runs]
    assert len({t.cfg.train.seed for t in trains}) == 2  # one classifier seed per set
    assert {plan.nodes[r.assemble].cfg.assemble.ratio for r in runs} == {100.0, 500.0}
    base = [r for r in plan.runs if r.method == "baseline"]
    assert [r.ratio for r in base] == [0.0, 0.0] and all(not r.artifacts for r in base)


def test_estimates_scale_with_ratio_and_follow_cost_overrides():
    p100 = build_plan(_cfg("study.methods=[simple]", "study.ratios=[100]", "study.sets=1"))
    p2500 = build_plan(_cfg("study.methods=[simple]", "study.ratios=[2500]", "study.sets=1"))
    assert p2500.totals()["gpu_h"] > 10 * p100.totals()["gpu_h"]
    gen = p100.by_stage("generate")[0]
    expected = generation_quota(100, SIZE, 3.0) * 10 * DEFAULT_COSTS["generate.gpu_s_per_image"] / 3600
    assert gen.gpu_h == pytest.approx(expected)
    cheap = build_plan(_cfg("study.methods=[simple]", "study.ratios=[100]", "study.sets=1",
                            "study.costs={generate.gpu_s_per_image: 0.01}"))
    want = expected * 0.01 / DEFAULT_COSTS["generate.gpu_s_per_image"]
    assert cheap.by_stage("generate")[0].gpu_h == pytest.approx(want)
    text = format_plan(p100)
    assert "generate" in text and "1 classifiers" not in text and "2 classifiers" in text
    assert "8 GPUs" in text


def test_methods_are_planned_by_the_registry_they_are_in():
    assert [method_pipeline(m) for m in ("baseline", "retrieval", "simple", "boomerang", "imagic", "nope")] == \
        ["baseline", "retrieval", "generate", "generate", "finetune", None]
    assert {"retrieval", "sariyildiz", "pseudoword_dm"} <= set(known_methods()) and "baseline" not in known_methods()
    with pytest.raises(ConfigError, match=r"study\.methods: unknown method 'nope'; known: .*imagic"):
        build_plan(_cfg("study.methods=[nope]"))
    with pytest.raises(ConfigError, match=r"study\.variants\.v\.method: unknown method 'nope'"):
        build_plan(_cfg("study.methods=[v]", "study.variants={v: {method: nope}}"))


def _gpu_h(plan, stage, method):
    (node,) = [n for n in plan.by_stage(stage) if n.labels.get("method") == method and "checkpoint" not in n.labels]
    return node.gpu_h


def test_plug_ins_declare_their_costs_and_the_study_overrides_them():
    costs = plugin_costs()
    assert costs["finetune.imagic.gpu_s_per_image"] == pytest.approx(552 * 3600 / 126_861)
    assert costs["generate.boomerang_fraction"] == 0.2 and costs["generate.simple_fraction"] == 1.0
    assert not {k for k in DEFAULT_COSTS if k.count(".") > 1}  # no method is named here
    base = ["study.methods=[simple, boomerang, imagic]", "study.select_checkpoint=false", "study.sets=1"]
    plan = build_plan(_cfg(*base))
    assert _gpu_h(plan, "generate", "boomerang") == pytest.approx(0.2 * _gpu_h(plan, "generate", "simple"))
    ft = 900 * costs["finetune.imagic.gpu_s_per_image"] / 3600  # 40 epochs at 512 px: the paper's budget
    assert _gpu_h(plan, "finetune", "imagic") == pytest.approx(ft)
    over = build_plan(_cfg(*base, "study.costs={generate.boomerang_fraction: 0.5, finetune.imagic.gpu_s_per_image: 2.0,"
                                  " finetune.gpu_s_per_image: 99.0}"))
    assert _gpu_h(over, "generate", "boomerang") == pytest.approx(0.5 * _gpu_h(over, "generate", "simple"))
    assert _gpu_h(over, "finetune", "imagic") == pytest.approx(900 * 2.0 / 3600)
    with pytest.raises(ConfigError, match=r"study\.costs\.finetune\.dreambooth\.gpu_s_per_image: unknown cost; "
                                          r"known: .*finetune\.imagic\.gpu_s_per_image"):
        build_plan(_cfg(*base, "study.costs={finetune.dreambooth.gpu_s_per_image: 1.0}"))


def test_measured_stats_replace_estimates(tmp_path):
    plan = build_plan(_cfg("study.methods=[simple]", "study.ratios=[100]", "study.sets=1"))
    gen = plan.by_stage("generate")[0]
    d = tmp_path / "generate" / "k"
    d.mkdir(parents=True)
    (d / "stats.json").write_text(json.dumps({"cpu_s": 7200.0, "gpu_s": 3600.0}))
    (d / "_SUCCESS").write_text("")
    assert apply_measured(plan, {gen.id: "generate/k", "unknown-node": "x/y"}, tmp_path) == 1
    assert gen.cost == "measured" and gen.gpu_h == 1.0 and gen.cpu_h == 2.0 and gen.path == "generate/k"


def test_nodes_that_met_in_one_artifact_are_measured_once(tmp_path):
    plan = build_plan(_cfg("study.methods=[ft_conditioning]", "select.candidates=[best_val, epoch_002]"))
    a, b = [n for n in plan.by_stage("train") if "checkpoint" in n.labels]
    d = tmp_path / "train" / "k"
    d.mkdir(parents=True)
    (d / "stats.json").write_text(json.dumps({"cpu_s": 3600.0, "gpu_s": 0.0}))
    (d / "_SUCCESS").write_text("")
    assert apply_measured(plan, {a.id: "train/k", b.id: "train/k"}, tmp_path) == 2  # best_val was epoch 2
    assert (a.cpu_h, b.cpu_h) == (1.0, 0.0) and a.path == b.path == "train/k"


def test_variants_and_datasets_multiply_the_plan():
    cfg = _cfg("study.methods=[ft_k5, simple]", "study.ratios=[100]", "study.sets=1",
               "study.variants={ft_k5: {method: ft_cluster_conditioning, finetune.clusters: 5}}",
               "study.datasets={a: {dataset.fraction: 0.1}, b: {dataset.fraction: 0.2}}")
    plan = build_plan(cfg)
    assert len(plan.by_stage("dataset")) == 2 and len(plan.by_stage("finetune")) == 2
    ft = plan.by_stage("finetune")[0]
    assert ft.cfg.finetune.method == "ft_cluster_conditioning" and ft.cfg.finetune.clusters == 5
    assert {r.dataset for r in plan.runs} == {"a", "b"}


@pytest.mark.parametrize("overrides, key", [
    (["study.expected={}"], "study.expected"),
    (["study.costs={generate.gpu_s_per_imag: 1.0}"], "study.costs.generate.gpu_s_per_imag"),
    (["study.methods=[x]", "study.variants={x: {method: simple, generate.nope: 1}}"], "study.variants.x"),
    (["study.ratios=[0]"], "study.ratios[0]"),
])
def test_bad_study_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        build_plan(_cfg(*overrides))


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    # the default config cannot run here (no index.path, no aesthetic weights, no GPU): the dry-run
    # still prints the plan, lists what preflight finds, exits 2, and imports neither Ray nor torch
    root = tmp_path / "runs"
    code = ("import sys; from raugment.cli import main;"
            f"rc = main(['run', '--dry-run', '--set', 'run.root={root}', '--set', 'study.ratios=[100, 2500]']);"
            "sys.exit(3 if ('ray' in sys.modules or 'torch' in sys.modules) else rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "total" in out.stdout and "classifiers" in out.stdout and "generate" in out.stdout
    assert "index.path is required" in out.stderr and "problem(s)" in out.stderr
    assert not root.exists()  # no stage directory, no state file


FT_METHODS = ["ft_conditioning", "ft_cluster_conditioning", "imagic", "textual_inversion", "pseudoword_dm"]


def test_checkpoint_selection_nodes_for_finetuned_methods_only():
    cfg = _cfg(f"study.methods=[retrieval, simple, {', '.join(FT_METHODS)}]", "study.ratios=[100, 500]",
               "study.sets=2", "finetune.max_epochs=10")
    plan = build_plan(cfg)
    selects = plan.by_stage("select")
    assert {n.labels["method"] for n in selects} == set(FT_METHODS)  # on by default, methods 5-9 only
    for method in FT_METHODS:
        (ft,) = [n for n in plan.by_stage("finetune") if n.labels["method"] == method]
        (choice,) = [n for n in selects if n.labels["method"] == method and "checkpoint" not in n.labels]
        names = list(choice.inputs["scores"])
        kept = [1, 2, 3] if method != "imagic" else list(range(1, 9))  # Imagic: its first 8 epochs
        assert names == ["best_train", "best_val"] + [f"epoch_{e:03d}" for e in kept]
        for name, train_id in choice.inputs["scores"].items():
            # pointer -> small generation -> assemble at select.ratio -> classifier, all ordinary nodes
            train = plan.nodes[train_id]
            assemble = plan.nodes[train.inputs["manifest"]]
            gen = plan.nodes[assemble.inputs["added"][method]]
            pointer = plan.nodes[gen.inputs["finetune"]]
            stages = (train.stage, assemble.stage, gen.stage, pointer.stage)
            assert stages == ("train", "assemble", "generate", "select")
            assert pointer.cfg.select.checkpoint == name and pointer.inputs == {"finetune": ft.id}
            assert assemble.cfg.assemble.ratio == 100.0 and assemble.cfg.assemble.sources == [method]
            assert gen.cfg.generate.images_per_class == generation_quota(100, SIZE, 1.0) == 130
            assert gen.cfg.generate.method == method and gen.gpu_h > 0 and train.gpu_h > 0
        # the method's pool is generated from the choice; its classifiers are not candidates
        pool = plan.nodes[next(r.artifacts["source"] for r in plan.runs if r.method == method)]
        assert pool.inputs["finetune"] == choice.id
        assert {r.artifacts["select"] for r in plan.runs if r.method == method} == {choice.id}
        assert not {r.train for r in plan.runs} & set(choice.inputs["scores"].values())
    assert len(plan.runs) == 2 + 7 * 2 * 2  # selection adds no classifier to the study's tables
    text = format_plan(plan)
    assert "imagic (checkpoint selection)" in text and "select" in text


def test_checkpoint_selection_off_or_pinned():
    off = build_plan(_cfg("study.methods=[simple, ft_conditioning]", "study.select_checkpoint=false"))
    assert not off.by_stage("select")
    (ft,) = off.by_stage("finetune")
    assert [g.inputs["finetune"] for g in off.by_stage("generate")] == [None, ft.id]
    assert all("select" not in r.artifacts for r in off.runs)
    pinned = build_plan(_cfg("study.methods=[ft_conditioning]", "select.checkpoint=epoch_002"))
    (pointer,) = pinned.by_stage("select")
    assert pointer.cfg.select.checkpoint == "epoch_002" and len(pinned.by_stage("train")) == len(pinned.runs)
    # turning selection on keeps the fine-tuning run: only nodes after it are added
    on = build_plan(_cfg("study.methods=[simple, ft_conditioning]", "select.candidates=[epoch_001, epoch_002]"))
    assert ft.id in on.nodes and len(on.by_stage("select")) == 3
    assert len(on.by_stage("train")) == len(off.by_stage("train")) + 2


@pytest.mark.parametrize("overrides, key", [
    (["select.candidates=[epoch_004]"], "select.candidates: ft_conditioning keeps no checkpoint epoch_004"),
    (["select.candidates=[epoch_003]", "finetune.max_epochs=2"], "select.candidates: .* up to finetune.max_epochs=2"),
    (["select.checkpoint=epoch_007"], "select.checkpoint: ft_conditioning keeps no checkpoint"),
    (["select.images_per_class=100"], r"select.images_per_class=100 is fewer than select.ratio=100 % .* \(130\)"),
])
def test_bad_selection_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_plan(_cfg("study.methods=[ft_conditioning]", *overrides))


def test_retrieval_plus_generation_is_a_study_method_mixing_both_pools():
    cfg = _cfg("study.methods=[retrieval, simple, retrieval+simple]", "study.ratios=[100, 500]", "study.sets=2")
    plan = build_plan(cfg)
    stages = Counter(n.stage for n in plan.nodes.values())
    assert stages["retrieve"] == 1 and stages["generate"] == 1  # the parts' pools are the methods' own
    assert stages["audit"] == 3  # retrieval, simple, and one over both for the combination
    own = {m: {r.artifacts["added"] for r in plan.runs if r.method == m} for m in ("retrieval", "simple")}
    runs = [r for r in plan.runs if r.method == "retrieval+simple"]
    assert len(runs) == 4 and {(r.ratio, r.set_index) for r in runs} == {(100, 0), (100, 1), (500, 0), (500, 1)}
    for r in runs:
        assemble = plan.nodes[r.assemble]
        assert assemble.cfg.assemble.sources == ["retrieval", "simple"]
        assert assemble.inputs["added"] == {"retrieval": r.artifacts["added.retrieval"],
                                            "simple": r.artifacts["added.simple"]}
        assert {r.artifacts["added.retrieval"]} == own["retrieval"] and {r.artifacts["added.simple"]} == own["simple"]
        audit = plan.nodes[assemble.inputs["audit"]]
        assert audit.stage == "audit" and audit.inputs["added"] == [r.artifacts["added.retrieval"],
                                                                    r.artifacts["added.simple"]]
    # planned on its own, the combination still plans both inputs
    alone = build_plan(_cfg("study.methods=[retrieval+clip_templates]", "study.baseline=false", "study.sets=1"))
    assert Counter(n.stage for n in alone.nodes.values())["retrieve"] == 1
    assert [n.cfg.generate.method for n in alone.by_stage("generate")] == ["clip_templates"]
    assert Counter(n.stage for n in alone.nodes.values())["audit"] == 1


@pytest.mark.parametrize("method, match", [
    ("retrieval+simpel", r"unknown method 'simpel'"),
    ("retrieval+baseline", r"'retrieval\+baseline' combines 'baseline', which adds no images"),
    ("retrieval+retrieval", r"each once"),
    ("retrieval+", r"each once"),
])
def test_a_bad_combination_names_the_part(method, match):
    with pytest.raises(ConfigError, match=match):
        build_plan(_cfg(f"study.methods=[{method}]"))


def test_plan_gives_images_and_hours_per_ratio_not_one_row_per_method():
    plan = build_plan(_cfg("study.methods=[simple]", "study.ratios=[100, 500]", "study.sets=2",
                           "study.baseline=false"))
    trains = {r["ratio"]: r for r in summary_rows(plan) if r["stage"] == "train"}
    assert set(trains) == {100.0, 500.0} and trains[100.0]["runs"] == trains[500.0]["runs"] == 2
    assert trains[500.0]["gpu_h"] > trains[100.0]["gpu_h"] > 0
    rows = {r["ratio"]: r for r in ratio_rows(plan) if r["method"] == "simple"}
    assert set(rows) == {"pool", 100.0, 500.0}
    # added images per classifier: the ratio's share of the 900 training images
    assert rows[100.0]["added_per_classifier"] == 900 and rows[500.0]["added_per_classifier"] == 4500
    assert rows[100.0]["classifiers"] == 2
    assert rows[500.0]["gpu_h"] == pytest.approx(trains[500.0]["gpu_h"])   # assemble costs nothing here
    # the pool (generate -> filter -> dedup -> audit) serves every ratio: its own row, counted once
    pool = [n for n in plan.nodes.values() if n.labels.get("method") == "simple" and "ratio" not in n.labels]
    assert rows["pool"]["gpu_h"] == pytest.approx(sum(n.gpu_h for n in pool)) and rows["pool"]["gpu_h"] > 0
    assert rows["pool"]["images"] == generation_quota(500, SIZE, 3.0) * 10
    assert sum(r["gpu_h"] for r in rows.values()) == pytest.approx(plan.totals()["gpu_h"])
    text = format_plan(plan)
    assert "Per method and ratio" in text
    assert any(" 100 " in line and "simple" in line for line in text.splitlines())
    assert any(" 500 " in line and "simple" in line for line in text.splitlines())


def test_index_build_is_costed_from_the_measured_rate_for_a_declared_size():
    base = "study.expected={classes: 10, train_images: 900, max_per_class: 130, index_vectors: 2000000}"
    plan = build_plan(_cfg("study.methods=[retrieval]", base, "index.source=embeddings",
                           "index.index_type=IVF4096,PQ64"))
    (index,) = plan.by_stage("index")
    assert index.images == {"index": 2_000_000}
    c = DEFAULT_COSTS
    assert min(c["index.cpu_s_per_vector"], c["index.cpu_s_per_vector_list"],
               c["index.train_cpu_s_per_vector_list"]) > 0                      # measured, not 0
    want = (min(2_000_000, 256 * 4096) * 4096 * c["index.train_cpu_s_per_vector_list"]
            + 2_000_000 * (c["index.cpu_s_per_vector"] + 4096 * c["index.cpu_s_per_vector_list"]))
    assert index.cpu_h == pytest.approx(want / 3600) and index.gpu_h == 0.0
    assert index_cost("IVF4096,PQ64", "embeddings", 2_000_000, c) == (pytest.approx(want), 0.0)
    # more lists cost more; an image pool is embedded with CLIP first (GPU)
    assert index_cost("IVF65536,PQ64", "embeddings", 2_000_000, c)[0] > want
    assert index_cost("IVF4096,PQ64", "images", 2_000_000, c)[1] == pytest.approx(2_000_000 * 0.004)
    assert "index" in format_plan(plan)


def test_index_size_is_counted_from_a_laion_layout_path(tmp_path):
    import numpy as np

    (tmp_path / "img_emb").mkdir()
    for i, n in enumerate((300, 200)):
        np.save(tmp_path / "img_emb" / f"img_emb_{i}.npy", np.zeros((n, 8), np.float16))
    plan = build_plan(_cfg("study.methods=[retrieval]", "index.source=embeddings", f"index.path={tmp_path}",
                           "index.index_type=IVF16,Flat"))
    (index,) = plan.by_stage("index")
    assert index.images == {"index": 500} and index.cpu_h > 0


def test_unknown_expected_hint_names_the_key():
    with pytest.raises(ConfigError, match="study.expected.vectors"):
        build_plan(_cfg("study.expected={classes: 10, train_images: 900, max_per_class: 130, vectors: 5}"))
