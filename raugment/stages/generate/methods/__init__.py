"""Generation methods: one module each in this folder, registered by name in :data:`GENERATORS`.

A method is a class in ``<name>.py``, registered with ``@GENERATORS.register("<name>")``, whose
``name`` is the same. The registry imports every public module of this folder the first time it is
asked, so a new method is a new module (and its test, ``tests/stages/generate/methods/``); the
registry contract tests (``tests/stages/generate/test_methods_contract.py``) check it. A method
may declare its own ``generate.*`` config keys (``settings``: a
:class:`~raugment.core.config.PluginSettings` dataclass, read with ``Settings.of(cfg)``; see
``boomerang.py``), which the ``generate`` section carries, and ``cost_fraction``, its GPU time
per image relative to a text-to-image sample of the same size and steps (the study planner's
estimate; ``study.costs`` key ``generate.<name>_fraction`` overrides it).

A prompt method (methods 1-4) subclasses :class:`PromptMethod` and writes only
``prompts(record, n, rng)``; other methods subclass :class:`GenerationMethod`.

``generate.method`` may also name a fine-tuned method (``ft_conditioning``, ...) when the stage is
given a fine-tuning artifact: :class:`~raugment.stages.generate.finetuned.FinetunedGeneration`
samples from any of them (it is not registered: what it does depends on the artifact, not on the
name).

Plug-in modules import cheaply (torch, diffusers inside functions) and never import the stage's
``config.py`` at module level (it imports this folder while it is being defined); for the same
reason the base classes here type the ``generate`` section as :data:`GenerateSection`.

Seeds and ids: a slot is (class, method, index) with seed :func:`slot_seed` and id :func:`slot_id`;
a class's plan draws from its own stream :func:`class_rng`, so classes are independent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from raugment.core import schema
from raugment.core.imageio import item_id, stable_id
from raugment.core.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from raugment.core.storage import Artifact
    from raugment.models.diffusion import PipelineKind

GENERATORS: Registry = Registry("generation method", package=__name__)

Row = dict[str, Any]
ClassRecord = Mapping[str, object]
# The ``generate`` section (``raugment.stages.generate.config.GenerateConfig``, with every method's
# settings). Not imported here: the section imports this package to collect the settings.
GenerateSection = Any

INIT_IMAGE = "init_image"   # plan-row key (not a column): bytes of an img2img method's input


# --------------------------------------------------------------------------------------------
# Seeds and ids
# --------------------------------------------------------------------------------------------


def slot_seed(seed: int, method: str, class_id: str, index: int, attempt: int = 0) -> int:
    """The seed of a slot's ``attempt`` (0 = the planned sample), stable across runs and machines."""
    return int(stable_id(seed, method, class_id, index, attempt), 16) % (2**31 - 1)


def slot_id(method: str, class_id: str, index: int, seed: int) -> str:
    """Stable image id of a slot: (class, method, index, planned seed)."""
    return item_id(f"gen-{method}", class_id, index, seed)


def class_rng(cfg: GenerateSection, method: str, label: int) -> np.random.Generator:
    """The random stream of one class's plan (independent of the other classes)."""
    return np.random.default_rng([cfg.seed, int(stable_id(method), 16) % 2**32, label])


# --------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------


class GenerationMethod:
    """A way of producing images for a class.

    Lifecycle (the generation stage calls these; a method never calls the stage):

    1. On the driver, ``plan(classes, cfg, dataset=..., finetune=...)`` returns one row per image
       to make, ``cfg.images_per_class`` per class. Each row has ``label``, ``class_id``,
       ``class_name``, ``index`` (0..n-1 within the class), ``prompt`` (str; "" if unused) and
       ``params`` (dict of method-specific provenance, JSON-able); ``img2img`` methods add
       :data:`INIT_IMAGE` (encoded bytes). Use :meth:`slot_rows` to add ``method``, ``seed`` and
       ``id``. Must be deterministic in (classes, cfg, inputs).
    2. On each actor, once: ``setup(pipe, cfg, finetune_path)`` after the pipeline of kind
       ``self.kind`` ("text2img" | "img2img") is loaded through ``models.diffusion.load_pipeline``:
       load learned conditionings or UNet weights into ``pipe`` (``finetune_path`` is the
       fine-tuning artifact's directory, or None). A method that leaves ``setup`` alone shares the
       process's loaded pipeline with the next stage run.
    3. Per batch: ``call_kwargs(rows, cfg)`` returns the pipeline arguments that depend on the
       rows: ``prompt=[...]`` or ``prompt_embeds=tensor``, ``guidance_scale``, ``height``/``width``
       or ``image``/``strength``. The stage adds ``num_inference_steps``, ``generator`` (one seeded
       ``torch.Generator`` per row) and ``output_type``; rows may repeat a class's conditioning.
    4. Per image: ``postprocess(image, row)`` may change the PIL image (Boomerang restores the
       input's size); default: unchanged.
    """

    kind: PipelineKind = "text2img"
    name: str = ""
    settings: type | None = None
    cost_fraction: float = 1.0

    def plan(self, classes: Sequence[Row], cfg: GenerateSection, *, dataset: Artifact,
             finetune: Artifact | None) -> list[Row]:
        raise NotImplementedError

    def setup(self, pipe: Any, cfg: GenerateSection, finetune_path: str | None) -> None:
        return None

    def call_kwargs(self, rows: Sequence[Row], cfg: GenerateSection) -> dict[str, Any]:
        raise NotImplementedError

    def postprocess(self, image: Any, row: Row) -> Any:
        return image

    def slot_rows(self, rows: list[Row], cfg: GenerateSection) -> list[Row]:
        """Add ``method``, the planned ``seed`` and the stable ``id`` to planned rows (in place)."""
        for row in rows:
            row[schema.METHOD] = self.name
            row[schema.SEED] = slot_seed(cfg.seed, self.name, row[schema.CLASS_ID], row[schema.INDEX])
            row[schema.ID] = slot_id(self.name, row[schema.CLASS_ID], row[schema.INDEX], row[schema.SEED])
        return rows


def record_text(record: ClassRecord, key: str) -> str | None:
    """A text field of a class record with underscores as spaces; None when missing or empty."""
    value = record.get(key)
    if value is None:
        return None
    text = str(value).replace("_", " ").strip()
    return text or None


def record_name(record: ClassRecord) -> str:
    """The class name of a class record (a ValueError when it has none)."""
    name = record_text(record, schema.CLASS_NAME)
    if not name:
        raise ValueError(f"class record {dict(record)!r} has no {schema.CLASS_NAME!r}")
    return name


class PromptMethod(GenerationMethod):
    """Text-to-image from prompts written for each class (methods 1-4), classifier-free guidance.

    A subclass implements :meth:`prompts`; the plan gives every slot of a class one of the class's
    prompts (provenance ``params.prompt_builder`` = the method's name).
    """

    def prompts(self, record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` prompts for the class ``record`` (a row of the dataset's classes table:
        ``class_id``, ``class_name``, ``hypernym``, ``definition``), drawing only from ``rng``.

        Pure: the same record, ``n`` and generator state give the same prompts.
        """
        raise NotImplementedError

    def make_prompts(self, record: ClassRecord, n: int, rng: np.random.Generator) -> list[str]:
        """:meth:`prompts`, checked: ``n`` must be >= 0 (ValueError) and exactly ``n`` come back."""
        if n < 0:
            raise ValueError(f"number of prompts must be >= 0, got {n}")
        prompts = self.prompts(record, n, rng)
        if len(prompts) != n:
            raise RuntimeError(f"generation method {self.name!r} returned {len(prompts)} prompts, expected {n}")
        return prompts

    def plan(self, classes: Sequence[Row], cfg: GenerateSection, *, dataset: Artifact,
             finetune: Artifact | None) -> list[Row]:
        rows: list[Row] = []
        for record in classes:
            label = int(record[schema.LABEL])
            texts = self.make_prompts(record, cfg.images_per_class, class_rng(cfg, self.name, label))
            rows.extend({schema.LABEL: label, schema.CLASS_ID: record[schema.CLASS_ID],
                         schema.CLASS_NAME: record[schema.CLASS_NAME], schema.INDEX: i,
                         schema.PROMPT: text, schema.PARAMS: {"prompt_builder": self.name}}
                        for i, text in enumerate(texts))
        return self.slot_rows(rows, cfg)

    def call_kwargs(self, rows: Sequence[Row], cfg: GenerateSection) -> dict[str, Any]:
        return {"prompt": [r[schema.PROMPT] for r in rows], "guidance_scale": cfg.guidance_scale,
                "height": cfg.height, "width": cfg.width}
