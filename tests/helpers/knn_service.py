"""Small local indexes with known answers and a stand-in for clip-retrieval's ``clip back``, for the
retrieval backend tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from raugment.core import schema


class KnownTextEncoder:
    """Maps "A photo of c<i>." to class direction i (a CLIP text tower with known answers)."""

    def __init__(self, directions: np.ndarray):
        self.directions = directions

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.directions[int(t.split("c")[-1].rstrip("."))] for t in texts])


def known_index(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """An index of items clustered around class directions (``clip_model`` "fake-clip"):
    (index directory, labels, directions)."""
    from raugment.stages.index.config import IndexConfig
    from raugment.stages.index.stage import build_index
    from tests.stages.index.test_index import known_embeddings, write_laion_layout

    emb, labels, directions = known_embeddings()
    src = write_laion_layout(root / "laion", emb, labels)
    build_index(IndexConfig(source="embeddings", path=str(src), clip_model="fake-clip"), root / "index")
    return root / "index", labels, directions


@contextmanager
def knn_server(index_dir: Path, embed_texts: Callable[[list[str]], np.ndarray],
               seen: list[dict[str, Any]] | None = None) -> Iterator[str]:
    """A tiny ``/knn-service`` answering from ``index_dir``, shaped as clip back 2.45 answers:
    ``num_result_ids`` rows, metadata (url, caption, ...) only on the first ``num_images``.
    Yields its URL; every request body is appended to ``seen``."""
    from raugment.lib.knn_index import open_index

    idx = open_index(index_dir)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if seen is not None:
                seen.append(body)
            scores, ids = idx.search(embed_texts([body["text"]]), body["num_result_ids"])
            rows = idx.rows(ids[0])
            out = [{"id": int(i), "similarity": float(s)} for i, s in zip(ids[0], scores[0])]
            for item, r in zip(out[: body["num_images"]], rows):
                item.update({"url": r[schema.URL], "caption": r[schema.CAPTION],
                             "NSFW": "NSFW" if r[schema.NSFW_SCORE] else "UNLIKELY"})
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/knn-service"
    finally:
        srv.shutdown()
        srv.server_close()
