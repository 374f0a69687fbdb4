"""Resume is exact, and DDP scores what it saves.

* A run stopped after any epoch and resumed ends with the weights, history and test counts of the
  uninterrupted run, bit for bit on CPU (every RNG is re-seeded per (seed, rank, epoch)).
* Two DDP ranks hold one model after every epoch (BatchNorm buffers averaged), so the test counts
  they report are those of the saved model.
* Slow: the same through the stage on a worker group, for 1 and 2 workers, after a killed worker
  and after a stage that died (the next run of its key resumes).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

from raugment.config import load_config
from raugment.core import schema as S
from raugment.core.artifacts import MODEL_DIR, RESULTS_FILE
from raugment.lib import loader
from raugment.lib.evaluate import evaluate, overall
from raugment.models.classifier import WEIGHTS_FILE, build_model, load_classifier
from raugment.runtime.contexts import GroupContext, LocalContext, seed_epoch, sync_buffers
from raugment.runtime.worker_group import Member
from raugment.stages.assemble import stage as assemble
from raugment.stages.train import stage as train
from tests.helpers.train_data import make_dataset

CLASSES = 4
TIMINGS = (S.EPOCH_S, S.TRAIN_S)  # wall-clock columns: the only ones allowed to differ


def _cfg(root, *extra):
    return load_config(overrides=[
        f"run.root={root}", "run.progress=false", "train.model=tiny_cnn", "train.image_size=32",
        "train.batch_size=16", "train.lr=0.05", "train.max_epochs=3", "train.loader_workers=0",
        "assemble.ratio=0", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    dataset = make_dataset(root, [16] * CLASSES, val=4, test=6)
    manifest = assemble.run(_cfg(root), dataset, {})
    return root, dataset, manifest


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rows(history):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in history]


class Stop(Exception):
    pass


def stop_at(epoch_to_stop: int, epoch: int, rank: int) -> None:
    """Epoch hook: the run dies as epoch ``epoch_to_stop`` starts (its checkpoint holds the ones before)."""
    if epoch == epoch_to_stop:
        raise Stop(f"stopped at epoch {epoch}")


# ---- the RNG and buffer helpers -----------------------------------------------------------------

def test_seed_epoch_is_a_function_of_seed_rank_and_epoch():
    import random

    import numpy as np

    def draw(seed, rank, epoch):
        seed_epoch(seed, rank, epoch)
        return torch.rand(3).tolist(), float(np.random.rand()), random.random()

    assert draw(0, 0, 3) == draw(0, 0, 3)
    assert len({json.dumps(draw(*t)) for t in [(0, 0, 3), (0, 1, 3), (0, 0, 4), (1, 0, 3)]}) == 4


# ---- resume: stopped after an epoch, resumed, the uninterrupted result bit for bit -------------

@pytest.mark.parametrize(("loader_workers", "stop"), [(0, 1), (1, 2)])
def test_a_stopped_run_resumes_to_the_uninterrupted_weights_bit_for_bit(data, tmp_path, one_thread,
                                                                         loader_workers, stop):
    _, dataset, manifest = data
    spec = train.build_spec(_cfg(tmp_path, f"train.loader_workers={loader_workers}"), dataset, manifest)
    whole = train.fit(spec, LocalContext(tmp_path / "whole", train.TrainState))
    with pytest.raises(Stop):
        train.fit(replace(spec, epoch_hook=partial(stop_at, stop)), LocalContext(tmp_path / "cut", train.TrainState))
    assert train.TrainState.read(tmp_path / "cut" / "latest").recipe["epochs_done"] == stop
    torch.manual_seed(12345)  # whatever the process drew before must not matter
    resumed = train.fit(spec, LocalContext(tmp_path / "cut", train.TrainState))

    a, b = (train.TrainState.read(tmp_path / d / "latest") for d in ("whole", "cut"))
    assert _rows(b.history) == _rows(a.history)  # train_loss of every epoch, exactly
    assert digest(b.model) == digest(a.model) and digest(b.best) == digest(a.best)
    assert digest(b.optimizer["state"][0]) == digest(a.optimizer["state"][0])  # momentum buffers
    assert b.test_counts == a.test_counts and resumed == whole


# ---- DDP: the ranks hold one model; what is evaluated is what is saved --------------------------

class Recording(GroupContext):
    """A rank's context that records a digest of its model's state at every report."""

    def __init__(self, *args):
        super().__init__(*args)
        self.digests: list[str] = []

    def prepare_model(self, model):
        self.net = model
        return super().prepare_model(model)

    def report(self, metrics, state):
        self.digests.append(digest(self.net.state_dict()))
        super().report(metrics, state)


def _ddp_rank(rank: int, world: int, init_file: str, spec, checkpoint_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ctx = Recording(Member(rank, world, torch.device("cpu")), checkpoint_dir, train.TrainState)
        final = train.fit(spec, ctx)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"digests": ctx.digests, "final": final}))
    finally:
        dist.destroy_process_group()


def _rescore(state: dict, units) -> list[list[int]]:
    net = build_model("tiny_cnn", CLASSES)
    net.load_state_dict(state)
    ds = loader.build_dataset(units, loader.build_transform(32, False), shuffle=False)
    return evaluate(net, loader.make_loader(ds, 16, 0), CLASSES).tolist()


@pytest.mark.timeout(120)
def test_two_ddp_ranks_evaluate_and_save_one_model(data, tmp_path, one_thread):
    _, dataset, manifest = data
    spec = train.build_spec(_cfg(tmp_path, "train.workers.num_workers=2"), dataset, manifest)
    mp = multiprocessing.get_context("fork")
    procs = [mp.Process(target=_ddp_rank, args=(r, 2, str(tmp_path / "rdv"), spec, str(tmp_path / "ck"),
                                                str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(100)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["digests"]) == 4  # 3 epochs + the final report
    assert ranks[0]["digests"] == ranks[1]["digests"]  # one model on both ranks at every report
    state = train.TrainState.read(tmp_path / "ck" / "latest")
    # the saved best weights, re-scored in one process, give the counts the two ranks reported
    assert _rescore(state.best, spec.test_units) == state.test_counts
    assert overall(state.test_counts)["top1"] == ranks[0]["final"][S.TEST_TOP1]
    best_row = state.history[ranks[0]["final"][S.BEST_EPOCH]]
    assert overall(_rescore(state.best, spec.val_units))["top1"] == best_row[S.VAL_TOP1]


def test_sync_buffers_averages_float_buffers_and_keeps_counts():
    class Summing:
        world_size = 2

        def all_reduce(self, t):  # the other rank holds buffers + 1
            return t + (t + 1)

    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(2.0)
    bn.num_batches_tracked.fill_(5)
    sync_buffers(bn, Summing())
    assert bn.running_mean.tolist() == [2.5] * 3 and int(bn.num_batches_tracked) == 5


# ---- slow: the stage on a worker group, a killed worker and a died stage, 1 and 2 workers -------

def kill_member_once(marker_dir: str, rank_to_kill: int, epoch: int, rank: int) -> None:
    """Epoch hook: the last rank dies hard as epoch 1 starts, once."""
    d = Path(marker_dir)
    if epoch == 1 and rank == rank_to_kill and not (d / "killed").exists():
        (d / "killed").write_text("1")
        os._exit(1)


def fail_once_at(marker_dir: str, epoch: int, rank: int) -> None:
    """Epoch hook: the stage dies at epoch 2 (no retries left); the next run of its key resumes."""
    d = Path(marker_dir)
    if epoch == 2 and not (d / "failed").exists():
        if rank == 0:
            (d / "failed").write_text("1")
        raise Stop("the stage died at epoch 2")


def _model_bytes(art) -> bytes:
    return (art.path / MODEL_DIR / WEIGHTS_FILE).read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_stage_resumed_after_a_killed_worker_or_a_died_stage_saves_the_uninterrupted_model(
        ray_session, data, tmp_path, workers):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    _, dataset, manifest = data
    extra = ("train.runner=worker_group", f"train.workers.num_workers={workers}")
    whole = train.run(_cfg(tmp_path / "whole", *extra), dataset, manifest)

    killed_cfg = _cfg(tmp_path / "killed", *extra, "train.workers.max_failures=1")
    killed = train.run(killed_cfg, dataset, manifest,
                       epoch_hook=partial(kill_member_once, str(tmp_path), workers - 1))
    assert (tmp_path / "killed").exists()

    died_cfg = _cfg(tmp_path / "died", *extra, "train.workers.max_failures=0")
    with pytest.raises(Exception, match="the stage died at epoch 2"):
        train.run(died_cfg, dataset, manifest, epoch_hook=partial(fail_once_at, str(tmp_path)))
    died = train.run(died_cfg, dataset, manifest, epoch_hook=partial(fail_once_at, str(tmp_path)))

    assert whole.key == killed.key == died.key  # max_failures is not part of the stage key
    reference = json.loads((whole.path / RESULTS_FILE).read_text())
    for art in (killed, died):
        assert _model_bytes(art) == _model_bytes(whole)  # model/ bit for bit
        results = json.loads((art.path / RESULTS_FILE).read_text())
        for key in (S.TEST_TOP1, S.TEST_TOP5, S.VAL_TOP1_BEST, S.BEST_EPOCH, S.EPOCHS_RUN):
            assert results[key] == reference[key], key
        assert art.read("history").drop(list(TIMINGS)).equals(whole.read("history").drop(list(TIMINGS)))
    # the saved model, re-scored here, gives the test accuracy results.json reports
    model = load_classifier(whole.path / MODEL_DIR)
    counts = _rescore(model.state_dict(), loader.split_index(dataset, "test"))
    assert overall(counts)["top1"] == reference[S.TEST_TOP1]
