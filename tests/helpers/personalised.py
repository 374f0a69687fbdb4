"""A fine-tuning artifact stand-in (checkpoint names, snapshot directories, losses) without torch,
for the selection tests: only what :func:`raugment.lib.finetuned.artifact.resolve` and
:func:`~raugment.lib.finetuned.artifact.list_checkpoints` read."""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from raugment.core import schema as S
from raugment.core.storage import Artifact, StageRun, run_stage
from raugment.lib.finetuned.artifact import CHECKPOINTS_DIR, CONDITIONINGS, LEARNED, META, epoch_tag, write_tags

# epoch -> checkpoint names: best validation loss at epoch 1, best train loss at epoch 3
TAGS = {1: ["best_val", "epoch_001"], 2: ["epoch_002"], 3: ["best_train", "epoch_003"]}


def fill(run: StageRun, tags: Mapping[int, Sequence[str]] = TAGS) -> None:
    """Write snapshots (an empty learned file + meta.json) and the names of ``tags`` into ``run``."""
    rows = [{S.COND_ROW: k, S.LABEL: k, S.CLASS_NAME: f"class {k}", S.CLUSTER: 0, S.N_IMAGES: 3, S.TOKEN: ""}
            for k in range(2)]
    run.write_single(S.to_table(rows, S.CONDITIONINGS), CONDITIONINGS)
    for epoch in tags:
        snap = run.path / CHECKPOINTS_DIR / epoch_tag(epoch)
        snap.mkdir(parents=True, exist_ok=True)
        (snap / LEARNED).write_bytes(b"")
        (snap / META).write_text(json.dumps({"epoch": epoch, "method": "ft_conditioning",
                                             "train_loss": 1.0 / epoch, "val_loss": 0.5 + abs(epoch - 1)}))
    write_tags(run.path, {e: list(n) for e, n in tags.items()})


def make_finetune(root, tags: Mapping[int, Sequence[str]] = TAGS, key: str = "ft") -> Artifact:
    """A complete ``finetune`` artifact under ``root`` with ``tags``."""
    return run_stage(root, "finetune", {"fake": key}, {}, lambda r: fill(r, tags))
