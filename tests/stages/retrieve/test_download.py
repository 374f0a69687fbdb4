"""The downloader: address policy, retries, caps, resize, the Ray wrapper."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from raugment.config import from_dict
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.core.imageio import decode_image, encode_image
from raugment.stages.dataset.sources.synthetic import draw_named
from raugment.stages.retrieve.config import DownloadConfig
from raugment.stages.retrieve.download import DownloadPool, address_refused, download_urls

IMAGE = encode_image(draw_named("red circle", np.random.default_rng(0), 64), "PNG")


@pytest.fixture
def flaky_server():
    """/flaky fails with 500 twice then serves; /big serves a 64 px PNG; counts hits per path."""
    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/flaky" and hits[self.path] <= 2:
                body, status = b"busy", 500
            elif self.path == "/gone":
                body, status = b"gone", 404
            elif self.path.startswith("/to-metadata"):   # a redirect hop to the cloud metadata address
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            else:
                body, status = IMAGE, 200
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("ip, loopback, private, refused", [
    ("8.8.8.8", False, False, False),
    ("127.0.0.1", False, False, True),
    ("127.0.0.1", True, False, False),
    ("::1", True, False, False),
    ("10.0.0.1", True, False, True),
    ("10.0.0.1", True, True, False),
    ("192.168.1.7", False, False, True),
    ("100.64.0.1", False, False, True),
    ("169.254.169.254", True, True, True),   # cloud metadata: link-local, never allowed
    ("fe80::1", True, True, True),
    ("::ffff:10.0.0.1", True, False, True),  # IPv4-mapped private address
    ("0.0.0.0", True, True, True),
    ("224.0.0.1", True, True, True),
])
def test_address_policy(ip, loopback, private, refused):
    assert address_refused(ip, DownloadConfig(allow_loopback=loopback, allow_private=private)) is refused


def test_bad_urls_and_refused_hosts_fail_without_connecting(connects):
    urls = ["file:///etc/passwd", "ftp://example.org/x.jpg", "not a url", "http://10.0.0.1/x.jpg",
            "http://169.254.169.254/latest/meta-data/", "http://localhost:9/x.jpg", "http://[::1]:9/x.jpg"]
    res = download_urls(urls, DownloadConfig(timeout_s=2, retries=0))
    assert [r.reason for r in res] == ["bad_url", "bad_url", "bad_url", "refused_address", "refused_address",
                                       "refused_address", "refused_address"]
    assert connects == []


def test_retries_then_success_and_no_retry_for_404(flaky_server):
    base, hits = flaky_server
    cfg = DownloadConfig(timeout_s=2, retries=2, backoff_s=0.01, allow_loopback=True)
    ok, gone = download_urls([base + "/flaky", base + "/gone"], cfg)
    assert ok.reason is None and ok.attempts == 3 and decode_image(ok.image).size == (64, 64)
    assert gone.reason == "http_404" and gone.attempts == 1 and hits["/gone"] == 1
    cfg0 = DownloadConfig(timeout_s=2, retries=0, allow_loopback=True)
    hits.clear()
    (again,) = download_urls([base + "/flaky"], cfg0)
    assert again.reason == "http_500" and again.attempts == 1


def test_caps_and_resize(flaky_server):
    base, _ = flaky_server
    small = DownloadConfig(timeout_s=2, retries=0, allow_loopback=True, max_bytes=100)
    assert download_urls([base + "/img"], small)[0].reason == "too_large"
    pixels = DownloadConfig(timeout_s=2, retries=0, allow_loopback=True, max_pixels=64 * 63)
    assert download_urls([base + "/img"], pixels)[0].reason == "too_many_pixels"
    resize = DownloadConfig(timeout_s=2, retries=0, allow_loopback=True, resize_max_side=16)
    (r,) = download_urls([base + "/img"], resize)
    assert (r.width, r.height) == (16, 16) and decode_image(r.image).size == (16, 16)
    assert r.num_bytes == len(IMAGE)   # the hash and size are of what the server sent


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="retrieve.download.timeout_s"):
        from_dict({"retrieve": {"download": {"timeout_s": 0}}})


def test_download_pool_gives_the_same_outcomes_on_the_same_actors(ray_session, flaky_server):
    import os

    base, hits = flaky_server
    cfg = DownloadConfig(timeout_s=2, retries=0, allow_loopback=True)
    cfg.pool.batch_size = 3
    rounds = [[f"{base}/img{i}" for i in range(6)] + [base + "/gone", "http://10.0.0.1/x.jpg"],
              [f"{base}/more{i}" for i in range(5)] + [base + "/to-metadata"],
              [base + "/last"]]
    reasons = []
    with DownloadPool(cfg) as pool:
        for urls in rounds:
            rows = {r[schema.URL]: r for t in pool.download(urls) for r in t.to_pylist()}
            assert set(rows) == set(urls)
            assert rows == {r.url: r.row() for r in download_urls(urls, cfg)}   # as in-process
            reasons += [rows[u][schema.REASON] for u in urls if rows[u][schema.REASON]]
        assert list(pool.download([])) == []
        st = pool.group.stats()
    assert reasons == ["http_404", "refused_address", "refused_address"]   # 10.x; the redirect to 169.254.x
    assert hits["/to-metadata"] == 2                 # its first hop was fetched (pool + in-process), never the next
    # Every round was served by the two actors started with the pool, none by the driver.
    assert st["started"] == cfg.pool.concurrency == 2 and set(st["served"]) <= set(st["pids"])
    assert sum(st["served"].values()) == 3 + 2 + 1 and os.getpid() not in st["pids"].values()
