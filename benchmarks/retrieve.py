"""Retrieval's per-round overhead: a new Ray Data download job per k round vs one persistent actor pool.

    PYTHONPATH=$PWD python benchmarks/retrieve.py [--rounds 6] [--urls 24] [--latency-ms 20]

The quota loop downloads once per k round. Before, every round ran ``download_dataset``: a Ray Data
``map_batches`` job whose actor pool starts (processes, imports) and stops with the job; that path
is rebuilt here (:func:`ray_data_job`) and exists only in this benchmark. After, the stage keeps one
:class:`raugment.stages.retrieve.download.DownloadPool` for all rounds. Both download the same fresh URL slice per
round from the local pool server (``raugment.demo.corpus.CorpusServer``, no faults, ``--latency-ms`` per
image), with the same resources (``retrieve.download.pool`` defaults), interleaved round by round
with an in-process ``download_urls`` of the slice (the work itself, no Ray) so that machine load
hits all three alike. Overhead per round = round time - in-process time; the pool's start-up is
counted, spread over the rounds. Prints one line: seconds per round of each, the mean overhead per
round ± its standard error, and the ratio of the mean overheads. (A median round's overhead of the
persistent pool is about 0 s, so a ratio of medians divides by noise: it printed 288x and 2506x. When
the pool's mean overhead is within two standard errors of 0, only a lower bound of the ratio is
printed: before / (after + 2 s.e.).)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from statistics import mean


class _DownloadBatch:
    """The former Ray Data callable class: a batch with a ``url`` column -> DOWNLOADS rows."""

    def __init__(self, cfg):
        from raugment.stages.retrieve.download import DownloadWorker

        self.worker = DownloadWorker(cfg)

    def __call__(self, batch):
        from raugment.core import schema

        return self.worker.download(batch.column(schema.URL).to_pylist())


def ray_data_job(urls: Sequence[str], cfg) -> Iterator:
    """The former per-round path: a new Ray Data job (and actor pool) for ``urls``."""
    import ray.data

    from raugment.core import schema
    from raugment.runtime.cluster import actor_pool_args

    args = actor_pool_args(cfg.pool)
    args["batch_size"] = max(1, min(cfg.pool.batch_size, math.ceil(len(urls) / cfg.pool.concurrency)))
    blocks = max(1, math.ceil(len(urls) / args["batch_size"]))
    ds = ray.data.from_items([{schema.URL: u} for u in urls], override_num_blocks=blocks)
    out = ds.map_batches(_DownloadBatch, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow", **args)
    yield from out.iter_batches(batch_size=None, batch_format="pyarrow")


def overhead_summary(before: Sequence[float], after: Sequence[float], base: Sequence[float],
                     start_s: float) -> dict[str, float | None]:
    """Mean overhead per round ± s.e. of each path, and the ratio of the means (None when undefined).

    ``before``/``after``/``base``: seconds per round of the per-round Ray Data job, the persistent
    pool and the in-process work on the same-sized slice; ``start_s``: the pool's one start-up,
    spread over the rounds. The ratio is None when the pool's mean overhead is not above two
    standard errors (indistinguishable from 0); ``ratio_lower`` is then before / (after + 2 s.e.).
    """
    from raugment.core.stats import mean_se

    if not (len(before) == len(after) == len(base)) or len(base) < 2:
        raise ValueError("overhead_summary needs the same number (>= 2) of rounds for each path")
    b_mean, b_se = mean_se(b - w for b, w in zip(before, base))
    a_mean, a_se = mean_se(a - w for a, w in zip(after, base))
    a_mean += start_s / len(base)
    resolved = a_mean > 2 * a_se
    return {"before": b_mean, "before_se": b_se, "after": a_mean, "after_se": a_se,
            "ratio": b_mean / a_mean if resolved else None,
            "ratio_lower": b_mean / (a_mean + 2 * a_se) if a_mean + 2 * a_se > 0 else None}


def _ok(tables) -> int:
    from raugment.core import schema

    return sum(r is None for t in tables for r in t.column(schema.REASON).to_pylist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--urls", type=int, default=24, help="URLs downloaded per round (by each path)")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()

    from raugment.core.config import ClusterConfig
    from raugment.demo.corpus import CorpusServer, build_corpus, read_corpus
    from raugment.runtime.cluster import init_ray
    from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES
    from raugment.stages.retrieve.config import DownloadConfig
    from raugment.stages.retrieve.download import DownloadPool, download_urls, results_table

    work = Path(tempfile.mkdtemp(prefix="bench-retrieve-"))
    need = 3 * args.rounds * args.urls + 1           # fresh URLs for each path and round, + warm-up
    pool_dir = build_corpus(work / "pool", SYNTHETIC_CLASSES[:4], per_class=math.ceil(need / 8),
                          distractors=math.ceil(need / 2), seed=0, size=32)
    paths = read_corpus(pool_dir).column("url").to_pylist()
    init_ray(ClusterConfig(num_cpus=os.cpu_count() or 2, temp_dir=tempfile.mkdtemp(prefix="rb-", dir="/tmp")),
             progress=False)
    with CorpusServer(pool_dir, faults=False, latency_s=args.latency_ms / 1000.0) as srv:
        urls = [srv.url + p for p in paths]
        cfg = DownloadConfig(allow_loopback=True, timeout_s=30.0, retries=0)
        list(ray_data_job(urls[-1:], cfg))           # Ray Data's one-off set-up is not a per-round cost
        t0 = time.perf_counter()
        pool = DownloadPool(cfg)
        start_s = time.perf_counter() - t0
        base, before, after, ok = [], [], [], [0, 0, 0]
        for r in range(args.rounds):
            chunk = [urls[(3 * r + i) * args.urls:(3 * r + i + 1) * args.urls] for i in range(3)]
            for i, (fn, times) in enumerate(((lambda u: [results_table(download_urls(u, cfg))], base),
                                             (lambda u: list(ray_data_job(u, cfg)), before),
                                             (lambda u: list(pool.download(u)), after))):
                t0 = time.perf_counter()
                ok[i] += _ok(fn(chunk[i]))
                times.append(time.perf_counter() - t0)
        pool.close()
    o = overhead_summary(before, after, base, start_s)
    if o["ratio"] is not None:
        ratio = f"ratio of means {o['ratio']:.1f}x"
    elif o["ratio_lower"] is not None:
        ratio = f"ratio of means >= {o['ratio_lower']:.1f}x (the pool's overhead is within 2 s.e. of 0)"
    else:
        ratio = "ratio undefined (the pool's overhead is not above 0)"
    print(f"retrieve rounds={args.rounds} urls/round={args.urls} latency_ms={args.latency_ms:g} "
          f"| in-process {mean(base):.2f} s/round | before (Ray Data job per round) {mean(before):.2f} s/round "
          f"| after (persistent pool) {mean(after):.2f} s/round + start {start_s:.2f} s once "
          f"| overhead/round (mean ± s.e., start spread over rounds) before {o['before']:.3f} ± "
          f"{o['before_se']:.3f} s, after {o['after']:.3f} ± {o['after_se']:.3f} s | {ratio} "
          f"| ok {ok[0]}/{ok[1]}/{ok[2]} of {args.rounds * args.urls} "
          f"| rounds before {' '.join(f'{t:.2f}' for t in before)} after {' '.join(f'{t:.2f}' for t in after)} "
          f"| load {Path('/proc/loadavg').read_text().split()[0] if Path('/proc/loadavg').exists() else 'n/a'}")

if __name__ == "__main__":
    main()
