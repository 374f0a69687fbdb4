"""Images and artifacts with planted near-duplicates, for the filter, dedup, audit and hashing tests.

Base images are smooth random colour fields with a few discs (distinct pHashes: unrelated pairs
differ in >= 18 of 64 bits); near copies are resized, JPEG re-encoded, upscaled or slightly cropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from raugment.core import schema as S
from raugment.core.imageio import encode_image
from raugment.core.storage import Artifact, StageRun, run_stage


def draw(seed: int, size: int = 128) -> Image.Image:
    """A textured image that only ``seed`` determines."""
    rng = np.random.default_rng(seed)
    small = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    pen = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
        s = int(rng.integers(size // 8, size // 2))
        pen.ellipse([x0, y0, x0 + s, y0 + s], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def png(img: Image.Image) -> bytes:
    return encode_image(img, "PNG")


def near_copies(img: Image.Image) -> dict[str, bytes]:
    """Encoded near copies of ``img``: half size, JPEG quality 30, 2x upscale, a crop of ~1% per side."""
    w, h = img.size
    c = max(1, w // 100)
    return {"resized": png(img.resize((w // 2, h // 2), Image.BILINEAR)),
            "jpeg": encode_image(img, "JPEG", quality=30),
            "upscaled": encode_image(img.resize((w * 2, h * 2), Image.BICUBIC), "JPEG", quality=90),
            "crop": png(img.crop((c, c, w - c, h - c)))}


def row(id_: str, data: bytes, label: int = 0, **extra: Any) -> dict[str, Any]:
    """An images-schema row for encoded ``data``."""
    base = {S.ID: id_, S.LABEL: label, S.CLASS_NAME: f"class{label}", S.IMAGE: data,
            S.SPLIT: "added", S.SOURCE: "retrieved", S.METHOD: "retrieval"}
    base.update(extra)
    return base


def make_artifact(root, stage: str, rows: Sequence[dict[str, Any]], shards: int = 1,
                  name: str = "images") -> Artifact:
    """A complete artifact of ``stage`` holding ``rows`` in ``shards`` shards (key from the row ids)."""
    rows = list(rows)

    def body(run: StageRun) -> None:
        step = max(1, -(-len(rows) // shards))
        for k in range(0, len(rows), step):
            run.write(S.to_table(rows[k:k + step]), name, shard=f"{k:05d}")

    return run_stage(root, stage, {"ids": [r[S.ID] for r in rows]}, {}, body)


def make_dataset(root, rows: Sequence[dict[str, Any]], shards: int = 1) -> Artifact:
    """A complete dataset artifact: ``rows`` (table ``images``) and their classes (table ``classes``,
    one per label, named by the rows' class names), as the dataset stage writes them."""
    rows = list(rows)
    names = {int(r[S.LABEL]): r[S.CLASS_NAME] for r in rows}
    classes = [{S.LABEL: label, S.CLASS_ID: names[label], S.CLASS_NAME: names[label]} for label in sorted(names)]

    def body(run: StageRun) -> None:
        step = max(1, -(-len(rows) // shards))
        for k in range(0, len(rows), step):
            run.write(S.to_table(rows[k:k + step]), "images", shard=f"{k:05d}")
        run.write_single(S.to_table(classes, S.CLASSES), "classes")

    return run_stage(root, "dataset", {"ids": [r[S.ID] for r in rows]}, {}, body)
