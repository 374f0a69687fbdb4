"""The contract of every registered filter (one parametrised case per name).

A new filter module gets these checks for free; its own test module
(``tests/stages/filter/filters/test_<name>.py``) provides ``contract_settings(models) -> dict``,
the ``filter`` keys that build it with the tiny models (``sd``, ``clip``, ``aesthetic``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raugment.core import schema as S
from raugment.stages.filter import stage as F
from raugment.stages.filter.config import FilterConfig
from raugment.stages.filter.filters import FILTERS, Filter, FilterContext, FilterOutcome, threshold_pass
from tests.helpers.planted import draw, png, row
from tests.helpers.plugin_contract import generic_checks, plugin_test_module

NAMES = FILTERS.names()
PACKAGE = "raugment.stages.filter.filters"


def test_the_registry_finds_every_filter():
    assert {"min_size", "nsfw", "aesthetic", "clip_similarity"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_generic_contract(name):
    generic_checks(FILTERS, PACKAGE, "filter", FilterConfig, Filter, name)


@pytest.mark.parametrize("name", NAMES)
def test_judges_every_row_of_a_batch(name, tiny_models, filter_config):
    """Built from a config (check and resolve pass), it answers one flag and one score per row."""
    cfg = filter_config(filters=[name], **plugin_test_module("tests.stages.filter.filters", name)
                        .contract_settings(tiny_models))
    section = F.resolve_config(cfg)
    images = [draw(i, size) for i, size in enumerate((48, 64, 24, 40, 56))] + [Image.new("RGB", (33, 40))]
    batch = S.to_table([row(f"r{i}", png(im), label=i % 2) for i, im in enumerate(images)])
    judge = FILTERS.get(name)(section, FilterContext(section))
    out = judge(images, batch)
    assert isinstance(out, FilterOutcome)
    assert out.passed.dtype == np.bool_ and out.passed.shape == (len(images),)
    assert out.scores.dtype == np.float32 and out.scores.shape == (len(images),)
    if out.column is not None:      # a stored score goes to a float column of the images table
        assert pa.types.is_floating(S.IMAGES.field(out.column).type)
    again = judge(images, batch)
    assert again.passed.tolist() == out.passed.tolist()
    np.testing.assert_allclose(again.scores, out.scores, rtol=1e-5)
    # the stage can use it: every row is either kept or dropped for this filter
    kept, dropped = F.split_batch(F.filter_batch(batch, [(name, judge)]))
    assert kept.num_rows + dropped.num_rows == len(images)
    assert set(dropped.column(S.REASON).to_pylist()) <= {name}


# ---- helpers several filters share ------------------------------------------------------------

def test_threshold_pass():
    assert threshold_pass(np.array([5.0, 4.9, np.nan]), 5.0).tolist() == [True, False, False]
    assert threshold_pass(np.array([-1.0, np.nan]), None).tolist() == [True, True]
