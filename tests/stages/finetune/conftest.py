"""Fixtures of the fine-tuning tests (the stage's and its methods')."""

from __future__ import annotations

import pytest


@pytest.fixture()
def comps(tiny_sd):
    """The tiny SD bundle's components, fresh per test (training changes them in place)."""
    from raugment.models.diffusion import load_components

    return load_components(str(tiny_sd))


@pytest.fixture()
def one_thread():
    """Two intra-op threads on a loaded 2-core box spin against each other (measured ~100x slower
    per step at load 15); one thread keeps tiny training steps at tens of milliseconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
