"""faiss index build rate on one core: the study planner's cost of the ``index`` stage.

The ``index`` stage trains and fills a faiss index over CLIP embeddings (``index.index_type``,
e.g. the ImageNet preset's ``IVF65536,PQ64`` over LAION's ViT-L/14 vectors, d = 768). Its cost
is dominated by comparing vectors with the ``nlist`` coarse centroids: k-means training (on at
most ``MAX_POINTS_PER_CENTROID x nlist`` vectors: faiss subsamples the rest) and the assignment
of every added vector. So the model the planner uses (:func:`raugment.study.planner.index_cost`) is,
in CPU-seconds of one core::

    train = min(N, 256 * nlist) * nlist * train_s_per_vector_list
    add   = N * (s_per_vector + nlist * s_per_vector_list)

This benchmark measures the three constants on this machine, in CPU seconds of this process with
faiss on one thread, on clustered random d = 768 vectors: ``IVF<nlist>,Flat`` trained and filled at
two ``nlist`` values, fitted by the line through the two points. A PQ encoder (``IVF..,PQ64``) adds
its own training (64 k-means of 256 centroids: a fixed cost per index, not per vector; measured
here at ~100 CPU-s even on 2,000 vectors, so left out of this benchmark) and a per-vector encoding
of 64 x 256 x 12-d distances, small beside the coarse assignment at the lists a large index has;
both are left out of the model. It prints one JSON line; the planner's ``INDEX_RATE`` keeps the
figures with the date and machine they came from.

Usage: ``python benchmarks/index_build.py [--train 20000] [--add 20000] [--nlist 256 1024]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

DIM = 768
MAX_POINTS_PER_CENTROID = 256  # faiss ClusteringParameters default: the training subsample cap


def clustered(n: int, dim: int, seed: int, centres: int = 2000) -> np.ndarray:
    """``n`` L2-normalised vectors around ``centres`` random directions (CLIP-like clumps)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def measure(index_type: str, train: np.ndarray, add: np.ndarray) -> tuple[float, float]:
    """(train CPU s, add CPU s) of an inner-product ``index_type``, faiss on one thread."""
    import faiss

    index = faiss.index_factory(train.shape[1], index_type, faiss.METRIC_INNER_PRODUCT)
    t0 = time.process_time()
    index.train(train)
    t1 = time.process_time()
    index.add(add)
    t2 = time.process_time()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> dict:
    import faiss

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=20_000)
    p.add_argument("--add", type=int, default=20_000)
    p.add_argument("--nlist", type=int, nargs=2, default=[256, 1024])
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    train, add = clustered(args.train, DIM, 0), clustered(args.add, DIM, 1)
    points = {}
    for nlist in args.nlist:
        t_train, t_add = measure(f"IVF{nlist},Flat", train, add)
        points[nlist] = {"train_s": round(t_train, 4), "add_s": round(t_add, 4)}
    (n1, n2) = args.nlist
    add1, add2 = points[n1]["add_s"] / args.add, points[n2]["add_s"] / args.add
    per_list = max(0.0, (add2 - add1) / (n2 - n1))
    per_vector = max(0.0, add1 - per_list * n1)
    train_rate = float(np.mean([points[n]["train_s"] / (min(args.train, MAX_POINTS_PER_CENTROID * n) * n)
                                for n in args.nlist]))
    out = {"benchmark": "index_build", "dim": DIM, "train": args.train, "add": args.add,
           "faiss": faiss.__version__, "threads": 1, "points": points,
           "index.cpu_s_per_vector": per_vector, "index.cpu_s_per_vector_list": per_list,
           "index.train_cpu_s_per_vector_list": train_rate,
           "loadavg": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
