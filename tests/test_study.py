import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raugment.config import load_config
from raugment.study import read_state

REPO = Path(__file__).resolve().parent.parent

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
    from raugment.models.tiny import write_tiny_bundles

    return str(write_tiny_bundles(tmp, parts=["sd"])["sd"].resolve())


def _comparable(report_dir: Path) -> dict:
    data = json.loads((report_dir / "report.json").read_text())
    data.pop("costs")  # wall/CPU seconds differ between runs; everything else must not
    return data


@pytest.mark.ray
def test_killed_study_resumes_to_the_same_report(ray_session, tmp_path, caplog):
    from raugment import study

    sd = _tiny_sd(tmp_path / "models")
    overrides = [f"generate.model={sd}", f"filter.safety_model={sd}"]
    # Uninterrupted run.
    cfg_a = load_config(_write_config(tmp_path / "a.yaml", tmp_path / "a"), overrides)
    _, rep_a = study.run(cfg_a)
    # Same study in another process, killed once its first stages are done ...
    address = ray_session.get_runtime_context().gcs_address
    cfg_b = _write_config(tmp_path / "b.yaml", tmp_path / "b", address)
    cmd = [sys.executable, "-m", "raugment.cli", "run", str(cfg_b), *sum((["--set", o] for o in overrides), [])]
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
    cfg_b = load_config(tmp_path / "b.yaml", overrides + ["cluster.address=null"])
    caplog.set_level("INFO", logger="raugment.study")
    _, rep_b = study.run(cfg_b)
    assert _comparable(rep_b.path) == _comparable(rep_a.path)
    assert rep_b.path.relative_to(tmp_path / "b") == rep_a.path.relative_to(tmp_path / "a")
    # A third run skips every stage and says so.
    caplog.clear()
    study.run(cfg_b)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study [")]
    assert lines and all("skipped, already complete" in line for line in lines)
