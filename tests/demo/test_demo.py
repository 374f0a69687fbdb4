import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from raugment.core.config import ConfigError
from raugment.demo import command as demo
from raugment.study.planner import build_plan
from tests import REPO


def test_demo_config_is_the_issue_s_study():
    cfg = demo.build_config(None, None, None)
    assert cfg.run.root == "runs/demo" and cfg.dataset.source == "synthetic"
    assert set(cfg.study.methods) == {"retrieval", "simple", "clip_templates", "ft_conditioning"}
    assert len(cfg.study.ratios) == 2 and cfg.study.sets >= 3 and cfg.study.baseline
    assert cfg.assemble.num_sets >= cfg.study.sets and cfg.mini.diffusion
    assert cfg.train.model == "tiny_cnn" and cfg.train.image_size == 32
    plan = build_plan(cfg)
    assert len(plan.runs) == cfg.study.sets * (1 + 4 * 2)
    # user config and --set go on top of demo.yaml, --out last
    cfg = demo.build_config(None, ["study.methods=[simple]", "run.root=x"], "y")
    assert cfg.study.methods == ["simple"] and cfg.run.root == "y" and cfg.study.sets >= 3
    with pytest.raises(ConfigError, match="study.nope"):
        demo.build_config(None, ["study.nope=1"], None)


def test_asset_overrides_point_every_stage_at_local_models(tmp_path):
    paths = {k: tmp_path / k for k in ("sd", "clip", "aesthetic", "classifier", "pool", "pool_clip", "mini",
                                          "mini_sd")}
    cfg = demo.build_config(None, None, str(tmp_path))
    from raugment.core.config import with_overrides

    cfg = with_overrides(cfg, demo.asset_overrides(paths, "http://127.0.0.1:1234/"))
    # the mini-world's trained generator generates and is fine-tuned; the tiny bundle's safety checker filters
    assert cfg.generate.model == cfg.finetune.model == str(paths["mini_sd"])
    assert cfg.filter.safety_model == str(paths["sd"]) and cfg.report.mini_models == str(paths["mini"])
    assert cfg.index.clip_model == str(paths["pool_clip"]) and cfg.index.path == str(paths["pool"])
    assert cfg.retrieve.url_base == "http://127.0.0.1:1234/" and cfg.retrieve.download.allow_loopback


def test_pool_server_serves_the_pool_on_a_free_port(tmp_path):
    """No saved port: each run takes a free one (the retrieval stage's key does not depend on it)."""
    from raugment.demo.corpus import build_corpus

    pool_dir = build_corpus(tmp_path / "pool", ["red circle"], per_class=2, distractors=0, seed=0)
    with demo.serve_corpus(pool_dir) as url:
        name = f"img/{_pool_ids(pool_dir)[0]}.jpg"  # the server serves every pool image here
        with urllib.request.urlopen(url + name, timeout=5) as resp:
            assert resp.status == 200 and resp.read()
        with demo.serve_corpus(pool_dir) as other:   # a second server beside it: another port
            assert other != url and other.startswith("http://127.0.0.1:")
    assert not list(tmp_path.rglob("*port*"))


def _pool_ids(pool_dir: Path) -> list[str]:
    from raugment.core import schema
    from raugment.demo.corpus import read_corpus

    return read_corpus(pool_dir).column(schema.ID).to_pylist()


def test_assets_are_prepared_once(tmp_path):
    small = ["mini.pool_per_class=4", "mini.distractors=4", "mini.heldout_per_class=2", "mini.precision_n=2",
             "mini.clip_steps=1", "mini.clip_train_per_class=2", "mini.clip_train_distractors=1",
             "mini.diffusion=false", "dataset.synthetic.num_classes=2"]
    cfg = demo.build_config(None, small, str(tmp_path))
    paths = demo.prepare_assets(tmp_path, cfg)
    assert {"sd", "clip", "aesthetic", "classifier", "pool", "pool_clip", "mini"} <= set(paths)
    assert paths["pool"] == paths["mini"] / "pool" and "mini_sd" not in paths
    stamp = (paths["pool_clip"] / "open_clip_model.safetensors").stat().st_mtime_ns
    pool_stamp = (paths["pool"] / "pool.parquet").stat().st_mtime_ns
    again = demo.prepare_assets(tmp_path, cfg)
    assert again == paths
    assert (paths["pool_clip"] / "open_clip_model.safetensors").stat().st_mtime_ns == stamp
    assert (paths["pool"] / "pool.parquet").stat().st_mtime_ns == pool_stamp


def test_demo_target_runs_one_stage_in_the_served_demo_world(tmp_path, monkeypatch):
    """``raugment demo --target retrieve``: the demo world's config (its models, corpus and server)
    goes to a one-target study of that stage, while the corpus is served."""
    from raugment import cli
    from raugment.demo.corpus import build_corpus
    from raugment.study import target

    pool = build_corpus(tmp_path / "pool", ["red circle"], per_class=2, distractors=0, seed=0)
    paths = {k: tmp_path / k for k in ("sd", "clip", "aesthetic", "classifier", "pool_clip")}

    def prepare(root, cfg):
        (root / "assets").mkdir(parents=True, exist_ok=True)
        return {**paths, "pool": pool}

    monkeypatch.setattr(demo, "prepare_assets", prepare)
    seen = {}

    def run_target(cfg, stage, pins, methods):
        name = f"img/{_pool_ids(pool)[0]}.jpg"
        with urllib.request.urlopen(cfg.retrieve.url_base + name, timeout=5) as resp:
            seen.update(stage=stage, methods=methods, pins=pins, served=resp.status, cfg=cfg)
        return []

    monkeypatch.setattr(target, "run_target", run_target)
    out = tmp_path / "out"
    assert cli.main(["demo", "--target", "retrieve", "--out", str(out), "--set", "retrieve.images_per_class=3"]) == 0
    assert (seen["stage"], seen["methods"], seen["served"]) == ("retrieve", [], 200)
    cfg = seen["cfg"]
    assert cfg.run.root == str(out) and cfg.index.path == str(pool.resolve()) and cfg.retrieve.images_per_class == 3
    assert seen["pins"] == target.Pins()
    assert cli.main(["demo", "--target", "train", "--method", "simple", "--out", str(out)]) == 0
    assert (seen["stage"], seen["methods"]) == ("train", ["simple"])
    assert not list(out.glob("retrieve/*"))  # nothing but the stand-in ran


@pytest.mark.slow
def test_make_demo_twice(tmp_path):
    """The whole demo (minutes on 2 cores); the second run skips every stage."""
    out = tmp_path / "demo"
    first = subprocess.run([sys.executable, "-m", "raugment.cli", "demo", "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "demo report:" in first.stdout and "toy world" in first.stdout
    report = Path(first.stdout.split("demo report:")[1].split()[0])
    assert report.exists() and (report.parent / "report.md").exists()
    md = (report.parent / "report.md").read_text()
    assert "CLIP precision@n" in md and "Are generated images recognisable?" in md and "(n=3)" in md
    second = subprocess.run([sys.executable, "-m", "raugment.cli", "demo", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0
    lines = [line for line in second.stderr.splitlines() if "raugment.study.executor: study [" in line]
    assert lines and all("skipped, already complete" in line for line in lines)
    assert "stage mini_models" in second.stderr and "already complete, skipping" in second.stderr
