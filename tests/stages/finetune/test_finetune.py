"""The finetune stage on both runners (tiny SD, synthetic data): resume, checkpoints, LR, generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from raugment.config import load_config
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.core.storage import Artifact
from raugment.lib.finetuned.artifact import (
    CONDITIONINGS,
    list_checkpoints,
    load_finetuned,
    resolve,
)
from raugment.lib.finetuned.families import CondRow
from raugment.models.diffusion import load_components
from raugment.stages.finetune import stage as finetune
from raugment.stages.finetune.methods import get_method
from raugment.stages.generate import stage as generate
from raugment.stages.select.stage import select_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(root, tiny_sd, *overrides):
    return load_config(None, [
        f"run.root={root}", "run.progress=false",
        "dataset.synthetic.num_classes=2", "dataset.synthetic.train_per_class=40", "dataset.fraction=0.2",
        "dataset.synthetic.test_per_class=2",
        f"finetune.model={tiny_sd}", "finetune.resolution=32", "finetune.batch_size=2",
        "finetune.base_batch_size=8", "finetune.max_epochs=3", "finetune.patience=5", "finetune.lr=0.02",
        "finetune.workers.num_workers=1", "finetune.feature_weights=null", "finetune.feature_size=75",
        *overrides])


@pytest.fixture(scope="module")
def killed_run(ray_session, tiny_sd, tmp_path_factory):
    """ft_conditioning on a worker group whose worker fails once right after epoch 1 has been
    reported (the group is rebuilt: ``workers.max_failures`` defaults to 2)."""
    from raugment.stages.dataset import stage as dataset

    root = tmp_path_factory.mktemp("ft")
    cfg = tiny_cfg(root, tiny_sd, "finetune.runner=worker_group")
    ds = dataset.run(cfg)
    art = finetune.run(cfg, ds, fail_after_epoch=1)
    return cfg, ds, art


def events(art):
    return [json.loads(line) for line in (art.path / "events.jsonl").read_text().splitlines()]


def test_killed_run_resumes_from_its_checkpoint_without_repeating_the_epoch(killed_run):
    cfg, ds, art = killed_run
    ev = events(art)
    starts = [e for e in ev if e["event"] == "start"]
    assert [s["resume_after_epoch"] for s in starts] == [0, 1]  # restarted once, after epoch 1
    assert [e["epoch"] for e in ev if e["event"] == "epoch"] == [1, 2, 3]  # epoch 1 ran once
    assert art.stats["counts"]["restarts"] == 1
    assert [h["epoch"] for h in art.stats["history"]] == [1, 2, 3]
    # the ranks' own CPU seconds are counted (the resumed attempt's call at least), not only the driver's
    assert art.stats["usage"]["workers"]["cpu_s"] > 0
    # the same config again is the same complete artifact, not a new run
    assert finetune.run(cfg, ds).path == art.path and len(events(art)) == len(ev)


def test_square_root_lr_scaling_is_applied(killed_run):
    cfg, _, art = killed_run
    f = cfg.finetune
    expected = f.lr * math.sqrt(f.batch_size * f.workers.num_workers / f.base_batch_size)
    assert art.stats["lr"] == pytest.approx(expected)
    assert all(e["lr"] == pytest.approx(expected) for e in events(art) if e["event"] == "start")


def test_checkpoints_tables_and_latent_cache(killed_run):
    cfg, _, art = killed_run
    refs = {r.name: r for r in list_checkpoints(art.path)}
    assert {"best_train", "best_val", "epoch_001", "epoch_002", "epoch_003"} <= set(refs)
    history = {h["epoch"]: h for h in art.stats["history"]}
    best_val = min(history.values(), key=lambda h: (h["val_loss"], h["epoch"]))["epoch"]
    assert refs["best_val"].epoch == best_val
    table = pq.read_table(art.path / "checkpoints.parquet")
    assert set(table.column(schema.CHECKPOINT).to_pylist()) == set(refs)
    rows = pq.read_table(art.path / f"{CONDITIONINGS}.parquet").to_pylist()
    assert [r[schema.LABEL] for r in rows] == [0, 1] and all(r[schema.N_IMAGES] > 0 for r in rows)
    learned = load_finetuned(art.path, "epoch_003")
    assert learned.table.shape == (2, 77, 32) and learned.unet_dir is None
    init = get_method("ft_conditioning").init_table(
        load_components(cfg.finetune.model), [CondRow(r[schema.COND_ROW], r[schema.LABEL], r[schema.CLASS_NAME])
                                              for r in rows])
    assert not torch.allclose(learned.table, init)  # it trained
    items = pq.read_table(art.path / "items.parquet").to_pylist()
    assert {i[schema.SPLIT] for i in items} == {"train", "val"}
    assert art.stats["counts"]["val_images"] == sum(i[schema.SPLIT] == "val" for i in items)
    cached = sum(len(json.loads(safe_open(str(p), "pt").metadata()["ids"]))
                 for p in (art.path / "latents").glob("part-*.safetensors"))
    assert cached == len(items)  # encoded once: the restart reused the cache
    # the training state (optimizer included) is dropped after success
    assert not (art.path / finetune.CHECKPOINT_DIR).exists() and not (art.path / finetune.TRAIN_DIR).exists()


def _snapshots(path):
    return sorted(d.name for d in (path / "checkpoints").iterdir())


@pytest.mark.timeout(600)
def test_ray_train_runner_gives_the_same_artifact_under_the_same_key(killed_run, tmp_path):
    """The same config on a Ray Train ``TorchTrainer`` (no failure) writes the same tables and
    snapshots as the worker group that failed once and resumed: the runner is not in the key."""
    from raugment.core.config import with_overrides
    from raugment.stages.dataset import stage as dataset

    cfg, _, group = killed_run
    ray_cfg = with_overrides(cfg, {"finetune.runner": "ray_train", "run.root": str(tmp_path)})
    ray_art = finetune.run(ray_cfg, dataset.run(ray_cfg))
    assert ray_art.key == group.key and ray_art.path != group.path
    assert ray_art.stats["runner"] == "ray_train" and group.stats["runner"] == "worker_group"
    assert ray_art.stats["counts"]["restarts"] == 0
    for name in ("conditionings", "items"):
        assert ray_art.read(name).equals(group.read(name)), name
    tables = [art.read("checkpoints").to_pydict() for art in (ray_art, group)]
    for col in (schema.CHECKPOINT, schema.EPOCH, schema.SNAPSHOT):
        assert tables[0][col] == tables[1][col], col
    for col in (schema.TRAIN_LOSS, schema.VAL_LOSS):
        assert tables[0][col] == pytest.approx(tables[1][col], rel=1e-6), col
    histories = [art.stats["history"] for art in (ray_art, group)]
    assert [h["epoch"] for h in histories[0]] == [h["epoch"] for h in histories[1]] == [1, 2, 3]
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in histories[0]] == pytest.approx([h[key] for h in histories[1]], rel=1e-6), key
    assert _snapshots(ray_art.path) == _snapshots(group.path)
    for ref in list_checkpoints(group.path):
        a, b = (load_finetuned(art.path, ref.name).table for art in (ray_art, group))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_unknown_runner_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"finetune\.runner"):
        load_config(overrides=["finetune.runner=torchrun"])


@pytest.mark.timeout(600)
def test_an_interrupted_worker_group_stage_resumes_from_its_own_checkpoint(ray_session, tiny_sd, tmp_path):
    """Out of retries after epoch 1 (``max_failures=0``), the stage stops with its checkpoint and
    snapshot in the stage directory; the next run of the same key goes on from epoch 2 without
    redoing epoch 1 or writing its snapshot twice."""
    from raugment.stages.dataset import stage as dataset

    cfg = tiny_cfg(tmp_path, tiny_sd, "finetune.max_epochs=2", "finetune.workers.max_failures=0")
    ds = dataset.run(cfg)
    with pytest.raises(Exception, match="injected failure after epoch 1"):
        finetune.run(cfg, ds, fail_after_epoch=1)
    (stage,) = (tmp_path / "finetune").iterdir()
    assert json.loads((stage / finetune.CHECKPOINT_DIR / "latest" / "progress.json").read_text())["epoch"] == 1
    assert _snapshots(stage) == ["epoch_001"]
    first = (stage / "checkpoints" / "epoch_001" / "learned.safetensors").stat().st_mtime_ns
    art = finetune.run(cfg, ds)
    assert art.path == stage
    ev = events(art)
    assert [s["resume_after_epoch"] for s in ev if s["event"] == "start"] == [0, 1]
    assert [e["epoch"] for e in ev if e["event"] == "epoch"] == [1, 2]  # epoch 1 ran once
    assert _snapshots(stage) == ["epoch_001", "epoch_002"]
    assert (stage / "checkpoints" / "epoch_001" / "learned.safetensors").stat().st_mtime_ns == first
    assert [h["epoch"] for h in art.stats["history"]] == [1, 2] and art.stats["counts"]["restarts"] == 1
    assert not (stage / finetune.CHECKPOINT_DIR).exists()


def test_select_checkpoint_keeps_the_best_scorer_and_the_generator_follows(killed_run):
    _, _, art = killed_run
    refs = list_checkpoints(art.path)
    calls = []

    def stub(ref):  # stands in for "generate a small set, train, return val accuracy"
        calls.append(ref.epoch)
        return {1: 0.4, 2: 0.7, 3: 0.5}[ref.epoch]

    best = select_checkpoint(refs, stub, artifact=Artifact.open(art.path))
    assert best.epoch == 2 and best.name in ("epoch_002", "best_val", "best_train")
    assert sorted(calls) == [1, 2, 3]  # names sharing a snapshot are scored once
    _, snapshot, name = resolve(art.path)
    assert snapshot.name == "epoch_002" and name == best.name
    with pytest.raises(ValueError):
        select_checkpoint([], stub)


def test_the_generator_loads_the_snapshot_a_select_pointer_names(killed_run):
    from raugment.core.config import with_overrides
    from raugment.stages.select import stage as select

    cfg, _, art = killed_run
    pointer = select.run(with_overrides(cfg, {"select.checkpoint": "epoch_001"}), art)
    learned = load_finetuned(pointer.path)
    assert learned.checkpoint == "epoch_001" and learned.artifact == art.path
    assert torch.equal(learned.table, load_finetuned(art.path, "epoch_001").table)
    assert not torch.equal(learned.table, load_finetuned(art.path, "epoch_003").table)


def _images(pipe, **kwargs):
    gens = [torch.Generator("cpu").manual_seed(s) for s in range(len(kwargs.get("prompt") or kwargs["prompt_embeds"]))]
    with torch.inference_mode():
        return pipe(**kwargs, num_inference_steps=2, generator=gens, output_type="np").images


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    from raugment.models.diffusion import load_pipeline

    return load_pipeline(str(tiny_sd), safety_checker=False)


def test_trained_conditioning_changes_the_generators_output(killed_run, pipe):
    from raugment.lib.prompts import simple_nows_prompt

    _cfg, ds, art = killed_run
    g = load_config(None, ["generate.method=ft_conditioning", f"generate.conditioning={art.path}",
                           "generate.images_per_class=3", "generate.height=64", "generate.width=64"]).generate
    method = generate.method_for(g)
    classes = ds.read("classes").to_pylist()
    rows = method.plan(classes, g, dataset=ds, finetune=None)
    assert len(rows) == 6 and {r[schema.PARAMS]["cond_row"] for r in rows} == {0, 1}
    method.setup(pipe, g, None)
    tuned = _images(pipe, **method.call_kwargs(rows[:1], g))
    base = _images(pipe, prompt=[simple_nows_prompt(rows[0][schema.CLASS_NAME])], guidance_scale=g.guidance_scale,
                   height=64, width=64)
    assert np.abs(tuned - base).mean() > 1e-3


def test_bad_config_fails_before_any_work(tmp_path, tiny_sd):
    cfg = tiny_cfg(tmp_path, tiny_sd, "finetune.method=dreambooth")
    with pytest.raises(ConfigError, match="finetune.method"):
        finetune.run(cfg, Artifact("dataset", "x", tmp_path))
    cfg = tiny_cfg(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="finetune.model"):
        finetune.run(cfg, Artifact("dataset", "x", tmp_path))
    assert not (tmp_path / "finetune").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ft_cluster_conditioning", "pseudoword_dm"])
def test_cli_two_worker_ddp_run_then_generation_from_the_artifact(ray_session, tiny_sd, tmp_path, name):
    """``raugment finetune`` with 2 DDP workers (k-means clusters / UNet training), then the
    generation stage samples from the artifact."""
    from raugment.cli import main
    from raugment.core.storage import latest
    from raugment.stages.dataset import stage as dataset
    from raugment.stages.generate import stage as generate

    sets = ["run.root=" + str(tmp_path), "run.progress=false", f"finetune.method={name}",
            f"finetune.model={tiny_sd}", "finetune.workers.num_workers=2", "finetune.max_epochs=2",
            "finetune.clusters=2", "finetune.feature_weights=null", "finetune.feature_size=75",
            f"generate.model={tiny_sd}", "generate.images_per_class=3", "generate.steps=2",
            "generate.height=64", "generate.width=64", "generate.safety_checker=false",
            "generate.pool.num_gpus=0", "generate.pool.num_cpus=0.5"]
    config = "jobs/configs/finetune_tiny.yaml"
    assert main(["finetune", "--config", config, *[a for s in sets for a in ("--set", s)]]) == 0
    art = latest(tmp_path, "finetune")
    assert art.stats["counts"]["epochs"] == 2
    rows = pq.read_table(art.path / f"{CONDITIONINGS}.parquet").to_pylist()
    if name == "ft_cluster_conditioning":
        assert {r[schema.CLUSTER] for r in rows} == {0, 1}  # k = 2 clusters in every class
        assert len(rows) == 2 * len({r[schema.LABEL] for r in rows})
        assert art.stats["usage"]["tasks"]["cpu_s"] > 0  # the Inception feature actors' own CPU
    else:
        assert load_finetuned(art.path).unet_dir is not None
    cfg = load_config(config, [*sets, f"generate.method={name}", f"generate.conditioning={art.path}"])
    out = generate.run(cfg, dataset.run(cfg))
    images = out.read("images").to_pylist()
    n_classes = len({r[schema.LABEL] for r in rows})
    assert len(images) == 3 * n_classes
    assert out.stats["usage"]["actors"]["cpu_s"] > 0  # generation ran on actors: their CPU counts
    assert all(json.loads(i[schema.PARAMS])["cond_row"] in {r[schema.COND_ROW] for r in rows} for i in images)
