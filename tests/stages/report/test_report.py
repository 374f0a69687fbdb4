import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raugment.cli import main
from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.stats import format_mean_se, mean_se
from raugment.core.storage import Artifact
from raugment.stages.report.config import ReportConfig
from raugment.stages.report.stage import collect, run, write_report
from tests import FIXTURES

FIXTURE = FIXTURES / "study_results" / "root"
UPPER = {"20% data": 70.2}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study") / "root"
    shutil.copytree(FIXTURE, root)
    return root


@pytest.fixture(scope="module")
def report(fixture_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = ReportConfig(title="fixture study", upper_bound=UPPER, samples_per_cell=2, grid_classes=2)
    write_report(fixture_root, Artifact.open(fixture_root / "study" / "s0"), cfg, out)
    return out


def _fixture_runs(root: Path) -> list[dict]:
    rows = pq.read_table(root / "study" / "s0" / "runs").to_pylist()
    for r in rows:
        r["artifacts"] = json.loads(r["artifacts"])
        r["results"] = json.loads((root / r["artifacts"]["train"] / "results.json").read_text())
    return rows


def test_every_section_is_there(report):
    page = (report / "report.html").read_text()
    md = (report / "report.md").read_text()
    for heading in ("Accuracy (Table 1)", "Per-class improvement (Figure 5A)",
                    "Accuracy vs. augmentation ratio (Figure 5B)", "Sample images (class x method)",
                    "Retrieval success and filter drops", "Leakage audit",
                    "Measured cost per method and stage"):
        assert heading in page and heading in md
    for fig in ("improvement_default.png", "scaling_default.png", "samples_default.png"):
        data = (report / "figures" / fig).read_bytes()
        assert data.startswith(b"\x89PNG") and f"figures/{fig}" in page and f"figures/{fig}" in md
    # offline as one folder: every link is relative and points at a file inside it
    for gallery in ("audit/default_retrieval/gallery.html", "audit/default_simple/gallery.html"):
        assert (report / gallery).exists() and gallery in page
    assert "http://" not in page and "https://" not in page


def test_accuracy_table_matches_fixture_numbers(report, fixture_root):
    data = json.loads((report / "report.json").read_text())
    table = data["datasets"]["default"]["table"]
    md = (report / "report.md").read_text()
    groups: dict = {}
    for r in _fixture_runs(fixture_root):
        groups.setdefault((r["method"], r["ratio"]), []).append(r["results"][S.TEST_TOP1])
    assert len(groups) == 5
    for (method, ratio), values in groups.items():
        mean, se = mean_se(values)
        cell = table[method][f"{ratio:g}"][S.TEST_TOP1]
        assert cell["mean"] == pytest.approx(mean) and cell["se"] == pytest.approx(se)
        assert cell["n"] == len(values)
        assert f"{format_mean_se(mean, se)} (n={len(values)})" in md
    assert "| upper bound: 20% data | 70.2 | 70.2 |" in md
    assert md.index("baseline (original data)") < md.index("| retrieval |")


def test_per_class_and_scaling_numbers(report, fixture_root):
    data = json.loads((report / "report.json").read_text())["datasets"]["default"]
    runs = _fixture_runs(fixture_root)

    def per_class(method, ratio=None):
        tables = [pq.read_table(fixture_root / r["artifacts"]["train"] / "results_per_class.parquet")
                  for r in runs if r["method"] == method and (ratio is None or r["ratio"] == ratio)]
        cols = [t.column(S.ACC_TOP1).to_pylist() for t in tables]
        return [sum(c[i] for c in cols) / len(cols) for i in range(len(cols[0]))]

    base = per_class("baseline")
    for method in ("retrieval", "simple"):
        got = data["per_class"][method]
        want = [a - b for a, b in zip(per_class(method, 100.0), base)]
        assert got["ratio"] == 100.0 and got["improvement"] == pytest.approx(want)
        assert got["classes_improved"] == sum(v > 0 for v in want)
    assert data["ratios"] == [100.0, 500.0]


def test_samples_drops_audit_and_costs(report, fixture_root):
    data = json.loads((report / "report.json").read_text())
    ds = data["datasets"]["default"]
    samples = ds["samples"]
    assert [c["name"] for c in samples["classes"]] == ["circle", "square"]  # grid_classes=2
    assert samples["columns"]["original"]["ids"]["0"] == ["original-0-0", "original-0-1"]
    assert samples["columns"]["retrieval"]["ids"]["1"] == ["retrieval-1-0", "retrieval-1-1"]
    assert samples["columns"]["retrieval"]["artifact"] == "dedup/retrieval0"
    assert ds["drops"]["retrieval"]["retrieve"]["failures"] == {"http_404": 4, "timeout": 1}
    assert ds["drops"]["simple"]["dedup"]["failures"] == {"duplicate": 3}
    md = (report / "report.md").read_text()
    assert "http_404 4, timeout 1; 1 classes short of quota by 1 images" in md
    assert ds["audit"]["retrieval"]["summary"]["candidates"] == 1
    # cost: each stage run once, from its stats.json
    train = [c for c in data["costs"] if c["method"] == "retrieval" and c["stage"] == "train"]
    assert train[0]["runs"] == 4 and train[0]["cpu_h"] == pytest.approx(4 * 60.0 / 3600)
    gen = [c for c in data["costs"] if c["method"] == "simple" and c["stage"] == "generate"]
    assert gen[0]["cpu_h"] == pytest.approx(30.0 / 3600)


def test_report_stage_is_skipped_when_nothing_changed(fixture_root):
    cfg = load_config(None, [f"run.root={fixture_root}"])
    study = Artifact.open(fixture_root / "study" / "s0")
    first = run(cfg, study)
    stamp = (first.path / "_SUCCESS").stat().st_mtime_ns
    again = run(cfg, study)
    assert again.path == first.path and (again.path / "_SUCCESS").stat().st_mtime_ns == stamp
    assert (first.path / "report.html").exists()


def test_cli_report_to_a_folder(fixture_root, tmp_path, capsys):
    assert main(["report", "--set", f"run.root={fixture_root}", "--out", str(tmp_path / "r")]) == 0
    assert str(tmp_path / "r" / "report.html") in capsys.readouterr().out
    assert main(["report", "--set", f"run.root={tmp_path / 'empty'}"]) == 2


def test_collect_refuses_a_study_without_runs(fixture_root, tmp_path):
    empty = tmp_path / "study" / "e"
    (empty / "runs").mkdir(parents=True)
    pq.write_table(S.STUDY_RUNS.empty_table(), empty / "runs" / "part-0.parquet")
    (empty / "_SUCCESS").write_text("")
    with pytest.raises(ValueError, match="no runs"):
        collect(tmp_path, Artifact.open(empty), ReportConfig())


def test_checkpoint_section_says_which_checkpoint_each_finetuned_method_used(tmp_path):
    from raugment.stages.report.stage import _checkpoint_section, _checkpoints, _Doc
    from raugment.stages.select import stage as select
    from tests.helpers.finetuned import make_finetune

    ft = make_finetune(tmp_path)
    pinned = select.run(load_config(None, [f"run.root={tmp_path}", "select.checkpoint=epoch_002"]), ft)

    def run_row(method, **arts):
        return {S.METHOD: method, S.ARTIFACTS: {"train": "train/x", **arts}}

    rel = lambda a: str(a.path.relative_to(tmp_path.resolve()))  # noqa: E731
    runs = [run_row("baseline"), run_row("simple", source="generate/s"),
            run_row("ft_conditioning", finetune=rel(ft), select=rel(pinned)),
            run_row("ft_k5", finetune=rel(ft))]  # selection off: the artifact's best_val (epoch 1)
    data = _checkpoints(runs, tmp_path.resolve())
    assert set(data) == {"ft_conditioning", "ft_k5"}
    assert (data["ft_conditioning"]["selection"], data["ft_conditioning"]["checkpoint"]) == ("pinned", "epoch_002")
    assert (data["ft_k5"]["selection"], data["ft_k5"]["checkpoint"], data["ft_k5"]["epoch"]) == ("off", "best_val", 1)
    doc = _Doc("t")
    _checkpoint_section(doc, data)
    md = doc.finish()[1]
    assert "| ft_conditioning | epoch_002 | 2 | - | used (pinned by select.checkpoint) |" in md
    assert "| ft_k5 | best_val | 1 | - | used (selection off: best_val) |" in md
    empty = _Doc("t")
    _checkpoint_section(empty, {})  # no fine-tuned method: no section
    assert "Checkpoint selection" not in empty.finish()[1]


def test_recognisability_and_mini_models_sections(fixture_root, tmp_path):
    """The baseline classifier's top-1 on generated images, and the mini CLIP's precision@n."""
    import torch

    from raugment.models.classifier import build_model, save_classifier
    from raugment.stages.report.stage import collect, render

    root = tmp_path / "root"
    shutil.copytree(fixture_root, root)
    # A baseline classifier that always answers class 1: its top-1 is the share of label-1 images.
    model = build_model("tiny_cnn", 3)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        list(model.parameters())[-1][1] = 5.0
    save_classifier(model, "tiny_cnn", 3, root / "train" / "baseline-0-0" / "model", extra={"image_size": 32})
    mini = tmp_path / "mini"
    mini.mkdir()
    (mini / "mini_models.json").write_text(json.dumps(
        {"clip": {"steps": 150, "train_cpu_s": 20.5,
                  "heldout": {"precision_at_n": 0.875, "n": 20, "per_class": {"circle": 0.875}}},
         "pool": {"rows": 468, "extra_ids": ["a", "b"]}}))
    cfg = ReportConfig(title="t", samples_per_cell=2, grid_classes=2, mini_models=str(mini))
    data = collect(root, Artifact.open(root / "study" / "s0"), cfg)
    labels = Artifact.open(root / "generate" / "simple0").read("images").column("label").to_pylist()
    rec = data["datasets"]["default"]["recognisability"]
    assert set(rec) == {"simple"}  # retrieval does not generate
    assert rec["simple"]["images"] == len(labels) and rec["simple"]["chance"] == pytest.approx(1 / 3)
    assert rec["simple"]["top1"] == pytest.approx(labels.count(1) / len(labels))
    assert data["mini_models"]["clip"]["heldout"]["precision_at_n"] == 0.875
    render(data, root, tmp_path / "out", cfg)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Are generated images recognisable?" in md and "0.875 (n = 20)" in md
    assert f"| simple | {len(labels)} | {100 * labels.count(1) / len(labels):.1f} | 33.3 |" in md


def test_cost_per_added_image_per_method_beside_the_papers_figures(report):
    """The pool's cost (every stage but assemble/train) over the images the pool holds after
    filter + dedup, per 1000 images, beside the paper's cost comparison (its Section 4 figures)."""
    data = json.loads((report / "report.json").read_text())
    rows = {r["method"]: r for r in data["cost_per_image"]}
    assert set(rows) == {"retrieval", "simple"}                      # the baseline adds nothing
    r = rows["retrieval"]
    assert r["added_images"] == 9                                    # dedup/retrieval0's images table
    assert r["stages"] == ["audit", "dedup", "filter", "retrieve"]
    assert r["cpu_h_per_1000"] == pytest.approx(33.0 / 3600 / 9 * 1000)
    assert r["gpu_h_per_1000"] == pytest.approx(4.0 / 3600 / 9 * 1000)
    assert r["remote_cpu_h"] == pytest.approx(25.0 / 3600)          # actors' own CPU (stats usage)
    assert r["remote_cpu_h_per_1000"] == pytest.approx(25.0 / 3600 / 9 * 1000)
    # the paper: retrieval 28.5 h on one CPU machine for 130 images x 990 classes; prompt-based
    # generation 867 T4 GPU-h for 390 x 1000 images; 30x retrieval's hours
    assert r["paper"]["cpu_h_per_1000"] == pytest.approx(28.5 / 128.7, rel=1e-3)
    assert r["paper"]["gpu_h_per_1000"] == 0.0
    s = rows["simple"]["paper"]
    assert s["gpu_h_per_1000"] == pytest.approx(867 / 390, rel=1e-3)
    assert round(s["x_retrieval"]) == 30
    md = (report / "report.md").read_text()
    assert "Cost per 1000 added images" in md
    assert f"{28.5 / 128.7:.3g}" in md and f"{867 / 390:.3g}" in md
