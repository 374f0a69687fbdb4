"""Generation stage: plans, NSFW replacement, exact quotas, provenance, resume after kill, method choice.

The methods' own tests are in ``methods/`` (one module each) and ``test_methods_contract.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raugment.config import load_config
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.core.imageio import decode_image
from raugment.core.storage import Artifact, StageRun
from raugment.models.diffusion import load_pipeline, script_safety_checker
from raugment.stages.generate import stage as generate
from raugment.stages.generate.finetuned import FinetunedGeneration
from tests import REPO
from tests.helpers.generation import generate_overrides as _overrides


def _bundle(tiny_sd: Path, tmp_path_factory, flag_every: int) -> Path:
    out = tmp_path_factory.mktemp(f"sd-flag{flag_every}") / "sd"
    shutil.copytree(tiny_sd, out)
    script_safety_checker(out, flag_every)
    return out


@pytest.fixture(scope="module")
def sd_flag3(tiny_sd, tmp_path_factory) -> Path:
    return _bundle(tiny_sd, tmp_path_factory, 3)


@pytest.fixture(scope="module")
def sd_flag_all(tiny_sd, tmp_path_factory) -> Path:
    return _bundle(tiny_sd, tmp_path_factory, 1)


# ---- plans (no model) ------------------------------------------------------------------------


def test_plan_is_deterministic_and_ids_unique(dataset, tmp_path, tiny_sd):
    cfg = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.method": "clip_templates",
                                                             "generate.images_per_class": 50}))
    classes = generate.read_classes(dataset)
    method = generate.check_config(cfg)
    a = method.plan(classes, cfg.generate, dataset=dataset, finetune=None)
    b = method.plan(classes, cfg.generate, dataset=dataset, finetune=None)
    assert a == b and len(a) == 100
    assert len({r["id"] for r in a}) == 100 and len({r["seed"] for r in a}) == 100
    assert Counter(r["label"] for r in a) == {0: 50, 1: 50}
    nows = {0: "tigershark,Galeocerdocuvieri", 1: "desktopcomputer"}
    assert all(nows[r["label"]] in r["prompt"] for r in a)
    assert len({r["prompt"] for r in a}) > 20  # templates vary within a class
    other = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.method": "clip_templates",
                                                               "generate.images_per_class": 50,
                                                               "generate.seed": 1}))
    c = method.plan(classes, other.generate, dataset=dataset, finetune=None)
    assert [r["seed"] for r in c] != [r["seed"] for r in a]


# sha256 (first 16 hex) of the JSON plan rows (init images left out) of the dataset fixture at
# images_per_class=7, seed=3, as the methods planned them before they became plug-ins
PLAN_DIGESTS = {"simple": "5306d6be03f0255b", "simple_nows": "17381262ec83fcb4",
                "clip_templates": "318293ad4799ae9d", "sariyildiz": "2f41c132f56e443b",
                "boomerang": "f4982b7119bb0bec"}


@pytest.mark.parametrize("name", sorted(PLAN_DIGESTS))
def test_plans_are_those_of_earlier_releases(dataset, name, monkeypatch):
    """Prompts, seeds, ids and provenance of the built-in methods do not change (stage outputs and
    studies resume on them)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the default hub id is planned, never loaded: no cache check
    cfg = load_config(None, [f"generate.method={name}", "generate.images_per_class=7", "generate.seed=3"])
    rows = generate.check_config(cfg).plan(generate.read_classes(dataset), cfg.generate, dataset=dataset,
                                           finetune=None)
    keep = [{k: v for k, v in r.items() if k != "init_image"} for r in rows]
    assert hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16] == PLAN_DIGESTS[name]


def test_unknown_method_is_a_config_error(tmp_path, tiny_sd):
    cfg = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.method": "nope"}))
    with pytest.raises(ConfigError, match="generate.method.*known: .*boomerang.*simple"):
        generate.check_config(cfg)


def test_a_fine_tuned_method_needs_an_artifact_and_then_samples_from_it(tmp_path, tiny_sd):
    """A name that is no generation method is a fine-tuned method's: without an artifact the error
    lists the generation methods and says what is missing; with one it is :class:`FinetunedGeneration`
    under that name (the slots' seeds and ids use it)."""
    cfg = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.method": "imagic"}))
    with pytest.raises(ConfigError, match=r"generate\.method: 'imagic' is not a generation method \(known: "
                                          r"boomerang, clip_templates, sariyildiz, simple, simple_nows\).*"
                                          r"needs a fine-tuning artifact.*generate\.conditioning"):
        generate.check_config(cfg)
    generate.preflight(cfg)  # the study's preflight: the artifact arrives as the stage's input
    with pytest.raises(ConfigError, match="needs a fine-tuning artifact"):
        generate.run(cfg, Artifact("dataset", "x", tmp_path))
    assert not (tmp_path / "generate").exists()
    for method in (generate.check_config(cfg, Artifact("finetune", "k", tmp_path)),
                   generate.method_for(load_config(None, ["generate.method=imagic",
                                                          f"generate.conditioning={tmp_path}"]).generate)):
        assert isinstance(method, FinetunedGeneration) and method.name == "imagic"
    assert not isinstance(generate.check_config(load_config(None, _overrides(tmp_path, tiny_sd))), FinetunedGeneration)


# ---- the core loop in-process (pipeline's own safety-checker path) ----------------------------


def test_nsfw_samples_are_replaced_until_the_quota_is_met(dataset, tmp_path, sd_flag3):
    cfg = load_config(None, _overrides(tmp_path, sd_flag3, **{"generate.images_per_class": 5}))
    method = generate.check_config(cfg)
    rows = [r for r in method.plan(generate.read_classes(dataset), cfg.generate, dataset=dataset, finetune=None)
            if r["label"] == 0]
    pipe = load_pipeline(str(sd_flag3))
    from raugment.models.diffusion import SafetyScores

    images, failures = [], []
    scores = SafetyScores(pipe.safety_checker)
    for imgs, fails in generate.generate_class(pipe, method, rows, cfg.generate, scores=scores):
        images += imgs
        failures += fails
    # every 3rd sample is flagged. Batches of 3: [s0 s1 s2*] [s3 s4 s2'*] [s2''] -> slot 2 is
    # flagged at attempts 0 and 1 and filled at attempt 2, in a later batch (batches stay full).
    assert sorted(r["id"] for r in images) == sorted(r["id"] for r in rows)
    slot2 = rows[2]["id"]
    assert [(f["id"], f["reason"]) for f in failures] == [(f"{slot2}#0", "nsfw"), (f"{slot2}#1", "nsfw")]
    for img in images:
        params = img["params"]
        assert params["attempt"] == (2 if img["id"] == slot2 else 0)
        assert (img["seed"] != params["base_seed"]) == (img["id"] == slot2)
        assert img["nsfw_score"] is not None
        assert np.asarray(decode_image(img["image"])).max() > 0, "a blacked-out (flagged) image was kept"


# ---- the stage on Ray --------------------------------------------------------------------------


def test_unfillable_class_is_reported_not_silent(dataset, tmp_path, sd_flag_all):
    cfg = load_config(None, _overrides(tmp_path, sd_flag_all, **{"generate.max_attempts_per_image": 2,
                                                                 "generate.images_per_class": 2}))
    method = generate.check_config(cfg)
    planned = method.plan(generate.read_classes(dataset), cfg.generate, dataset=dataset, finetune=None)
    pipe = load_pipeline(str(sd_flag_all))
    stage = StageRun(tmp_path, "generate", generate.key_section(cfg.generate), {"dataset": dataset})
    stage.prepare(resumable=True)
    for label in (0, 1):
        rows = [r for r in planned if r["label"] == label]
        failures = []
        for images, batch_failures in generate.generate_class(pipe, method, rows, cfg.generate):
            assert not images
            failures += batch_failures
        generate.write_chunk(stage.path, label, 0, [], failures)
    generate.summarize(stage, planned, cfg.generate.max_attempts_per_image)
    assert dict(stage.stats.failures) == {"nsfw": 8, "nsfw_unfillable": 4}
    assert stage.stats.extra["unfilled_classes"] == {"n01491361": 2, "n03180011": 2}
    # the chunks are done (their failures shards mark them): a re-run has nothing left to try
    assert generate.done_chunks(stage.path) == {(0, 0), (1, 0)}


def test_a_redone_chunk_is_written_as_an_uninterrupted_run_writes_it(ray_session, dataset, tmp_path, tiny_sd):
    """Shard boundaries come from slot indices only: a chunk lost in a kill is made again from its
    first slot with the same batches, so the resumed stage holds the same shards, row for row."""
    # (tiny_sd: the scripted flag-every-n checker counts samples per process, so it would flag
    # other samples in a re-run by design)
    cfg = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.images_per_class": 5,
                                                             "generate.shard_images": 2,
                                                             "generate.pool.batch_size": 2}))
    art = generate.run(cfg, dataset)
    names = sorted(f.name for f in (art.path / "images").glob("*.parquet"))
    assert names == [f"part-c{c:06d}-k{k:06d}.parquet" for c in (0, 1) for k in (0, 1, 2)]
    first = {n: pq.read_table(art.path / "images" / n) for n in names}
    assert sorted(f.name for f in (art.path / "failures").glob("*.parquet")) == names  # the done markers
    # a kill in the middle of chunk 1 of class 0: none of its shards was written
    (art.path / "_SUCCESS").unlink()
    (art.path / "failures" / names[1]).unlink()
    (art.path / "images" / names[1]).unlink()
    again = generate.run(cfg, dataset)
    assert sorted(f.name for f in (again.path / "images").glob("*.parquet")) == names
    for n in names:
        assert pq.read_table(again.path / "images" / n).equals(first[n]), n
    assert again.stats["counts"]["images"] == 10 and again.stats["failures"] == art.stats["failures"]


_KILLED_RUN = """
import os, sys
from raugment.stages.generate import stage as generate
from raugment.config import load_config
from raugment.core.storage import Artifact
cfg = load_config(None, sys.argv[2:])
generate.run(cfg, Artifact.open(sys.argv[1]))
"""


def test_killed_run_resumes_without_duplicates(ray_session, dataset, tmp_path, tiny_sd):
    overrides = _overrides(tmp_path, tiny_sd, **{"generate.images_per_class": 8, "generate.pool.batch_size": 1})
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(dataset.path), *overrides],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gen_root = tmp_path / "generate"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not list(gen_root.glob("*/images/part-*.parquet")):
            assert proc.poll() is None, "the generation run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (stage_dir,) = gen_root.iterdir()
    assert not (stage_dir / "_SUCCESS").exists()
    time.sleep(1.0)  # the driver's actor is torn down after its driver died
    before = {f.name: set(pq.read_table(f).column("id").to_pylist())
              for f in (stage_dir / "images").glob("part-*.parquet")}
    done_before = set().union(*before.values())
    assert 0 < len(done_before) < 16

    art = generate.run(load_config(None, overrides), dataset)
    assert art.path == stage_dir
    ids = art.read("images").column("id").to_pylist()
    assert len(ids) == 16 and len(set(ids)) == 16, "quota not met exactly or duplicates"
    for name, shard_ids in before.items():  # finished shards are kept as they were
        assert set(pq.read_table(stage_dir / "images" / name).column("id").to_pylist()) == shard_ids
    images = art.read("images")
    assert Counter(images.column("label").to_pylist()) == {0: 8, 1: 8}
    assert set(images.column("prompt").to_pylist()) == {"A photo of tiger shark, Galeocerdo cuvieri.",
                                                        "A photo of desktop computer."}


def test_job_script_exact_quota_nsfw_provenance_and_skip(ray_session, tmp_path, sd_flag3, monkeypatch):
    """``python -m jobs.generate --config jobs/configs/generate_tiny.yaml`` with Boomerang picked by
    config, on a bundle whose safety checker flags every 3rd sample."""
    import runpy

    repo = REPO
    overrides = [f"run.root={tmp_path}", f"generate.model={sd_flag3}", "generate.method=boomerang",
                 "generate.images_per_class=3", "generate.steps=2", "generate.pool.batch_size=4"]
    monkeypatch.setattr(sys, "argv", ["jobs.generate", "--config", str(repo / "jobs/configs/generate_tiny.yaml"),
                                      *(x for o in overrides for x in ("--set", o))])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("jobs.generate", run_name="__main__")
    assert exit_.value.code == 0
    (stage_dir,) = (tmp_path / "generate").iterdir()
    art = Artifact.open(stage_dir)
    images = art.read("images")
    classes = pq.read_table(next((tmp_path / "dataset").iterdir()) / "classes.parquet").num_rows
    assert Counter(images.column("label").to_pylist()) == {label: 3 for label in range(classes)}
    assert len(set(images.column("id").to_pylist())) == images.num_rows
    stats = art.stats
    assert stats["failures"]["nsfw"] >= (3 * classes) // 3 and stats["unfilled_classes"] == {}
    prompts = pq.read_table(art.path / "prompts.parquet")
    assert prompts.schema == schema.PROMPTS and prompts.num_rows == 3 * classes
    assert set(images.column("id").to_pylist()) == set(prompts.column("id").to_pylist())
    for row in images.to_pylist():
        assert row["source"] == "generated" and row["split"] == "added" and row["method"] == "boomerang"
        assert row["model_id"] == str(sd_flag3) and row["nsfw_score"] is not None and row["prompt"] == ""
        params = json.loads(row["params"])
        assert {"scheduler", "steps", "guidance_scale", "strength", "source_id", "attempt", "base_seed"} <= set(params)
        assert params["steps"] == 2 and params["scheduler"] == "pndm"
        assert decode_image(row["image"]).size == (row["width"], row["height"]) == (32, 32)  # the originals' size
    # same config -> skipped; other resources -> same key (they are not part of it)
    cfg = load_config(repo / "jobs/configs/generate_tiny.yaml", [*overrides, "generate.pool.concurrency=2"])
    from raugment.stages.dataset import stage as dataset_stage

    assert generate.run(cfg, dataset_stage.run(cfg)).path == stage_dir


def test_one_pool_serves_every_class_with_one_pipeline_load_per_actor(ray_session, dataset, tmp_path, tiny_sd):
    """Start-up is paid per actor, not per class or batch; quotas are exact; "auto" options are
    resolved (CPU: float32) before they reach provenance; one right-sized shard per class."""
    cfg = load_config(None, _overrides(tmp_path, tiny_sd, **{"generate.images_per_class": 5,
                                                             "generate.pool.batch_size": 2}))
    art = generate.run(cfg, dataset)
    stats = art.stats
    assert stats["counts"]["classes"] == 2 and stats["actors"] == 1 and stats["pipeline_loads"] == 1
    assert stats["actor_start_s"] > 0 and stats["actor_s"] > 0
    images = art.read("images")
    assert Counter(images.column("label").to_pylist()) == {0: 5, 1: 5}
    assert len(set(images.column("id").to_pylist())) == 10
    assert {json.loads(p)["dtype"] for p in images.column("params").to_pylist()} == {"float32"}
    shards = sorted(f.name for f in (art.path / "images").glob("part-*.parquet"))
    assert [name[:len("part-c000000-")] for name in shards] == ["part-c000000-", "part-c000001-"]
    # an interrupted run whose images were all written: the re-run starts no actor at all
    (art.path / "_SUCCESS").unlink()
    again = generate.run(cfg, dataset)
    assert again.path == art.path and "actors" not in again.stats
    assert again.stats["counts"]["images"] == 10 and sorted(again.read("images").column("id").to_pylist()) == \
        sorted(images.column("id").to_pylist())


def _images_by_id(art: Artifact) -> dict[str, bytes]:
    t = art.read("images", columns=["id", "image"])
    return dict(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))


def test_a_study_scope_reuses_the_actors_and_the_pipeline_with_identical_images(ray_session, dataset,
                                                                                tmp_path, tiny_sd):
    """Two generation runs in one scope (as in a study): the second gets the first one's warm actor
    process and its loaded pipeline; the images are byte for byte those of runs in fresh actors."""
    from raugment.runtime.cluster import POOLS, keep_pools

    def cfg(root: Path, method: str):
        return load_config(None, _overrides(root, tiny_sd, **{"generate.method": method,
                                                              "generate.images_per_class": 3}))

    with keep_pools():
        simple = generate.run(cfg(tmp_path / "scope", "simple"), dataset)
        templates = generate.run(cfg(tmp_path / "scope", "clip_templates"), dataset)
        assert len(POOLS.idle_pids()) == 1                      # kept for the next stage run
    assert POOLS.idle_pids() == []                               # given back when the scope ends
    first, second = simple.stats, templates.stats
    assert first["pipeline_loads"] == 1 and not first["actors_reused"]
    assert second["pids"] == first["pids"] and second["actors_reused"]
    assert second["pipeline_loads"] == 0                         # same model settings: no second load
    # fresh actors outside any scope make the same images
    alone_simple = generate.run(cfg(tmp_path / "alone", "simple"), dataset)
    alone_templates = generate.run(cfg(tmp_path / "alone", "clip_templates"), dataset)
    assert alone_templates.stats["pipeline_loads"] == 1 and alone_templates.stats["pids"] != first["pids"]
    assert _images_by_id(simple) == _images_by_id(alone_simple)
    assert _images_by_id(templates) == _images_by_id(alone_templates)
    assert len(_images_by_id(templates)) == 6
