"""Dataset stage vs. a plain loop over the same ImageFolder (ratios in one run, one line of figures).

Workload: N ImageNet-sized JPEGs (500x375) in class folders. Two settings:

* ``resize``: ``max_side=256`` (decode, verify, resize, re-encode every image);
* ``keep``: no resize, JPEG in and out (raugment keeps the verified original bytes).

The plain loop is what one would write by hand: for each file, read, decode with PIL, resize,
encode, collect rows, write one Parquet file. raugment does the same work through the stage
(planning, sharded writes, thread pool of ``read_threads``, stats, resume bookkeeping).

Each setting is repeated ``--repeats`` times, plain loop and stage back to back (each stage run in a
fresh ``run.root``: a complete key would be skipped), and the medians are printed: the median
img/s of each and the median of the per-repeat ratios (a pair shares the machine's load of that
moment). One 12 s run of 400 images gave ratios that moved by tens of percent between runs on a
shared 2-core machine; 800 images x 7 repeats takes ~2 min.

Usage: ``python benchmarks/dataset.py [--images 800] [--repeats 7] [--threads 4]``
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raugment.config import load_config
from raugment.stages.dataset import stage as dataset


def make_tree(root: Path, n: int, classes: int = 4) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), float)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        split = "test" if i % 10 == 0 else "train"
        folder = root / split / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def plain_loop(root: Path, out: Path, max_side: int | None) -> int:
    rows = []
    for path in sorted(root.rglob("*.jpg")):
        img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        if max_side and max(img.size) > max_side:
            s = max_side / max(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        rows.append({"path": str(path), "image": buf.getvalue(), "width": img.width, "height": img.height})
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(rows)


def paired_medians(plain_s: list[float], stage_s: list[float], images: int) -> dict[str, float]:
    """Median img/s of each side and the median of the per-repeat ratios (plain time / stage time)."""
    if len(plain_s) != len(stage_s) or not plain_s or min(plain_s + stage_s) <= 0:
        raise ValueError("paired_medians needs as many (> 0 s) plain as stage timings, at least one")
    return {"plain_img_s": median(images / t for t in plain_s), "stage_img_s": median(images / t for t in stage_s),
            "ratio": median(p / t for p, t in zip(plain_s, stage_s)),
            "ratio_min": min(p / t for p, t in zip(plain_s, stage_s)),
            "ratio_max": max(p / t for p, t in zip(plain_s, stage_s))}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        root = Path(tmp) / "tree"
        make_tree(root, args.images)
        figures = []
        for label, max_side in (("resize", 256), ("keep", None)):
            plain_s, stage_s = [], []
            for r in range(args.repeats):
                plain_s.append(timed(lambda label=label, max_side=max_side:
                                     plain_loop(root, Path(tmp) / f"plain-{label}.parquet", max_side)))
                cfg = load_config(None, [f"run.root={tmp}/runs-{label}-{r}", "run.progress=false",
                                         "dataset.source=imagefolder", f"dataset.path={root}",
                                         "dataset.protocol=full", f"dataset.read_threads={args.threads}",
                                         f"dataset.max_side={max_side if max_side else 'null'}"])
                stage_s.append(timed(lambda cfg=cfg: dataset.run(cfg)))
            m = paired_medians(plain_s, stage_s, args.images)
            figures.append(f"{label}: plain {m['plain_img_s']:.0f} img/s, raugment {m['stage_img_s']:.0f} img/s, "
                           f"ratio {m['ratio']:.2f}x (range {m['ratio_min']:.2f}-{m['ratio_max']:.2f})")
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"
    print(f"dataset: {args.images} JPEG 500x375, medians of {args.repeats} repeats, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load {load}; " + "; ".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
