"""The ``knn_service`` backend: clip-retrieval's ``/knn-service`` protocol, its keys and its retries."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from raugment.config import from_dict
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.stages.retrieve.backends import needs_index
from raugment.stages.retrieve.backends.knn_service import KnnServiceRetriever, build_request, parse_response
from raugment.stages.retrieve.backends.local import LocalRetriever
from tests import FIXTURES
from tests.helpers.knn_service import KnownTextEncoder, knn_server, known_index

KNN_FIXTURES = FIXTURES / "knn_service"


def contract_config(env) -> dict:
    """``retrieve`` keys the registry contract test builds this backend with."""
    return {"service_url": env.service_url}


def test_returns_the_known_neighbours_as_the_local_index_does(tmp_path):
    index_dir, labels, directions = known_index(tmp_path)
    local = LocalRetriever(from_dict({"retrieve": {"index": str(index_dir)}}), str(index_dir))
    local._encoder = KnownTextEncoder(directions)
    seen: list[dict] = []
    prompts = ["A photo of c0.", "A photo of c2."]
    with knn_server(index_dir, KnownTextEncoder(directions).embed_texts, seen) as url:
        remote = KnnServiceRetriever(from_dict({"retrieve": {"backend": "knn_service", "service_url": url}}))
        hits = remote.query(prompts, 10)
        for c, class_hits in zip((0, 2), hits):
            ids = [int(urlsplit(h[schema.URL]).path.strip("/").split(".")[0]) for h in class_hits]
            assert len(ids) == 10 and set(labels[ids]) == {c}
            sims = [h[schema.CLIP_SIMILARITY] for h in class_hits]
            assert sims == sorted(sims, reverse=True)
        assert [h[schema.URL] for h in local.query(prompts, 10)[0]] == [h[schema.URL] for h in hits[0]]
    assert all(b["num_result_ids"] > b["num_images"] for b in seen)
    assert not needs_index("knn_service")


def test_request_matches_the_recorded_protocol():
    cfg = from_dict({"retrieve": {"backend": "knn_service", "service_url": "http://127.0.0.1:1/knn-service"}})
    recorded = json.loads((KNN_FIXTURES / "request.json").read_text())
    assert build_request(cfg, "A photo of tigershark.", 182) == recorded   # every field explicit
    steered = from_dict({"retrieve": {"backend": "knn_service", "service_url": "http://x/knn-service",
                                      "service_aesthetic_score": 9, "service_aesthetic_weight": 0.5}})
    body = build_request(steered, "x", 10)
    assert body["aesthetic_score"] == 9 and body["aesthetic_weight"] == 0.5 and body["num_result_ids"] == 30


def test_replayed_response_and_retries():
    response = (KNN_FIXTURES / "response.json").read_bytes()
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, data = (503, b"busy") if len(calls) == 1 else (200, response)
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = from_dict({"retrieve": {"backend": "knn_service", "retries": 2, "timeout_s": 5,
                                      "service_url": f"http://127.0.0.1:{srv.server_address[1]}/knn-service"}})
        (hits,) = KnnServiceRetriever(cfg).query(["A photo of tigershark."], 182)
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(calls) == 2 and calls[1] == json.loads((KNN_FIXTURES / "request.json").read_text())
    assert [h[schema.NSFW_SCORE] for h in hits] == [0.0, 0.5, 1.0]        # the row without url is skipped
    assert hits[1][schema.AESTHETIC_SCORE] == 5.61 and hits[0][schema.AESTHETIC_SCORE] is None
    with pytest.raises(Exception, match="error"):
        parse_response({"error": "index not found"})


def test_needs_a_url_only_when_chosen():
    with pytest.raises(ConfigError, match=r"retrieve\.service_url is required when retrieve\.backend='knn_service'"):
        from_dict({"retrieve": {"backend": "knn_service"}})
    assert from_dict({"retrieve": {"backend": "local"}}).retrieve.service_url is None


def test_result_ids_factor_asks_for_more_ids_than_images():
    with pytest.raises(ConfigError, match=r"retrieve\.result_ids_factor must be >= 1"):
        from_dict({"retrieve": {"result_ids_factor": 0.5}})
