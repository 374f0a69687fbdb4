"""The rehearsal of the real study: ``jobs/configs/imagenet10.yaml`` as shipped, on offline stand-ins."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raugment.stages.dataset.classnames import lookup
from tests import REPO

# Only the rehearsal's own lists (raugment.demo.rehearse: paths and model ids, box sizes, trap
# workarounds) change the preset: all 11 methods, 5 sets, every checkpoint candidate (252 stage runs).
CLASSES = 10  # ImageNet synsets of the stand-in (the example: 100; 10 keep it in minutes on 2 cores)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # measured 465-680 s at load 6-20 on 2 cores (4 helpers beside it); aim: < 4 min idle
def test_imagenet10_preset_runs_end_to_end_on_stand_ins(tmp_path):
    out = tmp_path / "rehearsal"
    cmd = [sys.executable, "-m", "raugment.cli", "rehearse", "--out", str(out), "--classes", str(CLASSES)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads((out / "rehearsal.json").read_text())
    # the dry-run planned exactly the stage runs that ran (ids carry every stage's config and inputs)
    assert found["plan_matches"] and found["planned"] == found["executed"] and not found["failed"]
    stages = set(found["executed"].values())
    assert len(found["planned"]) > 200  # 60 classifiers + checkpoint selection + the stages before them
    assert stages >= {"dataset", "index", "retrieve", "finetune", "select", "generate", "filter", "dedup",
                      "audit", "assemble", "train"}
    report = Path(found["report"])
    assert report.exists() and (report.parent / "report.md").exists()
    md = (report.parent / "report.md").read_text()
    assert "retrieval" in md and "ft_cluster_conditioning" in md
    # the stand-in index names a few classes rarely: retrieval cannot fill them. The study's shortfall
    # policy (the preset's default, exclude) finds them, leaves them out of every classifier and
    # lists them in the report, with no exclusion by hand and no classifier failing
    index = json.loads((out / "standins" / "laion" / ".complete").read_text())
    assert found["rare"] == index["rare"] and 1 <= len(index["rare"]) < CLASSES
    assert not found["excluded"]
    rare_names = {lookup(c).name for c in index["rare"]}
    assert found["shortfall"] and set(found["shortfall"]) <= rare_names
    (ds,) = json.loads((report.parent / "report.json").read_text())["datasets"].values()
    left_out = ds["shortfalls"]["excluded"]
    assert left_out and set(left_out) <= rare_names, (left_out, rare_names)
    assert "could not be filled" in md
    assert "plans match" in proc.stdout
