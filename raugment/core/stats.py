"""Summary statistics for repeated runs: mean and standard error of the mean (the paper's error bars).

The paper reports every accuracy as mean ± standard error over five runs (five resampled augmented
sets). The standard error here is the sample standard deviation (``ddof=1``) divided by ``sqrt(n)``;
with a single run it is undefined and returned as NaN, never as a misleading 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


def round_half_up(x: float) -> int:
    """``round`` without banker's rounding: 12.5 -> 13 (``fraction * n`` and ``n * ratio / 100`` are
    often exactly .5). The epsilon absorbs float noise such as 0.35 * 10 = 3.4999999999999996."""
    return math.floor(x + 0.5 + 1e-9)


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean of ``values``.

    Args:
        values: one figure per run (e.g. test top-1 of each resampled set).

    Returns:
        ``(mean, se)`` with ``se = stdev(ddof=1) / sqrt(n)``; ``se`` is NaN when n == 1.

    Raises:
        ValueError: if ``values`` is empty or holds a NaN.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_se needs at least one value")
    if any(math.isnan(x) for x in xs):
        raise ValueError(f"mean_se got a NaN among {xs}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "se", "n", "min", "max"}`` of ``values``; ``se`` is None for a single value.

    None instead of NaN keeps the result valid JSON for ``results.json`` and the report.
    """
    mean, se = mean_se(values)
    return {"mean": mean, "se": None if math.isnan(se) else se, "n": len(values),
            "min": float(min(values)), "max": float(max(values))}


def summarize_runs(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, dict]:
    """Per-metric :func:`summarize` over a list of run results (dicts of metric -> value)."""
    out = {}
    for key in keys:
        values = [float(r[key]) for r in runs if r.get(key) is not None]
        if values:
            out[key] = summarize(values)
    return out


def format_mean_se(mean: float, se: float | None, digits: int = 1, scale: float = 100.0) -> str:
    """``"57.2 ± 0.2"`` (accuracies are stored as fractions and shown in percent by default)."""
    if se is None or math.isnan(se):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"
