"""The downloader's decode step: the reason for images over the pixel cap, and how many decode at once."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from raugment.core.imageio import encode_image
from raugment.stages.dataset.sources.synthetic import draw_named
from raugment.stages.retrieve import download
from raugment.stages.retrieve.config import DownloadConfig
from raugment.stages.retrieve.download import decode_threads, download_urls
from tests.core.test_imageio import png_header

IMAGE = encode_image(draw_named("red circle", np.random.default_rng(0), 32), "PNG")


@pytest.fixture
def server():
    """Serves ``bodies[path]`` (default: a 32 px PNG) with status 200."""
    bodies: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = bodies.get(self.path, IMAGE)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", bodies
    srv.shutdown()
    srv.server_close()


def test_images_over_the_pixel_cap_are_recorded_as_too_many_pixels(server):
    base, bodies = server
    bodies["/big"] = png_header(8000, 6000)       # 48 Mpx: over our 40 Mpx cap
    bodies["/bomb"] = png_header(20000, 10000)    # 200 Mpx: PIL's own bomb check fires first
    bodies["/junk"] = b"<html>not an image</html>"
    cfg = DownloadConfig(timeout_s=5, retries=0, allow_loopback=True)
    big, bomb, junk, ok = download_urls([base + p for p in ("/big", "/bomb", "/junk", "/ok")], cfg)
    assert (big.reason, bomb.reason, junk.reason, ok.reason) == ("too_many_pixels",) * 2 + ("not_an_image", None)
    assert "200000000 pixels" in bomb.detail and bomb.image is None


@pytest.mark.parametrize("num_cpus, threads", [(0.0, 1), (0.25, 1), (1.0, 1), (1.5, 1), (2.0, 2), (7.9, 7)])
def test_decode_threads_follow_the_actors_cpus(num_cpus, threads):
    assert decode_threads(num_cpus) == threads


@pytest.mark.parametrize("num_cpus", [0.25, 2.0])
def test_no_more_decodes_at_once_than_the_actor_has_cpus(server, monkeypatch, num_cpus):
    base, _ = server
    lock, now, peak = threading.Lock(), [0], [0]
    real = download.decode_image

    def counting_decode(*args, **kwargs):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.03)   # long enough for every waiting decode to start if nothing held it back
            return real(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(download, "decode_image", counting_decode)
    cfg = DownloadConfig(timeout_s=5, retries=0, allow_loopback=True)
    cfg.pool.num_cpus = num_cpus
    results = download_urls([f"{base}/img{i}" for i in range(12)], cfg)
    assert [r.reason for r in results] == [None] * 12
    assert 1 <= peak[0] <= decode_threads(num_cpus)

