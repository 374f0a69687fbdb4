"""Downloader: raugment vs img2dataset, start-up and steady state measured apart.

    python benchmarks/download.py [--urls 10000] [--latency-ms 50,0] [--runs 3] [--concurrency 32]

One HTTP server on 127.0.0.1 (``raugment.demo.corpus.CorpusServer``, in this process, with
``--latency-ms`` of delay before each image, ~5 % dead URLs answering 404) serves the same URL list
to both tools, each run as a subprocess:

* raugment: ``raugment.stages.retrieve.download.download_urls`` in one process (``--concurrency``
  requests in flight, the retrieve defaults otherwise: verify every image, no resize);
* img2dataset 1.47.0: one process, ``--concurrency`` threads, no resize, no re-encode, Parquet
  output, from its side environment (``tools/img2dataset_env``, built here when missing: it installs
  only with ``--no-deps`` beside the project's pins).

The server stamps each request's arrival, so both tools are measured from outside, the same way:

* start-up: spawn -> first request at the server (interpreter, imports, reading the URL list,
  img2dataset's worker process);
* steady state: URLs/s between the 10th and the 90th percentile of arrivals (needs >= 10,000 URLs to
  mean anything: below that the tails dominate);
* end to end: URLs / (spawn -> exit); CPU: the child's user+sys seconds / wall seconds (cores used),
  and the same for this process (the server's threads: it shares the machine with the tool).

``--runs`` runs of each tool per latency, alternating which goes first; medians are printed, with
the ratios raugment / img2dataset and ``/proc/loadavg`` before and after (the machine's load moves
every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parent.parent

RAUGMENT_SCRIPT = textwrap.dedent("""
    import json, sys
    from raugment.stages.retrieve.config import DownloadConfig
    from raugment.stages.retrieve.download import download_urls
    urls = open(sys.argv[1]).read().split()
    cfg = DownloadConfig(concurrency_per_actor=int(sys.argv[2]), timeout_s=float(sys.argv[3]), retries=0,
                         allow_loopback=True)
    print(json.dumps({"ok": sum(r.reason is None for r in download_urls(urls, cfg))}))
""")

I2D_SCRIPT = textwrap.dedent("""
    import glob, json, sys
    import pyarrow.parquet as pq
    from img2dataset import download
    urls, out, threads, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    download(url_list=urls, input_format="txt", output_folder=out, output_format="parquet",
             processes_count=1, thread_count=threads, resize_mode="no", skip_reencode=True,
             timeout=timeout, retries=0, enable_wandb=False, number_sample_per_shard=10**7,
             distributor="multiprocessing")
    ok = sum(pq.read_table(f, columns=["status"]).column("status").to_pylist().count("success")
             for f in glob.glob(out + "/*.parquet"))
    print(json.dumps({"ok": ok}))
""")


# ---------------------------------------------------------------------------------------------
# Statistics (unit-tested in tests/test_benchmarks.py)

def steady_rate(arrivals: Sequence[float], lo: float = 0.1, hi: float = 0.9) -> float:
    """Requests/s between the ``lo`` and ``hi`` quantiles of sorted arrival times (the run's middle)."""
    t = sorted(arrivals)
    if len(t) < 10:
        raise ValueError(f"steady_rate needs at least 10 arrivals, got {len(t)}")
    i, j = int(lo * (len(t) - 1)), int(hi * (len(t) - 1))
    span = t[j] - t[i]
    if span <= 0:
        raise ValueError("steady_rate: all arrivals in the window share one time stamp")
    return (j - i) / span


def run_figures(spawn: float, end: float, arrivals: Sequence[float], n_urls: int, cpu_s: float) -> dict[str, float]:
    """One run's figures from the server's arrival stamps (perf_counter seconds)."""
    if not arrivals:
        raise ValueError("no request reached the server")
    wall = end - spawn
    return {"startup_s": min(arrivals) - spawn, "steady_url_s": steady_rate(arrivals),
            "e2e_url_s": n_urls / wall, "cores": cpu_s / wall}


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over runs."""
    return {k: median(r[k] for r in runs) for k in runs[0]}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------

def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_tool(cmd: list[str], env: dict[str, str], server: Any, n_urls: int, timeout_s: float) -> dict[str, float]:
    """Spawn ``cmd``, wait, and measure it through ``server.arrivals`` (reset here)."""
    server.arrivals = []
    cpu0, own0 = _children_cpu(), _own_cpu()
    spawn = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    end = time.perf_counter()
    if res.returncode:
        raise RuntimeError(f"{cmd[0]} exited {res.returncode}:\n{res.stderr[-3000:]}")
    figures = run_figures(spawn, end, list(server.arrivals), n_urls, _children_cpu() - cpu0)
    figures["server_cores"] = (_own_cpu() - own0) / (end - spawn)   # this process: the server's threads
    figures["ok"] = float(json.loads(res.stdout.strip().splitlines()[-1])["ok"])
    return figures


def make_server(pool_dir: Path, latency_s: float) -> Any:
    from raugment.demo.corpus import CorpusServer

    class TimedServer(CorpusServer):
        """The pool server, stamping each request's arrival (``perf_counter``)."""

        arrivals: list[float]

        def log_request(self, path: str) -> None:
            self.arrivals.append(time.perf_counter())   # list.append is atomic under the GIL

    srv = TimedServer(pool_dir, faults=False, latency_s=latency_s)
    srv.arrivals = []
    return srv


def url_list(base: str, paths: Sequence[str], n: int) -> list[str]:
    """``n`` URLs: the pool's images repeated with a distinct query (the server ignores it), ~5 % dead."""
    dead = n // 20
    live = [f"{base}{paths[i % len(paths)]}?copy={i // len(paths)}" for i in range(n - dead)]
    return live + [f"{base}img/missing-{i}.jpg" for i in range(dead)]


def fmt(m: dict[str, float]) -> str:
    return (f"start {m['startup_s']:.2f} s, steady {m['steady_url_s']:.0f} url/s, end-to-end "
            f"{m['e2e_url_s']:.0f} url/s, {m['cores']:.2f} cores (server {m['server_cores']:.2f}), ok {m['ok']:.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=10_000, help="URLs per run (>= 10,000 for a steady state)")
    ap.add_argument("--latency-ms", default="50,0", help="comma-separated server latencies to measure")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-URL timeout of both tools")
    ap.add_argument("--pool-images", type=int, default=2000, help="distinct images served")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "tools" / "img2dataset_env"))
    from setup_env import ENV as I2D_ENV
    from setup_env import ensure_img2dataset_env, python

    from raugment.demo.corpus import build_corpus, read_corpus
    from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES

    venv, took = ensure_img2dataset_env()
    if took is not None:
        print(f"(img2dataset environment built in {took:.0f} s at {venv})", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-dl-"))
    per_class = max(1, args.pool_images // 8)
    pool = build_corpus(work / "pool", SYNTHETIC_CLASSES[:4], per_class=per_class, distractors=4 * per_class,
                        seed=0, size=64, fault_rate=0.0)
    paths = read_corpus(pool).column("url").to_pylist()
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    i2d_env = {**base_env, **I2D_ENV, "WANDB_MODE": "disabled"}
    run_timeout = 60 + args.urls * 0.05
    load_before = loadavg()
    report: dict[str, Any] = {"urls": args.urls, "runs": args.runs, "concurrency": args.concurrency,
                              "cpus": os.cpu_count(), "load_before": load_before, "latencies": {}}
    for latency in [float(x) for x in args.latency_ms.split(",")]:
        with make_server(pool, latency / 1000.0) as srv:
            urls = url_list(srv.url, paths, args.urls)
            urls_file = work / "urls.txt"
            urls_file.write_text("\n".join(urls) + "\n")
            ours_cmd = [sys.executable, "-c", RAUGMENT_SCRIPT, str(urls_file), str(args.concurrency),
                        str(args.timeout)]
            runs: dict[str, list[dict[str, float]]] = {"raugment": [], "img2dataset": []}
            for r in range(args.runs):
                order = ("raugment", "img2dataset") if r % 2 == 0 else ("img2dataset", "raugment")
                for tool in order:
                    if tool == "raugment":
                        runs[tool].append(run_tool(ours_cmd, base_env, srv, len(urls), run_timeout))
                    else:
                        out = work / f"i2d-{latency:g}-{r}"
                        cmd = [str(python(venv)), "-c", I2D_SCRIPT, str(urls_file), str(out),
                               str(args.concurrency), str(args.timeout)]
                        runs[tool].append(run_tool(cmd, i2d_env, srv, len(urls), run_timeout))
        ours, peer = medians(runs["raugment"]), medians(runs["img2dataset"])
        report["latencies"][f"{latency:g}"] = {"raugment": ours, "img2dataset": peer, "runs": runs}
        print(f"download latency={latency:g} ms urls={len(urls)} concurrency={args.concurrency} "
              f"medians of {args.runs} | raugment: {fmt(ours)} | img2dataset: {fmt(peer)} "
              f"| ratio raugment/img2dataset: steady {ours['steady_url_s'] / peer['steady_url_s']:.2f}x, "
              f"end-to-end {ours['e2e_url_s'] / peer['e2e_url_s']:.2f}x, start-up "
              f"{ours['startup_s']:.2f} s vs {peer['startup_s']:.2f} s", flush=True)
    report["load_after"] = loadavg()
    print(f"download load average before {load_before}, after {report['load_after']} ({os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
