"""Downloader throughput: raugment vs img2dataset on the same URLs from the local pool server.

    python benchmarks/download.py [--images 600] [--latency-ms 50] [--concurrency 32]

Serves a demo pool on 127.0.0.1 with injected per-image latency (plus ~5 % dead URLs) and
downloads the same URL list with (a) raugment's core downloader (one process, ``--concurrency``
requests in flight) and (b) img2dataset (one process, ``--concurrency`` threads, no re-encoding),
in one run. img2dataset cannot be installed beside Ray 2.60's pins, so it is run in a subprocess
from ``I2D_PATH`` (a ``pip install --no-deps --target`` directory, plus opencv-python-headless
and albumentations<2); when it is not importable, a plain ``requests`` thread-pool loop is
measured instead and the line says so.
Prints one line: images/s of each, the ratio, and success counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

I2D_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from img2dataset import download
    urls, out, threads, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    t0 = time.perf_counter()
    download(url_list=urls, input_format="txt", output_folder=out, output_format="parquet",
             processes_count=1, thread_count=threads, resize_mode="no", skip_reencode=True,
             timeout=timeout, retries=0, enable_wandb=False, number_sample_per_shard=100000,
             distributor="multiprocessing")
    elapsed = time.perf_counter() - t0
    import glob, pyarrow.parquet as pq
    ok = sum(pq.read_table(f, columns=["status"]).column("status").to_pylist().count("success")
             for f in glob.glob(out + "/*.parquet"))
    print(json.dumps({"elapsed": elapsed, "ok": ok}))
""")


def run_img2dataset(urls: list[str], work: Path, threads: int, timeout: float) -> dict | None:
    """img2dataset in a subprocess; None when it cannot be imported there."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    extra = os.environ.get("I2D_PATH", "/tmp/i2d:/tmp/i2d_stub")
    env["PYTHONPATH"] = extra + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    probe = subprocess.run([sys.executable, "-c", "import img2dataset"], env=env, capture_output=True)
    if probe.returncode:
        return None
    (work / "urls.txt").write_text("\n".join(urls) + "\n")
    res = subprocess.run([sys.executable, "-c", I2D_SCRIPT, str(work / "urls.txt"), str(work / "i2d"),
                          str(threads), str(timeout)], env=env, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stderr[-2000:])
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_requests_loop(urls: list[str], threads: int, timeout: float) -> dict:
    """The plain baseline: a requests thread pool, bytes verified by PIL."""
    import io

    import requests
    from PIL import Image

    def one(url: str) -> bool:
        try:
            r = requests.get(url, timeout=timeout)
            if r.status_code != 200:
                return False
            Image.open(io.BytesIO(r.content)).load()
            return True
        except Exception:
            return False

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        ok = sum(pool.map(one, urls))
    return {"elapsed": time.perf_counter() - t0, "ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()

    from raugment.demo.corpus import CorpusServer, build_corpus, read_corpus
    from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES
    from raugment.stages.retrieve.config import DownloadConfig
    from raugment.stages.retrieve.download import download_urls

    work = Path(tempfile.mkdtemp(prefix="bench-dl-"))
    per_class = max(1, args.images // 5)
    pool = build_corpus(work / "pool", SYNTHETIC_CLASSES[:4], per_class=per_class, distractors=per_class,
                      seed=0, size=64)
    paths = read_corpus(pool).column("url").to_pylist()
    with CorpusServer(pool, faults=False, latency_s=args.latency_ms / 1000.0) as srv:
        urls = [srv.url + p for p in paths]
        urls += [f"{srv.url}img/missing-{i}.jpg" for i in range(len(urls) // 20)]   # dead links
        cfg = DownloadConfig(concurrency_per_actor=args.concurrency, timeout_s=args.timeout, retries=0,
                             allow_loopback=True)
        t0 = time.perf_counter()
        ours = download_urls(urls, cfg)
        ours_s = time.perf_counter() - t0
        ours_ok = sum(r.reason is None for r in ours)
        peer_name = "img2dataset"
        peer = run_img2dataset(urls, work, args.concurrency, args.timeout)
        if peer is None:
            peer_name = "requests-threadpool"
            peer = run_requests_loop(urls, args.concurrency, args.timeout)
    n = len(urls)
    ours_rate, peer_rate = n / ours_s, n / peer["elapsed"]
    print(f"download urls={n} latency_ms={args.latency_ms:g} concurrency={args.concurrency} "
          f"raugment={ours_rate:.1f} url/s ok={ours_ok} | {peer_name}={peer_rate:.1f} url/s ok={peer['ok']} "
          f"| ratio={ours_rate / peer_rate:.2f}x")


if __name__ == "__main__":
    main()
