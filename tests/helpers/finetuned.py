"""Fine-tuning artifacts for tests: a stand-in without torch (checkpoint names, snapshot directories,
losses) for the selection tests, only what :func:`raugment.lib.finetuned.artifact.resolve` and
:func:`~raugment.lib.finetuned.artifact.list_checkpoints` read (:func:`make_finetune`); a real one
from a method's initial table, without training (:func:`hand_made_artifact`); and sampling."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

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


def hand_made_artifact(path, comps, method_name: str, perturb: float, meta_method: str | None = None):
    """A finetune artifact written through the stage's own writers (no training): the init table of
    the fine-tuning method ``method_name`` plus a random direction of size ``perturb`` (and, for a
    method that trains the UNet, a shifted ``conv_out`` bias), recorded as ``meta_method``'s.

    Returns the :class:`~raugment.lib.finetuned.families.CondRow` s it holds.
    """
    import pyarrow.parquet as pq
    import torch

    from raugment.lib.finetuned.artifact import write_snapshot
    from raugment.lib.finetuned.families import CondRow
    from raugment.stages.finetune.methods import get_method

    method = get_method(method_name)
    rows = [CondRow(0, 0, "tiger shark, Galeocerdo cuvieri", 0, 3, "<raug-0>"),
            CondRow(1, 1, "axolotl", 0, 2, "<raug-1>")]
    table = method.init_table(comps, rows)
    # a random direction: a constant shift would vanish in the text encoder's first LayerNorm
    table = table + perturb * torch.randn(table.shape, generator=torch.Generator().manual_seed(0))
    path.mkdir(parents=True)
    pq.write_table(S.to_table([{S.COND_ROW: r.row, S.LABEL: r.label, S.CLASS_NAME: r.class_name,
                                S.CLUSTER: r.cluster, S.N_IMAGES: r.n_images, S.TOKEN: r.token}
                               for r in rows], S.CONDITIONINGS), path / f"{CONDITIONINGS}.parquet")
    unet = comps["unet"] if method.trains_unet else None
    if unet is not None and perturb:
        with torch.no_grad():
            unet.conv_out.bias.add_(0.5)
    write_snapshot(path, 1, {method.table_key: table},
                   {"method": meta_method or method_name, "train_loss": 1.0, "val_loss": 1.0}, unet=unet)
    write_tags(path, {1: ["best_train", "best_val", "epoch_001"]})
    return rows


def sample(pipe, **kwargs):
    """Images (NumPy) of a 2-step pipeline call with one seeded CPU generator per image."""
    import torch

    n = len(kwargs.get("prompt") or kwargs["prompt_embeds"])
    gens = [torch.Generator("cpu").manual_seed(s) for s in range(n)]
    with torch.inference_mode():
        return pipe(**kwargs, num_inference_steps=2, generator=gens, output_type="np").images
