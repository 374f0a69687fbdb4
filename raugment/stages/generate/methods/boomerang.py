"""Method 10a: Boomerang (Luzi et al. 2022), img2img from the class's own training images.

An original training image is noised to strength ``generate.boomerang_strength`` and denoised
without prompt guidance (empty prompt, guidance scale 1). Slot ``i`` of a class uses the class's
``i mod n``-th training image (ordered by id), so the originals are used evenly. Inputs are resized
to ``height`` x ``width`` for batching and the output is resized back to the input's size. Only
about ``strength`` of the denoising steps run, hence its cost fraction (at the default strength).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raugment.core import schema
from raugment.core.config import ConfigError, PluginSettings
from raugment.core.imageio import decode_image
from raugment.stages.generate.methods import GENERATORS, INIT_IMAGE, GenerateSection, GenerationMethod, Row

if TYPE_CHECKING:  # pragma: no cover
    from raugment.core.storage import Artifact


@dataclass
class Settings(PluginSettings):
    """``generate.boomerang_strength``: how far the original is noised, in (0, 1] (paper: 0.2)."""

    boomerang_strength: float = 0.2

    def validate(self, key: str) -> None:
        if not 0 < self.boomerang_strength <= 1:
            raise ConfigError(f"{key}.boomerang_strength must be in (0, 1]")


def read_train_images(dataset: Artifact) -> dict[int, list[tuple[str, bytes]]]:
    """label -> [(id, image bytes)] of the dataset's train split."""
    table = dataset.read("images", columns=[schema.ID, schema.LABEL, schema.SPLIT, schema.IMAGE])
    out: dict[int, list[tuple[str, bytes]]] = defaultdict(list)
    for image_id, label, split, data in zip(*(table.column(c).to_pylist() for c in
                                              (schema.ID, schema.LABEL, schema.SPLIT, schema.IMAGE)), strict=True):
        if split == "train":
            out[int(label)].append((image_id, data))
    return out


@GENERATORS.register("boomerang")
class Boomerang(GenerationMethod):
    """⑩a Boomerang: noise an original training image to strength ``t``, denoise it without guidance."""

    kind = "img2img"
    name = "boomerang"
    settings = Settings
    cost_fraction = 0.2

    def plan(self, classes: Sequence[Row], cfg: GenerateSection, *, dataset: Artifact,
             finetune: Artifact | None) -> list[Row]:
        strength = Settings.of(cfg).boomerang_strength
        originals = read_train_images(dataset)
        empty = [str(c[schema.CLASS_ID]) for c in classes if not originals.get(int(c[schema.LABEL]))]
        if empty:
            raise ValueError(f"boomerang needs training images, but classes {empty[:10]} have none in "
                             f"{dataset.path}; exclude them (dataset.exclude_classes) or use a prompt method")
        rows: list[Row] = []
        for record in classes:
            label = int(record[schema.LABEL])
            source = sorted(originals[label])
            for i in range(cfg.images_per_class):
                src_id, data = source[i % len(source)]
                rows.append({schema.LABEL: label, schema.CLASS_ID: record[schema.CLASS_ID],
                             schema.CLASS_NAME: record[schema.CLASS_NAME], schema.INDEX: i,
                             schema.PROMPT: "", INIT_IMAGE: data,
                             schema.PARAMS: {"source_id": src_id, "strength": strength}})
        return self.slot_rows(rows, cfg)

    def call_kwargs(self, rows: Sequence[Row], cfg: GenerateSection) -> dict[str, Any]:
        from PIL import Image

        images = [decode_image(r[INIT_IMAGE]).resize((cfg.width, cfg.height), Image.Resampling.BICUBIC) for r in rows]
        return {"prompt": [""] * len(rows), "image": images, "strength": Settings.of(cfg).boomerang_strength,
                "guidance_scale": 1.0}

    def postprocess(self, image: Any, row: Row) -> Any:
        from PIL import Image

        original = decode_image(row[INIT_IMAGE])
        return image if image.size == original.size else image.resize(original.size, Image.Resampling.BICUBIC)
