"""The demo's captioned corpus (a stand-in for LAION): images, an HTTP server with faults, a small CLIP.

:func:`build_corpus` draws captioned images of the target classes (with the synthetic dataset
source's :func:`~raugment.stages.dataset.sources.synthetic.draw_named`) plus distractors, with a
hidden class (column ``pool_label``, the name it had before it was called a corpus) for precision@n,
aesthetic scores on some rows, NSFW tags on a few, and some URLs that misbehave. It is written as
``pool.parquet`` (:data:`CORPUS_FILE`). :class:`CorpusServer` serves it on 127.0.0.1 (ephemeral
port). URLs in the corpus are relative (``img/<id>.jpg``, ``f/<fault>/<id>.jpg``); join them with
:attr:`CorpusServer.url` (``retrieve.url_base``). :func:`train_small_clip` trains a tiny open_clip
on the corpus's captions, because a random-weight CLIP embeds every image almost identically.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raugment.core import schema

log = logging.getLogger(__name__)

CORPUS_FILE = "pool.parquet"
INFO_FILE = "pool.json"

# fault kind -> the reason the downloader must record for it
FAULT_REASONS: dict[str, str] = {
    "http_404": "http_404",
    "http_500": "http_500",
    "hang": "timeout",
    "slow_drip": "timeout",
    "not_an_image": "not_an_image",
    "truncated_jpeg": "corrupt",
    "pixel_bomb": "too_many_pixels",
    "byte_bomb": "too_large",
    "redirect_loop": "too_many_redirects",
    "redirect_private": "refused_address",
    "redirect_metadata": "refused_address",
}
# Where the refusing redirects point. They must never be contacted (checked by the connect guard).
REFUSED_TARGETS = {"redirect_private": "http://10.0.0.1/img.jpg",
                   "redirect_metadata": "http://169.254.169.254/latest/meta-data/"}

_CAPTIONS = ("a photo of a {name}", "{name} on a grey background", "A photo of {w}.", "#{w}",
             "{w}.jpg", "clipart: {name}", "{shape} shape, {colour}", "a {name}, stock image")


def _caption(name: str, rng: np.random.Generator) -> str:
    from raugment.lib.prompts import w

    colour, _, shape = name.partition(" ")
    template = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    return template.format(name=name, w=w(name), colour=colour, shape=shape)


def build_corpus(out_dir: str | Path, classes: Sequence[str], per_class: int = 40, distractors: int = 40,
               seed: int = 0, *, size: int = 32, fault_rate: float = 0.12, noisy_caption_rate: float = 0.1,
               aesthetic_rate: float = 0.5, nsfw_rate: float = 0.04,
               extra: Sequence[tuple[str, Any]] = ()) -> Path:
    """Draw and caption a pool of images; writes ``pool.parquet`` (``schema.POOL``) + ``pool.json``.

    Args:
        out_dir: directory to write.
        classes: target class names, ``"<colour> <shape>"`` (e.g. ``synthetic.SYNTHETIC_CLASSES``).
        per_class: images per target class.
        distractors: images of other colour/shape pairs (not a target class).
        seed: the only source of randomness.
        size: image side in pixels.
        fault_rate: share of target-class rows whose URL misbehaves (each kind at least once).
        noisy_caption_rate: share of rows captioned as another class (labels stay true).
        aesthetic_rate: share of rows with an aesthetic score (the rest need the predictor).
        nsfw_rate: share of rows tagged NSFW.
        extra: ``(class name, PIL image)`` pairs appended as ordinary captioned rows (never faulty),
            e.g. the mini-world's near-duplicates of test images.
    """
    from raugment.core.imageio import encode_image, stable_id
    from raugment.stages.dataset.sources.synthetic import COLOURS, SHAPES, draw_named

    if per_class <= 0 or distractors < 0:
        raise ValueError("build_corpus: per_class must be > 0 and distractors >= 0")
    rng = np.random.default_rng(seed)
    others = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in set(classes)]
    names = [n for n in classes for _ in range(per_class)]
    names += [others[int(rng.integers(len(others)))] for _ in range(distractors)] if others else []
    given = [None] * len(names) + [img for _, img in extra]
    names += [name for name, _ in extra]
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        img = draw_named(name, rng, size) if given[i] is None else given[i]
        capt_name = name
        if rng.random() < noisy_caption_rate:
            capt_name = list(classes)[int(rng.integers(len(classes)))]
        rid = stable_id("pool", seed, i)
        rows.append({schema.ID: rid, schema.URL: f"img/{rid}.jpg", schema.CAPTION: _caption(capt_name, rng),
                     schema.POOL_LABEL: name,
                     schema.AESTHETIC_SCORE: round(float(rng.uniform(3.0, 8.0)), 2)
                     if rng.random() < aesthetic_rate else None,
                     schema.NSFW_SCORE: 1.0 if rng.random() < nsfw_rate else 0.0,
                     schema.FAULT: "", schema.IMAGE: encode_image(img, "JPEG", 92),
                     schema.WIDTH: img.width, schema.HEIGHT: img.height})
    n_target = len(classes) * per_class
    n_faults = min(n_target, max(len(FAULT_REASONS), round(fault_rate * n_target)))
    kinds = list(FAULT_REASONS)
    for j, idx in enumerate(rng.choice(n_target, size=n_faults, replace=False)):
        row = rows[int(idx)]
        row[schema.FAULT] = kinds[j % len(kinds)]
        row[schema.URL] = f"f/{row[schema.FAULT]}/{row[schema.ID]}.jpg"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.to_table(rows, schema.POOL), out / CORPUS_FILE)
    info = {"classes": list(classes), "per_class": per_class, "distractors": distractors, "seed": seed,
            "size": size, "rows": len(rows), "faults": n_faults,
            "extra_ids": [r[schema.ID] for r in rows[len(rows) - len(extra):]] if extra else []}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    log.info("built pool of %d images (%d with faulty URLs) in %s", len(rows), n_faults, out)
    return out


def read_corpus(pool_dir: str | Path) -> Any:
    """The pool table (``schema.POOL``)."""
    return pq.read_table(Path(pool_dir) / CORPUS_FILE)


# --------------------------------------------------------------------------------------------
# HTTP server with faults
# --------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=2)
def pixel_bomb_png(side: int = 12_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels that is only a few kB (a decompression bomb)."""
    row = b"\x00" + bytes((side + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(row * side, 6)) + _png_chunk(b"IEND", b""))


class CorpusServer:
    """Serve a pool on ``127.0.0.1`` (ephemeral port) with fault URLs; a context manager.

    Args:
        pool_dir: a directory written by :func:`build_corpus`.
        faults: serve fault URLs as faults; False serves every URL's image normally.
        latency_s: delay before every image response (benchmarks).
        hang_s: how long a ``hang`` URL stalls (longer than any client timeout used here).
        drip_interval_s: pause between the 16-byte pieces of a ``slow_drip`` response.
        bomb_bytes: how much a ``byte_bomb`` URL streams at most.
        port: port to bind (0 = a free one). The retrieval stage's key does not depend on it.

    Attributes:
        url: base URL, ``http://127.0.0.1:<port>/``.
        requests: request paths in arrival order (thread-safe appends).
    """

    def __init__(self, pool_dir: str | Path, faults: bool = True, latency_s: float = 0.0,
                 hang_s: float = 60.0, drip_interval_s: float = 0.25, bomb_bytes: int = 64_000_000,
                 port: int = 0):
        table = read_corpus(pool_dir)
        self.images = dict(zip(table.column(schema.ID).to_pylist(), table.column(schema.IMAGE).to_pylist()))
        self.faults = faults
        self.latency_s = latency_s
        self.hang_s = hang_s
        self.drip_interval_s = drip_interval_s
        self.bomb_bytes = bomb_bytes
        self.port = port
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> CorpusServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> CorpusServer:
        if self.faults:
            pixel_bomb_png()  # made before serving, so making it never counts against a client's timeout
        handler = type("CorpusHandler", (_Handler,), {"pool": self})
        server_cls = type("CorpusHTTPServer", (ThreadingHTTPServer,), {"request_queue_size": 256})
        self._httpd = server_cls(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]  # the bound one when 0 asked for any free port
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="pool-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()  # releases hanging and dripping handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def log_request(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)


class _Handler(BaseHTTPRequestHandler):
    pool: CorpusServer
    protocol_version = "HTTP/1.0"  # close-delimited bodies: a byte bomb can omit Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        log.debug("pool server: " + format, *args)

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        pool = self.pool
        pool.log_request(self.path)
        parts = self.path.lstrip("/").split("/")
        if len(parts) == 2 and parts[0] == "img":
            kind, key = "", parts[1]
        elif len(parts) == 3 and parts[0] == "f":
            kind, key = parts[1], parts[2]
        else:
            return self._send(404, b"not found", "text/plain")
        image = pool.images.get(key.rsplit(".", 1)[0])
        if image is None:
            return self._send(404, b"not found", "text/plain")
        try:
            if kind and pool.faults:
                return self._fault(kind, image)
            if pool.latency_s:
                time.sleep(pool.latency_s)
            self._send(200, image)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts, size caps): that is the point of most faults

    def _fault(self, kind: str, image: bytes) -> None:
        pool = self.pool
        if kind in ("http_404", "http_500"):
            self._send(int(kind[-3:]), b"error", "text/plain")
        elif kind == "hang":
            pool._stop.wait(pool.hang_s)
        elif kind == "slow_drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            for start in range(0, len(image), 16):
                if pool._stop.wait(pool.drip_interval_s):
                    return
                self.wfile.write(image[start:start + 16])
                self.wfile.flush()
        elif kind == "not_an_image":
            self._send(200, b"<html><body>This is not the image you are looking for</body></html>", "text/html")
        elif kind == "truncated_jpeg":
            # keep the headers, cut the entropy-coded data: opens fine, fails to decode
            self._send(200, image[: len(image) - max(64, len(image) // 4)])
        elif kind == "pixel_bomb":
            self._send(200, pixel_bomb_png(), "image/png")
        elif kind == "byte_bomb":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            chunk = b"\xff" * 65536
            for _ in range(pool.bomb_bytes // len(chunk)):
                if pool._stop.is_set():
                    return
                self.wfile.write(chunk)
        elif kind == "redirect_loop":
            self._send(302, b"", "text/plain", {"Location": self.path})
        elif kind in REFUSED_TARGETS:
            self._send(302, b"", "text/plain", {"Location": REFUSED_TARGETS[kind]})
        else:
            self._send(400, b"unknown fault", "text/plain")


# --------------------------------------------------------------------------------------------
# A small CLIP trained on the pool
# --------------------------------------------------------------------------------------------


def train_small_clip(pool_dir: str | Path | Sequence[str | Path], out_dir: str | Path, seed: int = 0,
                     minutes: float = 1.0, max_steps: int | None = None, batch_size: int = 64, lr: float = 2e-3,
                     num_threads: int | None = None, weight_decay: float = 0.05, shift: int = 0,
                     warmup_steps: int = 0, cosine: bool = False, caption_positives: bool = False) -> Path:
    """Contrastively train the tiny open_clip on the pool's (image, caption) pairs; save it for ``load_clip``.

    Training stops after ``minutes`` of wall time or ``max_steps`` steps, whichever comes first
    (give ``max_steps`` for a result that does not depend on machine load). ``num_threads`` limits
    torch's threads while training (on a crowded machine one thread is often faster).

    Args:
        pool_dir: one pool directory, or several whose rows are trained on together.
        weight_decay: AdamW's decoupled weight decay.
        shift: image augmentation besides the horizontal flip: each training image is moved by up
            to ``shift`` pixels along each axis (edge pixels repeated). Colour is never altered: it
            is half of every class name.
        warmup_steps: the learning rate rises linearly from ``lr / warmup_steps`` to ``lr`` over
            these first steps.
        cosine: after the warm-up, decay the learning rate to 0 along a half cosine ending at
            ``max_steps`` (which must then be given).
        caption_positives: in the contrastive loss, count every image of the batch whose caption
            is the same string as a text's caption as a match of that text (and vice versa), with
            equal shares, instead of treating it as a negative. Uses only the captions.
    """
    import torch

    if cosine and max_steps is None:
        raise ValueError("train_small_clip: cosine=True decays over max_steps; give max_steps")
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _train_small_clip(pool_dir, out_dir, seed, minutes, max_steps, batch_size, lr, weight_decay, shift,
                                 warmup_steps, cosine, caption_positives)
    finally:
        torch.set_num_threads(threads)


def _shift(x, gen, shift: int):
    """Move each image of the batch ``x`` (N, C, H, W) by its own random offset in ``[-shift, shift]``²."""
    import torch

    h, w = x.shape[-2:]
    pad = torch.nn.functional.pad(x, (shift, shift, shift, shift), mode="replicate")
    off = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=gen)
    return torch.stack([p[:, dy:dy + h, dx:dx + w] for p, (dy, dx) in zip(pad, off.tolist())])


def lr_at(step: int, lr: float, warmup_steps: int = 0, cosine_steps: int | None = None) -> float:
    """The learning rate of ``step`` (0-based): linear warm-up over ``warmup_steps``, then constant,
    or a half cosine down to 0 at ``cosine_steps`` when given."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if cosine_steps is None:
        return lr
    done = (step - warmup_steps) / max(1, cosine_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def contrastive_targets(caption_ids):
    """Soft targets (N, N) of a batch's image->text loss: each row's matches are the texts with the
    same caption id, in equal shares. Symmetric, so the text->image loss uses the same matrix."""
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    return same / same.sum(1, keepdim=True)


def _train_small_clip(pool_dir: str | Path | Sequence[str | Path], out_dir: str | Path, seed: int, minutes: float,
                      max_steps: int | None, batch_size: int, lr: float, weight_decay: float, shift: int,
                      warmup_steps: int, cosine: bool, caption_positives: bool) -> Path:
    import pyarrow as pa
    import torch

    from raugment.core.imageio import decode_image
    from raugment.models.clip import TINY_MODEL_CFG, build_clip_model, load_clip, save_clip

    dirs = [pool_dir] if isinstance(pool_dir, (str, Path)) else list(pool_dir)
    table = pa.concat_tables([read_corpus(d).select([schema.IMAGE, schema.CAPTION]) for d in dirs])
    captions = table.column(schema.CAPTION).to_pylist()
    torch.manual_seed(seed)
    model = build_clip_model(TINY_MODEL_CFG, seed=seed)
    # The preprocessing and tokenizer of the saved format, so training sees what loading gives.
    tmp = save_clip(model, TINY_MODEL_CFG, Path(out_dir))
    enc = load_clip(str(tmp))
    pixels = torch.stack([enc.preprocess(decode_image(b)) for b in table.column(schema.IMAGE).to_pylist()])
    tokens = enc.tokenizer(captions)
    model.train()
    # The 49,408-row token table dominates a CPU step; fixed random token vectors are distinct
    # enough for the transformer above them to learn the pool's few words.
    model.token_embedding.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)
    # Rows with the same caption string share an id: their pairs are positives, not negatives.
    caption_ids = torch.from_numpy(np.unique(np.array(captions), return_inverse=True)[1].reshape(-1))
    gen = torch.Generator().manual_seed(seed)
    deadline = time.monotonic() + 60.0 * minutes
    step, n, loss = 0, len(captions), torch.zeros(())
    while time.monotonic() < deadline and (max_steps is None or step < max_steps):
        idx = torch.randperm(n, generator=gen)[: min(batch_size, n)]
        x = pixels[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if shift:
            x = _shift(x, gen, shift)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokens[idx], normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        target = contrastive_targets(caption_ids[idx]) if caption_positives else torch.arange(len(idx))
        loss = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup_steps, max_steps if cosine else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        step += 1
    model.eval()
    log.info("trained small CLIP for %d steps (last loss %.3f)", step, float(loss.detach()))
    return save_clip(model, TINY_MODEL_CFG, out_dir)
