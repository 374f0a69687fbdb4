import math
import statistics

import pytest

from raugment.core.stats import format_mean_se, mean_se, summarize, summarize_runs


def test_mean_se_over_five_runs_matches_textbook_formula():
    runs = [0.572, 0.569, 0.575, 0.571, 0.573]
    mean, se = mean_se(runs)
    assert mean == pytest.approx(statistics.fmean(runs))
    assert se == pytest.approx(statistics.stdev(runs) / math.sqrt(5))
    assert se > 0


def test_single_run_has_no_standard_error_and_empty_is_refused():
    mean, se = mean_se([0.6])
    assert mean == 0.6 and math.isnan(se)
    assert summarize([0.6])["se"] is None
    with pytest.raises(ValueError, match="at least one"):
        mean_se([])
    with pytest.raises(ValueError, match="NaN"):
        mean_se([0.5, float("nan")])


def test_summarize_runs_skips_missing_metrics_and_formats_percent():
    runs = [{"test_top1": 0.60, "test_top5": None}, {"test_top1": 0.62, "test_top5": 0.9}]
    out = summarize_runs(runs, ["test_top1", "test_top5", "absent"])
    assert out["test_top1"]["n"] == 2 and out["test_top5"]["n"] == 1 and "absent" not in out
    assert out["test_top1"]["min"] == 0.60 and out["test_top1"]["max"] == 0.62
    assert format_mean_se(0.572, 0.002) == "57.2 ± 0.2"
    assert format_mean_se(0.572, None) == "57.2"
