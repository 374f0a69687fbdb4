import json
import os
import re
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.stats import mean_se
from raugment.core.storage import run_stage, write_text_atomic
from raugment.lib import loader
from raugment.lib.evaluate import evaluate, overall
from raugment.models.classifier import build_model, load_classifier
from raugment.runtime.contexts import LocalContext
from raugment.stages.assemble import stage as assemble
from raugment.stages.train import stage as train
from tests.helpers.train_data import make_dataset

CLASSES = 4


def _cfg(root, *extra):
    return load_config(overrides=[
        f"run.root={root}", "run.progress=false", "train.model=tiny_cnn", "train.image_size=32",
        "train.batch_size=32", "train.lr=0.05", "train.max_epochs=4", "train.loader_workers=0",
        "assemble.ratio=0", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    dataset = make_dataset(root, [32] * CLASSES, val=6, test=8)
    manifest = assemble.run(_cfg(root), dataset, {})
    return root, dataset, manifest


# ---- the recipe, on scripted accuracy curves --------------------------------------------------

def test_recipe_cuts_lr_after_patience_and_stops_after_stop_patience():
    r = train.PlateauRecipe(lr=0.1, lr_patience=10, lr_factor=0.1, stop_patience=20, max_epochs=270)
    curve = [0.1, 0.2, 0.3, 0.4, 0.5] + [0.5] * 100  # improves for 5 epochs, then flat
    lrs, decisions = [], []
    for acc in curve:
        lrs.append(r.lr)
        decisions.append(r.step(acc))
        if r.stopped:
            break
    # best at epoch 4; epochs 5..14 do not improve -> LR / 10 from epoch 15; 20 flat epochs -> stop
    assert r.best_epoch == 4 and r.best == 0.5
    assert lrs[:15] == [0.1] * 15 and lrs[15] == pytest.approx(0.01)
    assert len(decisions) == 25 and r.reason == "no_improvement"
    assert [i for i, d in enumerate(decisions) if d.lr_reduced] == [14, 24]
    assert [i for i, d in enumerate(decisions) if d.is_best] == [0, 1, 2, 3, 4]


def test_recipe_improvement_resets_patience_and_max_epochs_caps():
    r = train.PlateauRecipe(lr=1.0, lr_patience=2, stop_patience=3, max_epochs=6)
    for acc in [0.5, 0.4, 0.4, 0.6, 0.5, 0.7]:  # LR cut after two bad epochs; 0.6 and 0.7 reset
        d = r.step(acc)
    assert r.lr == pytest.approx(0.1) and r.best_epoch == 5
    assert d.stop and r.reason == "max_epochs" and r.epochs_done == 6
    with pytest.raises(RuntimeError):
        r.step(0.9)


def test_recipe_state_round_trip_gives_the_same_future():
    curve = [0.3, 0.2, 0.2, 0.2, 0.25, 0.2, 0.2, 0.2]
    a = train.PlateauRecipe(lr=0.1, lr_patience=2, stop_patience=5, max_epochs=50)
    b = train.PlateauRecipe(lr=0.1, lr_patience=2, stop_patience=5, max_epochs=50)
    for acc in curve[:3]:
        a.step(acc)
        b.step(acc)
    b = train.PlateauRecipe.from_state(json.loads(json.dumps(b.state_dict())))
    for acc in curve[3:]:
        if a.stopped:
            break
        assert a.step(acc) == b.step(acc)


# ---- the data path ------------------------------------------------------------------------------

def test_epoch_plan_gives_ranks_equal_disjoint_shares(data):
    _, dataset, manifest = data
    units = loader.build_index(manifest.read("manifest"), manifest.path.parents[1])
    assert loader.count(units) == 32 * CLASSES and len(units) > 1

    def ids(plan):
        return [(u, int(r)) for u, rows, _ in plan for r in rows]

    for world in (2, 3):
        shares = [ids(loader.plan_epoch(units, epoch=1, seed=0, shuffle=True, rank=k, world=world))
                  for k in range(world)]
        assert len({len(s) for s in shares}) == 1                 # equal steps on every rank
        flat = [x for s in shares for x in s]
        assert len(flat) == len(set(flat)) == (128 // world) * world
    e1 = ids(loader.plan_epoch(units, epoch=1, seed=0, shuffle=True))
    assert e1 == ids(loader.plan_epoch(units, epoch=1, seed=0, shuffle=True))
    assert e1 != ids(loader.plan_epoch(units, epoch=2, seed=0, shuffle=True))
    # evaluation: uneven ranks, loader workers, nothing lost
    val = loader.split_index(dataset, "val")
    got = [x for k in range(3) for w in range(2)
           for x in ids(loader.plan_epoch(val, epoch=0, seed=0, shuffle=False, rank=k, world=3,
                                          worker=w, workers=2, drop_uneven=False))]
    assert sorted(got) == sorted(ids(loader.plan_epoch(val, epoch=0, seed=0, shuffle=False)))
    assert len(got) == 6 * CLASSES


def test_loader_yields_every_image_once_with_labels(data):
    _, dataset, _ = data
    units = loader.split_index(dataset, "test")
    ds = loader.build_dataset(units, loader.build_transform(32, train=False), shuffle=False)
    labels = [int(y) for _, y in ds]
    assert sorted(labels) == sorted(c for c in range(CLASSES) for _ in range(8))
    shuffled = loader.build_dataset(units, loader.build_transform(32, train=True), shuffle=True,
                                    buffer_size=5)
    batch = next(iter(loader.make_loader(shuffled, 7, num_workers=2)))
    assert batch[0].shape == (7, 3, 32, 32) and batch[0].dtype == torch.float32
    assert len([1 for _ in shuffled]) == 32
    raw = loader.build_dataset(units, None, shuffle=False)
    data_bytes, _ = next(iter(raw))
    assert data_bytes.dtype == torch.uint8 and bytes(data_bytes[:4].tolist()) == b"\x89PNG"


def test_manifest_with_unknown_ids_is_refused(data, tmp_path):
    root, _, manifest = data
    table = manifest.read("manifest")
    bad = table.set_column(0, S.ID, __import__("pyarrow").array(["nope", *table.column(S.ID).to_pylist()[1:]]))
    with pytest.raises(ValueError, match="1 manifest ids are not in"):
        loader.build_index(bad, root)


def test_a_manifest_that_leaves_a_class_out_is_scored_on_the_other_classes(data, tmp_path):
    from tests.helpers.train_data import make_added

    _, dataset, _ = data
    short = make_added(tmp_path, "retrieval", [32, 32, 32, 5], "retrieved", with_images=False)
    cfg = _cfg(tmp_path, "assemble.census_ratio=100")
    manifest = assemble.run(cfg, dataset, {}, None, {"retrieval": short})  # the baseline of a study
    spec = train.build_spec(cfg, dataset, manifest)
    assert spec.scored == [0, 1, 2] and spec.num_classes == CLASSES
    for units in (spec.val_units, spec.test_units, spec.train_units):
        assert set(np.concatenate([u.labels for u in units]).tolist()) == {0, 1, 2}
    assert loader.count(spec.test_units) == 3 * 8
    full = train.build_spec(_cfg(tmp_path), dataset, data[2])
    assert full.scored is None and loader.count(full.test_units) == CLASSES * 8


# ---- the loop: the best-validation weights are the ones scored --------------------------------

class KeepEveryEpoch(LocalContext):
    def __init__(self, d):
        super().__init__(d, train.TrainState)
        self.models = []

    def report(self, metrics, state):
        super().report(metrics, state)
        self.models.append({k: v.clone() for k, v in state.model.items()})


def test_best_validation_checkpoint_is_the_one_scored(data, tmp_path, monkeypatch):
    _, dataset, manifest = data
    cfg = _cfg(tmp_path, "train.max_epochs=3")
    spec = train.build_spec(cfg, dataset, manifest)
    scripted = iter([0.2, 0.9, 0.5])  # validation accuracy per epoch: best is epoch 1
    real = train._evaluate

    def fake_evaluate(model, batches, spec_, ctx, autocast):
        if batches.dataset.units[0] is spec.val_units[0]:  # the val split, not test
            acc = next(scripted)
            return torch.tensor([[100, round(acc * 100), 100]] + [[0, 0, 0]] * (CLASSES - 1))
        return real(model, batches, spec_, ctx, autocast)

    monkeypatch.setattr(train, "_evaluate", fake_evaluate)
    ctx = KeepEveryEpoch(tmp_path / "ck")
    final = train.fit(spec, ctx)
    assert final[S.BEST_EPOCH] == 1 and final[S.EPOCHS_RUN] == 3
    state = train.TrainState.read(tmp_path / "ck" / "latest")
    epoch1 = ctx.models[1]
    assert all(torch.equal(state.best[k], epoch1[k]) for k in epoch1)
    assert not all(torch.equal(ctx.models[2][k], epoch1[k]) for k in epoch1)  # last epoch != best
    net = build_model("tiny_cnn", CLASSES)
    net.load_state_dict(epoch1)
    test = loader.build_dataset(spec.test_units, loader.build_transform(32, False), shuffle=False)
    counts = evaluate(net, loader.make_loader(test, 16, 0), CLASSES)
    assert counts.tolist() == state.test_counts
    assert overall(counts.tolist())["top1"] == final[S.TEST_TOP1]


# ---- Ray Train: 2 DDP workers learn, and a killed worker resumes from the last checkpoint ------

def _registered_checkpoints(root: Path) -> int:
    """Checkpoints Ray Train's controller has registered (its snapshot file in the run storage)."""
    snaps = list(root.glob("train/*/ray/*/checkpoint_manager_snapshot.json"))
    return len(set(re.findall(r"checkpoint_\d{4}-[\d_.-]+", snaps[0].read_text()))) if snaps else 0


def kill_once(marker_dir: str, epoch: int, rank: int) -> None:
    """Epoch hook run on the workers: log each epoch start; kill rank 1 at epoch 2, once."""
    d = Path(marker_dir)
    with open(d / "starts.txt", "a") as f:
        f.write(f"{epoch} {rank} {os.getpid()}\n")
    if epoch == 2 and rank == 1 and not (d / "killed").exists():
        # The controller registers reported checkpoints when it next polls the workers (every 2 s);
        # a crash before that loses the newest one. Crash once epochs 0 and 1 are registered, so
        # the test checks resumption, not that race.
        deadline = time.monotonic() + 60
        while _registered_checkpoints(d) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        (d / "killed").write_text("1")
        os._exit(1)  # a hard crash: no exception handling, no cleanup


@pytest.mark.timeout(420)
def test_ray_train_runner_ddp_two_workers_learn_and_resume_after_a_worker_is_killed(ray_session, data, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    _, dataset, manifest = data
    cfg = _cfg(tmp_path, "train.runner=ray_train", "train.workers.num_workers=2", "train.workers.max_failures=1")
    art = train.run(cfg, dataset, manifest, epoch_hook=partial(kill_once, str(tmp_path)))

    starts = [tuple(map(int, line.split())) for line in (tmp_path / "starts.txt").read_text().splitlines()]
    assert (tmp_path / "killed").exists()
    per_epoch = {e: sum(1 for s in starts if s[0] == e) for e in range(4)}
    assert per_epoch[0] == per_epoch[1] == 2           # finished epochs were not redone
    assert per_epoch[2] >= 3 and per_epoch[3] == 2      # epoch 2 started again after the crash
    assert len({pid for e, r, pid in starts if r == 1}) == 2  # rank 1 is a new process

    results = train.read_results(art)
    history = art.read("history")
    assert history.column(S.EPOCH).to_pylist() == [0, 1, 2, 3]
    assert results[S.EPOCHS_RUN] == 4 and results["n_train"] == 128
    assert results[S.TEST_TOP1] > 0.5  # chance is 0.25
    per_class = art.read("results_per_class")
    assert per_class.schema == S.RESULTS_PER_CLASS and sum(per_class.column(S.N_TEST).to_pylist()) == 32
    # the kept bundle is the scored model: re-scoring it here gives the same test accuracy
    model = load_classifier(art.path / "model")
    test = loader.build_dataset(loader.split_index(dataset, "test"), loader.build_transform(32, False),
                                shuffle=False)
    assert overall(evaluate(model, loader.make_loader(test, 16, 0), CLASSES).tolist())["top1"] == \
        results[S.TEST_TOP1]
    assert not (art.path / "ray").exists()  # checkpoints dropped once the best model is kept


# ---- repeats -----------------------------------------------------------------------------------

def test_repeats_write_mean_and_standard_error_over_five_runs(data, tmp_path, monkeypatch):
    _, dataset, manifest = data
    accs = iter([0.61, 0.63, 0.60, 0.64, 0.62])

    def fake_run(cfg, dataset_, manifest_, **_):
        acc = next(accs)

        def body(run):
            write_text_atomic(json.dumps({k: acc for k in train.RUN_METRICS}), run.path / train.RESULTS_FILE)

        return run_stage(cfg.run.root, "train", {"acc": acc}, {}, body)

    monkeypatch.setattr(train, "run", fake_run)
    cfg = _cfg(tmp_path, "train.seeds=[0]")
    out = train.run_repeats(cfg, dataset, [manifest] * 5)
    mean, se = mean_se([0.61, 0.63, 0.60, 0.64, 0.62])
    assert out["summary"][S.TEST_TOP1]["n"] == 5
    assert out["summary"][S.TEST_TOP1]["mean"] == pytest.approx(mean)
    assert out["summary"][S.TEST_TOP1]["se"] == pytest.approx(se)
    saved = json.loads((Path(out[S.RUN_PATH]) / "repeats.json").read_text())
    assert saved["summary"][S.TEST_TOP1]["se"] == pytest.approx(se) and len(saved["runs"]) == 5


def test_gpu_decode_path_matches_cpu_decode_on_cpu():
    """``train.gpu_decode`` logic, run with device=cpu: JPEG via decode_jpeg, PNG via fallback."""
    from raugment.core.imageio import encode_image
    from raugment.stages.dataset.sources.synthetic import draw

    rng = np.random.default_rng(0)
    imgs = [draw(c, rng, 40) for c in range(3)]
    encoded = [encode_image(imgs[0], "JPEG", 95), encode_image(imgs[1], "PNG"), encode_image(imgs[2], "JPEG", 95)]
    as_tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    got = loader.gpu_decode_batch(as_tensors, torch.device("cpu"), 32, train=False)
    cpu = torch.stack([loader.build_transform(32, train=False)(loader.decode_rgb(b)) for b in encoded])
    assert got.shape == cpu.shape == (3, 3, 32, 32)
    assert (got - cpu).abs().mean() < 0.05  # same pixels up to decoder/resampler rounding
    assert loader.gpu_decode_batch(as_tensors, torch.device("cpu"), 24, train=True).shape == (3, 3, 24, 24)


def test_training_modules_import_without_torch_or_ray():
    import subprocess

    code = ("import sys, raugment.stages.train.stage, raugment.study.tune, raugment.stages.assemble.stage, "
            "raugment.lib.loader, raugment.lib.evaluate, raugment.core.stats; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the worker_group runner: same result as Ray Train, one start-up per study, resumes ---------

def log_start(marker_dir: str, epoch: int, rank: int) -> None:
    """Epoch hook: record (epoch, rank, pid) of each epoch start."""
    with open(Path(marker_dir) / "starts.txt", "a") as f:
        f.write(f"{epoch} {rank} {os.getpid()}\n")


def kill_group_member_once(marker_dir: str, epoch: int, rank: int) -> None:
    """Epoch hook: log each epoch start; rank 1 dies hard at the start of epoch 2, once."""
    log_start(marker_dir, epoch, rank)
    d = Path(marker_dir)
    if epoch == 2 and rank == 1 and not (d / "killed").exists():
        (d / "killed").write_text("1")
        os._exit(1)  # no clean-up: rank 0 is left waiting in a collective


def _starts(d: Path) -> list[tuple[int, int, int]]:
    return [tuple(map(int, line.split())) for line in (d / "starts.txt").read_text().splitlines()]


def test_unknown_runner_is_a_config_error_naming_the_key():
    from raugment.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.runner"):
        load_config(overrides=["train.runner=torchrun"])


@pytest.mark.timeout(420)
def test_worker_group_runner_trains_to_the_ray_train_result(ray_session, data, tmp_path):
    _, dataset, manifest = data
    arts = {}
    for runner in ("ray_train", "worker_group"):
        cfg = _cfg(tmp_path / runner, f"train.runner={runner}", "train.workers.num_workers=2",
                   "train.max_epochs=2", "train.keep_ray_checkpoints=true")
        arts[runner] = train.run(cfg, dataset, manifest)
    ray_res, group_res = (train.read_results(arts[r]) for r in ("ray_train", "worker_group"))
    for key in (S.TEST_TOP1, S.TEST_TOP5, S.VAL_TOP1_BEST, S.BEST_EPOCH, S.EPOCHS_RUN, "n_train"):
        assert group_res[key] == ray_res[key], key
    hist = [arts[r].read("history") for r in ("ray_train", "worker_group")]
    for col in (S.TRAIN_LOSS, S.VAL_TOP1, S.TRAIN_IMAGES):
        assert hist[1].column(col).to_pylist() == pytest.approx(hist[0].column(col).to_pylist(), rel=1e-6)
    a, b = (load_classifier(arts[r].path / "model").state_dict() for r in ("ray_train", "worker_group"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the worker_group runner checkpoints into the stage's own directory
    assert (arts["worker_group"].path / train.CHECKPOINT_DIR / "latest" / train.CKPT_MODEL).exists()
    assert not (arts["worker_group"].path / "ray").exists()
    # both runners count the two ranks' own CPU seconds (not only the driver's)
    for r in ("ray_train", "worker_group"):
        stats = arts[r].stats
        assert stats["usage"]["workers"]["calls"] == 2 and stats["usage"]["workers"]["cpu_s"] > 0, r
        assert stats["cpu_s"] >= stats["usage"]["workers"]["cpu_s"] + stats["usage"]["driver"]["cpu_s"] - 0.01


@pytest.mark.timeout(420)
def test_worker_group_is_started_once_for_many_classifiers(ray_session, data, tmp_path):
    import ray.cloudpickle

    from raugment.runtime.worker_group import GROUPS, keep_groups

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _, dataset, manifest = data
    started = GROUPS.started
    pids_by_run = []
    with keep_groups():
        for seed in (0, 1, 2):
            marks = tmp_path / f"seed{seed}"
            marks.mkdir()
            cfg = _cfg(tmp_path, "train.runner=worker_group", "train.workers.num_workers=2",
                       "train.max_epochs=1", f"train.seed={seed}")
            train.run(cfg, dataset, manifest, epoch_hook=partial(log_start, str(marks)))
            pids_by_run.append({rank: pid for _, rank, pid in _starts(marks)})
        idle = GROUPS.idle_pids()
    assert GROUPS.started == started + 1                     # one group for three classifiers
    assert pids_by_run[0] == pids_by_run[1] == pids_by_run[2]  # the same two processes each time
    assert sorted(pids_by_run[0]) == [0, 1] and idle == [[pids_by_run[0][0], pids_by_run[0][1]]]
    assert GROUPS.idle_pids() == []                          # the scope's end shut the group down
    # outside a scope a run does not keep its group (its CPUs go back to Ray)
    cfg = _cfg(tmp_path / "alone", "train.runner=worker_group", "train.max_epochs=1", "train.workers.num_workers=1")
    train.run(cfg, dataset, manifest)
    assert GROUPS.started == started + 2 and GROUPS.idle_pids() == []


@pytest.mark.timeout(420)
def test_worker_group_resumes_after_a_member_is_killed(ray_session, data, tmp_path):
    import ray.cloudpickle

    from raugment.runtime.worker_group import GROUPS

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _, dataset, manifest = data
    started = GROUPS.started
    cfg = _cfg(tmp_path, "train.runner=worker_group", "train.workers.num_workers=2",
               "train.workers.max_failures=1")
    art = train.run(cfg, dataset, manifest, epoch_hook=partial(kill_group_member_once, str(tmp_path)))

    starts = _starts(tmp_path)
    assert (tmp_path / "killed").exists()
    per_epoch = {e: sum(1 for s in starts if s[0] == e) for e in range(4)}
    assert per_epoch[0] == per_epoch[1] == 2            # finished epochs were not redone
    assert per_epoch[2] in (3, 4) and per_epoch[3] == 2  # epoch 2 started again on the new group
    assert len({pid for e, r, pid in starts if r == 1}) == 2 and len({pid for e, r, pid in starts if r == 0}) == 2
    assert GROUPS.started == started + 2                # the broken group was replaced once
    results = train.read_results(art)
    assert art.read("history").column(S.EPOCH).to_pylist() == [0, 1, 2, 3]
    assert results[S.EPOCHS_RUN] == 4 and results[S.TEST_TOP1] > 0.5  # chance is 0.25
    assert not (art.path / train.CHECKPOINT_DIR).exists()  # dropped once the best model is kept


def fail_from(first_bad: int, marker_dir: str, epoch: int, rank: int) -> None:
    """Epoch hook: log each epoch start; raise from epoch ``first_bad`` on."""
    log_start(marker_dir, epoch, rank)
    if epoch >= first_bad:
        raise RuntimeError(f"epoch {epoch} is broken")


def _failing_run(tmp_path, data, first_bad: int, max_failures: int):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _, dataset, manifest = data
    cfg = _cfg(tmp_path, "train.runner=worker_group", "train.workers.num_workers=1",
               f"train.workers.max_failures={max_failures}")
    with pytest.raises(Exception, match=f"epoch {first_bad} is broken"):
        train.run(cfg, dataset, manifest, epoch_hook=partial(fail_from, first_bad, str(tmp_path)))
    return cfg


@pytest.mark.timeout(300)
def test_worker_group_gives_up_after_max_failures(ray_session, data, tmp_path):
    _failing_run(tmp_path, data, first_bad=0, max_failures=1)
    assert len(_starts(tmp_path)) == 2  # the first try and one retry, no more


@pytest.mark.timeout(420)
def test_an_interrupted_worker_group_stage_resumes_from_its_own_checkpoint(ray_session, data, tmp_path):
    """A stage that died half-way (here: out of retries at epoch 2) keeps its checkpoint; the next
    run of the same stage key goes on from epoch 2."""
    cfg = _failing_run(tmp_path, data, first_bad=2, max_failures=0)
    _, dataset, manifest = data
    art = train.run(cfg, dataset, manifest, epoch_hook=partial(log_start, str(tmp_path)))
    assert [e for e, _, _ in _starts(tmp_path)] == [0, 1, 2, 2, 3]  # epochs 0 and 1 ran once
    assert art.read("history").column(S.EPOCH).to_pylist() == [0, 1, 2, 3]


def test_fit_resolves_auto_gpu_options_for_its_device(data, tmp_path, monkeypatch):
    """On a CPU context "auto" means no autocast, contiguous tensors and no torch.compile; an
    explicit ``train.compile=true`` compiles the training model (torch.compile faked here)."""
    _, dataset, manifest = data
    seen = {"amp": [], "compiled": 0}
    real_autocast = train._autocast_factory

    def autocast(amp, device):
        seen["amp"].append(amp)
        return real_autocast(amp, device)

    def fake_compile(model, **kw):
        seen["compiled"] += 1
        return model

    monkeypatch.setattr(train, "_autocast_factory", autocast)
    monkeypatch.setattr(torch, "compile", fake_compile)
    spec = train.build_spec(_cfg(tmp_path, "train.max_epochs=1"), dataset, manifest)
    assert spec.train.amp == "auto"
    train.fit(spec, LocalContext(tmp_path / "auto", train.TrainState))
    assert seen == {"amp": ["none"], "compiled": 0}
    spec = train.build_spec(_cfg(tmp_path, "train.max_epochs=1", "train.compile=true"), dataset, manifest)
    train.fit(spec, LocalContext(tmp_path / "compiled", train.TrainState))
    assert seen["compiled"] == 1
