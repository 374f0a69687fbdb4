"""Fixtures of the generation tests (the stage's and its methods')."""

from __future__ import annotations

import pytest

from raugment.core.storage import Artifact
from tests.helpers.generation import make_generate_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Artifact:
    """A dataset artifact as the dataset stage writes it: classes table + train images."""
    return make_generate_dataset(tmp_path_factory.mktemp("gen-data"))
