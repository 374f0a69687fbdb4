"""Offline stand-ins of the real study's inputs, in their real on-disk layouts (``raugment rehearse``).

What ``jobs/configs/imagenet10.yaml`` reads on a cluster, written small enough for a 2-core box:

* :func:`write_imagenet_folder`: an ImageFolder in ImageNet's layout, ``train/<synset>/<synset>_<i>.JPEG``
  and ``val/<synset>/ILSVRC2012_val_<n>.JPEG``, with real synset ids from the WordNet table
  (:mod:`raugment.stages.dataset.classnames`), unequal class sizes (ImageNet keeps its imbalance)
  and small synthetic pictures (a per-class colour and shape, with noise).
* :func:`write_laion_index`: LAION's published embeddings layout, ``img_emb/img_emb_<i>.npy``
  (float16) + ``metadata/metadata_<i>.parquet`` (url, caption, NSFW tag, similarity, aesthetic,
  width, height), as ``index.source: embeddings`` reads it, plus the images its URLs name under
  ``images/`` (served by :func:`serve_directory`). Captions name some classes often and a few
  rarely, so retrieval cannot fill the rare ones (the paper excluded 10 such classes). Dead links
  (URLs whose file does not exist, as many of LAION's are) sit between a class's own images and
  every other class's in embedding space, so a rare class's growing k reaches dead links only.
* The tiny SD / CLIP / aesthetic bundles (:mod:`raugment.demo.tiny`) and random Inception-v3
  weights (:func:`write_inception_weights`) are the model stand-ins.

Embeddings: a class's images are embedded at the tiny CLIP's *text* embedding of that class's
retrieval prompt (``A photo of {w(name)}.``) at cosine :data:`OWN_COSINE`, so the stand-in
index answers retrieval's own queries the way a trained CLIP would (own class first); its dead
links at :data:`DEAD_LINK_COSINE`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

COMPLETE = ".complete"
# Cosine of a class's images / of its dead links to the class's retrieval prompt: own images first,
# then dead links, then (below) other classes' prompts (tiny-CLIP prompts of different classes
# measured 0.29-0.92 apart at 10 classes).
OWN_COSINE = 0.9999
DEAD_LINK_COSINE = 0.995


@dataclass(frozen=True)
class FolderShape:
    """What :func:`write_imagenet_folder` wrote: synset ids (sorted) and train / val counts per class."""

    class_ids: list[str]
    train: dict[str, int]
    val: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"class_ids": self.class_ids, "train": self.train, "val": self.val}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FolderShape:
        return cls(list(d["class_ids"]), dict(d["train"]), dict(d["val"]))


def pick_synsets(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct ILSVRC-2012 synset ids spread over the 1000-class table (sorted, reproducible)."""
    from raugment.stages.dataset.classnames import imagenet_classes

    table = imagenet_classes()
    if not 1 <= n <= len(table):
        raise ValueError(f"number of classes must be in [1, {len(table)}], got {n}")
    rng = np.random.default_rng(seed)
    return sorted(table[int(i)].class_id for i in rng.choice(len(table), size=n, replace=False))


def _picture(rng: np.random.Generator, label: int, side: int) -> bytes:
    """A small JPEG: the class's colour and shape at a random place, with noise."""
    from PIL import Image, ImageDraw

    hue = np.array([(label * 67) % 256, (label * 131 + 80) % 256, (label * 29 + 160) % 256])
    bg = rng.integers(0, 256, size=3)
    arr = np.clip(bg + rng.normal(0, 20, size=(side, side, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    r = side // 4 + int(rng.integers(0, side // 8 + 1))
    cx, cy = (int(v) for v in rng.integers(r, side - r + 1, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    colour = tuple(int(v) for v in np.clip(hue + rng.normal(0, 15, 3), 0, 255))
    if label % 3 == 0:
        draw.ellipse(box, fill=colour)
    elif label % 3 == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.pieslice(box, start=30, end=300, fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_imagenet_folder(out: str | Path, num_classes: int = 100, train_range: tuple[int, int] = (20, 40),
                          val_per_class: int = 5, side: int = 48, seed: int = 0) -> FolderShape:
    """An ImageFolder in ImageNet's layout (idempotent: a finished folder is kept).

    Args:
        out: the dataset root (``dataset.path``).
        num_classes: how many of the 1000 synsets.
        train_range: training images per class, drawn uniformly in [lo, hi] (class imbalance).
        val_per_class: images per class in ``val/`` (ImageNet's val folder is the test split).
        side: picture side in pixels.
    """
    out = Path(out)
    if (out / COMPLETE).exists():
        return FolderShape.from_dict(json.loads((out / COMPLETE).read_text()))
    rng = np.random.default_rng(seed)
    ids = pick_synsets(num_classes, seed)
    train, val, n_val = {}, {}, 0
    for label, cid in enumerate(ids):
        n_train = int(rng.integers(train_range[0], train_range[1] + 1))
        (out / "train" / cid).mkdir(parents=True, exist_ok=True)
        (out / "val" / cid).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            (out / "train" / cid / f"{cid}_{i + 1}.JPEG").write_bytes(_picture(rng, label, side))
        for _ in range(val_per_class):
            n_val += 1
            (out / "val" / cid / f"ILSVRC2012_val_{n_val:08d}.JPEG").write_bytes(_picture(rng, label, side))
        train[cid], val[cid] = n_train, val_per_class
    shape = FolderShape(ids, train, val)
    (out / COMPLETE).write_text(json.dumps(shape.to_dict()))
    log.info("stand-in ImageNet: %d classes, %d train / %d val images at %s", len(ids), sum(train.values()),
             n_val, out)
    return shape


@dataclass(frozen=True)
class IndexShape:
    """What :func:`write_laion_index` wrote: images per class (by synset id), which classes are rare,
    and how many dead links."""

    per_class: dict[str, int]
    rare: list[str]
    dead_links: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexShape:
        return cls(dict(d["per_class"]), list(d["rare"]), int(d["dead_links"]))


def write_laion_index(out: str | Path, class_ids: list[str], clip_model: str | Path, often: int = 16,
                      rarely: int = 1, rare_every: int = 5, dead_links: int = 60, shards: int = 2,
                      side: int = 48, seed: int = 0) -> IndexShape:
    """A LAION-layout embeddings index over captioned pictures of ``class_ids`` (idempotent).

    Every ``rare_every``-th class (the first one included) is named by ``rarely`` captions, the
    others by ``often``; ``dead_links`` more rows per class are unrelated captions whose URL serves
    nothing, next to that class's prompt (at least retrieval's k_max = 14 n of them keeps a rare
    class from reaching other classes' images).
    Aesthetic scores (LAION-Aesthetics' ``aesthetic`` column) are spread over [4, 8], so the
    threshold of 5 drops about a quarter. URLs are relative (``images/<key>.jpg``); retrieval
    joins them to ``retrieve.url_base``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raugment.lib.prompts import simple_nows_prompt
    from raugment.models.clip import load_clip
    from raugment.stages.dataset.classnames import lookup

    out = Path(out)
    if (out / COMPLETE).exists():
        return IndexShape.from_dict(json.loads((out / COMPLETE).read_text()))
    rng = np.random.default_rng(seed + 1)
    names = [lookup(cid).name for cid in class_ids]
    queries = load_clip(str(clip_model), None, "cpu").embed_texts([simple_nows_prompt(n) for n in names])
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    rare = [cid for i, cid in enumerate(class_ids) if i % rare_every == 0]
    per_class = {}
    for label, (cid, name) in enumerate(zip(class_ids, names)):
        count = rarely if cid in rare else often
        per_class[cid] = count
        lemma = name.split(", ")[0]
        for j in range(count):
            key = f"{len(rows):09d}"
            (out / "images" / f"{key}.jpg").write_bytes(_picture(rng, label, side))
            rows.append({"url": f"images/{key}.jpg", "caption": f"{lemma} photographed outdoors, picture {j}",
                         "NSFW": "UNLIKELY", "similarity": 0.3, "aesthetic": float(rng.uniform(4.0, 8.0)),
                         "width": side, "height": side, "key": key})
            vectors.append(_at_cosine(queries[label], OWN_COSINE, rng))
    for label in range(len(class_ids)):
        for j in range(dead_links):
            key = f"{len(rows):09d}"
            rows.append({"url": f"gone/{key}.jpg", "caption": f"stock photo {label}-{j}", "NSFW": "UNLIKELY",
                         "similarity": 0.2, "aesthetic": float(rng.uniform(5.0, 8.0)), "width": 640,
                         "height": 480, "key": key})
            vectors.append(_at_cosine(queries[label], DEAD_LINK_COSINE, rng))
    order = rng.permutation(len(rows))  # shards mix classes and dead links, as LAION's do
    emb = np.stack(vectors)[order].astype(np.float16)
    table = pa.Table.from_pylist([rows[i] for i in order])
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    for s in range(shards):
        lo, hi = bounds[s], bounds[s + 1]
        np.save(out / "img_emb" / f"img_emb_{s}.npy", emb[lo:hi])
        pq.write_table(table.slice(lo, hi - lo), out / "metadata" / f"metadata_{s}.parquet")
    shape = IndexShape(per_class, rare, dead_links)
    (out / COMPLETE).write_text(json.dumps({"per_class": per_class, "rare": rare, "dead_links": dead_links}))
    log.info("stand-in LAION index: %d rows (%d dead links), rare classes %s at %s", len(rows), dead_links,
             rare, out)
    return shape


def _at_cosine(q: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly ``cosine`` to the unit vector ``q``, in a random direction."""
    u = rng.normal(size=q.shape)
    u -= (u @ q) * q
    u /= np.linalg.norm(u)
    return cosine * q + np.sqrt(1.0 - cosine ** 2) * u


def write_inception_weights(out: str | Path, seed: int = 0) -> Path:
    """A random Inception-v3 state dict as ``.safetensors`` (float16), the offline stand-in of
    torchvision's ``IMAGENET1K_V1`` that ``finetune.feature_weights`` names (idempotent)."""
    out = Path(out)
    if out.exists():
        return out
    import torch
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    model = inception_v3(weights=None, aux_logits=False, init_weights=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(out)
    return out


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


@contextlib.contextmanager
def serve_directory(root: str | Path) -> Iterator[str]:
    """Serve ``root`` read-only on 127.0.0.1 (a free port) while open; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, name="standin-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
