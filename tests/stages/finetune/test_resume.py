"""A fine-tuning run stopped after an epoch resumes to the uninterrupted result, bit for bit on CPU.

The method is pseudoword_dm (the pseudo-word table and the UNet train together) on the tiny SD
bundle with dropout switched on in the UNet, so the global torch RNG matters: a resumed run draws
the dropout masks of the uninterrupted one only if every epoch re-seeds it from (seed, rank, epoch).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raugment.config import load_config
from raugment.core.storage import run_stage
from raugment.runtime.contexts import LocalContext
from raugment.stages.finetune import stage as finetune
from raugment.stages.finetune.loop import FinetuneState, WorkerLoop
from raugment.stages.finetune.methods import get_method
from tests.helpers.train_data import make_dataset

METHOD = "pseudoword_dm"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dropout_sd(tiny_sd, tmp_path_factory) -> Path:
    """The tiny SD bundle with dropout 0.2 in the UNet's residual blocks."""
    out = tmp_path_factory.mktemp("dropout-sd") / "sd"
    shutil.copytree(tiny_sd, out)
    config = json.loads((out / "unet" / "config.json").read_text())
    config["dropout"] = 0.2
    (out / "unet" / "config.json").write_text(json.dumps(config))
    return out


def ft_cfg(root, model, *overrides):
    return load_config(None, [
        f"run.root={root}", "run.progress=false", f"finetune.method={METHOD}", f"finetune.model={model}",
        "finetune.resolution=32", "finetune.batch_size=2", "finetune.base_batch_size=8", "finetune.max_epochs=3",
        "finetune.patience=5", "finetune.lr=0.02", "finetune.unet_lr=0.001", "finetune.val_fraction=0.25",
        "finetune.workers.num_workers=1", *overrides])


@pytest.fixture(scope="module")
def planned(dropout_sd, tmp_path_factory):
    """A dataset and the stage's plan (items + conditionings) for it, written once."""
    root = tmp_path_factory.mktemp("ft-resume")
    dataset = make_dataset(root, [4, 4], val=1, test=1)
    cfg = ft_cfg(root, dropout_sd)
    plan = run_stage(root, "ftplan", {"m": METHOD}, {"dataset": dataset},
                     lambda run: finetune._write_plan(run, cfg, get_method(METHOD), dataset))
    return cfg, dataset, plan.path


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _loop(cfg, dataset, plan: Path, out: Path, **extra) -> WorkerLoop:
    if not out.exists():
        out.mkdir(parents=True)
        for name in ("items.parquet", "conditionings.parquet"):
            shutil.copy(plan / name, out / name)
    config = finetune.loop_config(cfg, SimpleNamespace(path=out), dataset, extra)
    return WorkerLoop(config, LocalContext(out / "ck", FinetuneState))


def test_a_stopped_fine_tuning_run_resumes_to_the_uninterrupted_state_bit_for_bit(planned, tmp_path):
    cfg, dataset, plan = planned
    cfg = ft_cfg(cfg.run.root, cfg.finetune.model, "finetune.max_epochs=2")  # stopped after 1 of 2
    _loop(cfg, dataset, plan, tmp_path / "whole").run()
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
        _loop(cfg, dataset, plan, cut, fail_after_epoch=1, fail_marker=str(tmp_path / "failed")).run()
    torch.manual_seed(4321)  # whatever the process drew before must not matter
    _loop(cfg, dataset, plan, cut).run()

    a, b = (FinetuneState.read(d / "ck" / "latest") for d in (tmp_path / "whole", cut))
    assert b.progress.epoch == a.progress.epoch == 2
    assert [h.__dict__ for h in b.progress.history] == [h.__dict__ for h in a.progress.history]
    assert digest(b.learned) == digest(a.learned)  # the table and the UNet, bit for bit
    assert digest(b.optimizer["state"][0]) == digest(a.optimizer["state"][0])


def test_unet_dropout_is_active_while_training(planned, tmp_path):
    """The bundle's dropout reaches the trained UNet (otherwise the resume test proves nothing)."""
    cfg, dataset, plan = planned
    loop = _loop(cfg, dataset, plan, tmp_path / "probe")
    drops = [m for m in loop.inner.unet.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert drops
    loop.model.train()
    assert all(m.training for m in drops)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_stage_resumed_after_a_failed_worker_writes_the_uninterrupted_snapshots(ray_session, planned, tmp_path,
                                                                               workers):
    from safetensors.torch import load_file

    cfg0, dataset, _ = planned
    arts = {}
    for name, fail in (("whole", None), ("failed", 1)):
        cfg = ft_cfg(tmp_path / name, cfg0.finetune.model, "finetune.runner=worker_group",
                     f"finetune.workers.num_workers={workers}")
        arts[name] = finetune.run(cfg, dataset, fail_after_epoch=fail)
    whole, failed = arts["whole"], arts["failed"]
    assert failed.stats["counts"]["restarts"] == 1 and whole.stats["counts"]["restarts"] == 0
    assert failed.stats["history"] == whole.stats["history"]
    # every kept snapshot (the learned table, and the UNet in diffusers layout), tensor for tensor
    files = sorted(f.relative_to(whole.path) for f in (whole.path / "checkpoints").rglob("*.safetensors"))
    assert files and files == sorted(f.relative_to(failed.path)
                                     for f in (failed.path / "checkpoints").rglob("*.safetensors"))
    for f in files:
        assert digest(load_file(str(whole.path / f))) == digest(load_file(str(failed.path / f))), f
