"""The ``min_size`` filter: the shorter side against ``filter.min_side``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raugment.config import from_dict
from raugment.core import schema as S
from raugment.core.config import ConfigError
from raugment.stages.filter.filters import FilterContext
from raugment.stages.filter.filters.min_size import MinSizeFilter, min_size_scores
from tests.helpers.planted import png, row


def contract_settings(models: dict) -> dict:
    """``filter`` keys the registry contract test builds this filter with."""
    return {"min_side": 32}


def test_min_size_scores_are_the_shorter_side():
    assert min_size_scores([64, 20, 50], [30, 64, 50]).tolist() == [30, 20, 50]


def test_drops_exactly_the_images_below_min_side():
    section = from_dict({"filter": {"filters": ["min_size"], "min_side": 32}}).filter
    images = [Image.new("RGB", size) for size in ((64, 31), (32, 32), (20, 64), (50, 40))]
    batch = S.to_table([row(f"r{i}", png(im)) for i, im in enumerate(images)])
    out = MinSizeFilter(section, FilterContext(section))(images, batch)
    assert out.passed.tolist() == [False, True, False, True]
    assert out.scores.tolist() == [31, 32, 20, 40] and out.scores.dtype == np.float32
    assert out.column is None   # the shorter side is not a column of the images table


def test_min_side_must_be_positive():
    with pytest.raises(ConfigError, match=r"filter\.min_side must be > 0"):
        from_dict({"filter": {"min_side": 0}})
