"""Generation from a fine-tuning artifact: methods 5-9 (and any later fine-tuned method) on the generator's side.

The generation stage uses :class:`FinetunedGeneration` when ``generate.method`` is not a registered
generation method and it is given a fine-tuning artifact, so

    generate.method: ft_cluster_conditioning
    generate.conditioning: runs/finetune/<key>          # or runs/finetune/<key>/checkpoints/epoch_002

(or ``generate.run(cfg, dataset, finetune=artifact)``) samples from what was learned; a ``select``
stage directory (``runs/select/<key>``, the study's checkpoint choice) works in either place. The
artifact's method must be ``generate.method``, which also names the slots (their seeds and ids).
Nothing here depends on the method's name: how a learned row becomes prompt embeddings follows
from the artifact's family (:mod:`raugment.lib.finetuned.families`: a conditioning table or
pseudo-word embeddings, by the snapshot's table key), plus the fine-tuned UNet when the snapshot
holds one. So it is not registered, and a new fine-tuning method needs no change here.

* ``plan``: one slot per image; each slot gets a learned row of its class. With clusters, the
  row is drawn with probability proportional to the cluster's image count (seeded per class).
* ``setup``: loads the checkpoint (the artifact's ``selected.json``, else ``best_val``) and, when
  the snapshot has one (Imagic, pseudo-word + DM), the fine-tuned UNet weights into the pipeline's UNet.
* ``call_kwargs``: ``prompt_embeds`` = the learned conditionings of the slots' rows, or, for
  pseudo-words, the encoding of the slot's prompt template (Gal et al.'s templates, the ones
  training used, drawn per slot with replacement and seeded per class, as the paper samples
  them) with the slot's pseudo-word in place of ``*``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.core.storage import Artifact
from raugment.lib.finetuned.artifact import artifact_config, load_finetuned, resolve
from raugment.lib.finetuned.families import TEMPLATES, family_of
from raugment.stages.generate.methods import GenerateSection, GenerationMethod, Row, class_rng

if TYPE_CHECKING:  # pragma: no cover
    from raugment.lib.finetuned.families import Method

log = logging.getLogger(__name__)

ROW_PARAM = "cond_row"
TEMPLATE_PARAM = "template"  # index into TEMPLATES of a pseudo-word slot's prompt
NEEDS_ARTIFACT = ("needs a fine-tuning artifact: pass one to generate.run (finetune=) or set "
                  "generate.conditioning to a finetune (or select) stage directory")


def draw_rows(candidates: Sequence[dict[str, Any]], n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """``n`` learned rows of one class, drawn in proportion to their ``n_images``."""
    sizes = np.array([max(int(r[schema.N_IMAGES] or 0), 0) for r in candidates], dtype=np.float64)
    p = sizes / sizes.sum() if sizes.sum() > 0 else None
    return [candidates[i] for i in rng.choice(len(candidates), size=n, p=p)]


class FinetunedGeneration(GenerationMethod):
    """Text-to-image from a fine-tuning artifact of the fine-tuned method ``name``."""

    kind = "text2img"

    def __init__(self, name: str) -> None:
        self.name = name
        self.family: Method | None = None
        self.pipe: Any = None
        self.table: Any = None

    def _source(self, cfg: GenerateSection, finetune: Artifact | str | None) -> str:
        path = finetune.path if isinstance(finetune, Artifact) else (finetune or cfg.conditioning)
        if not path:
            raise ConfigError(f"generate.method={self.name} {NEEDS_ARTIFACT}")
        return str(path)

    def plan(self, classes: Sequence[Row], cfg: GenerateSection, *, dataset: Artifact,
             finetune: Artifact | None) -> list[Row]:
        source = self._source(cfg, finetune)
        try:
            artifact, snapshot, checkpoint = resolve(source)
        except ValueError as exc:
            raise ConfigError(f"generate.conditioning: {exc}") from None
        learned = load_finetuned(snapshot)
        trained_on = (artifact_config(artifact).get("config") or {}).get("model")
        if trained_on and Path(trained_on).name != Path(cfg.model).name:
            log.warning("generate.model %r differs from the model %r that %s was fine-tuned from",
                        cfg.model, trained_on, artifact)
        if learned.method != self.name:
            raise ConfigError(f"generate.conditioning points to a {learned.method!r} artifact but "
                              f"generate.method is {self.name!r}; use the same method")
        pseudowords = family_of(learned.table_key).pseudowords
        by_label: dict[int, list[dict[str, Any]]] = {}
        for r in learned.rows:
            by_label.setdefault(int(r[schema.LABEL]), []).append(r)
        rows: list[Row] = []
        for record in classes:
            label = int(record[schema.LABEL])
            if label not in by_label:
                raise ValueError(f"class {label} ({record[schema.CLASS_NAME]!r}) has no learned conditioning "
                                 f"in {artifact}; fine-tune on the same dataset")
            rng = class_rng(cfg, self.name, label)
            drawn = draw_rows(by_label[label], cfg.images_per_class, rng)
            templates = rng.integers(0, len(TEMPLATES), size=len(drawn)) if pseudowords else None
            for i, r in enumerate(drawn):
                params = {ROW_PARAM: int(r[schema.COND_ROW]), "cluster": int(r[schema.CLUSTER]),
                          "checkpoint": checkpoint, "snapshot": str(snapshot)}
                prompt = ""
                if templates is not None:
                    params[TEMPLATE_PARAM] = int(templates[i])
                    prompt = TEMPLATES[templates[i]].format(r[schema.TOKEN])
                rows.append({schema.LABEL: label, schema.CLASS_ID: record[schema.CLASS_ID],
                             schema.CLASS_NAME: record[schema.CLASS_NAME], schema.INDEX: i, schema.PROMPT: prompt,
                             schema.PARAMS: params})
        return self.slot_rows(rows, cfg)

    def setup(self, pipe: Any, cfg: GenerateSection, finetune_path: str | None) -> None:
        from safetensors.torch import load_file

        learned = load_finetuned(self._source(cfg, finetune_path))
        self.family = family_of(learned.table_key)
        self.pipe = pipe
        self.table = learned.table.to(pipe.device, pipe.text_encoder.dtype)
        if learned.unet_dir is not None:
            (weights,) = sorted(Path(learned.unet_dir).glob("*.safetensors"))
            unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # under generate.compile too
            unet.load_state_dict(load_file(str(weights)))  # copies into the pipeline's dtype/device

    def call_kwargs(self, rows: Sequence[Row], cfg: GenerateSection) -> dict[str, Any]:
        import torch

        if self.family is None:
            raise RuntimeError("FinetunedGeneration.call_kwargs before setup: the learned table is not loaded")
        comps = {"text_encoder": self.pipe.text_encoder, "tokenizer": self.pipe.tokenizer}
        idx = torch.tensor([int(r[schema.PARAMS][ROW_PARAM]) for r in rows], device=self.table.device)
        ids = self.family.generation_ids(comps, [int(r[schema.PARAMS].get(TEMPLATE_PARAM, 0)) for r in rows])
        with torch.no_grad():
            embeds = self.family.encode(comps, self.table, idx, ids)
        return {"prompt_embeds": embeds, "guidance_scale": cfg.guidance_scale,
                "height": cfg.height, "width": cfg.width}
