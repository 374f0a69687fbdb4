"""Fixtures of the filter tests: the tiny model bundles the filters load."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(session_dir) -> dict[str, Path]:
    """Tiny random-weight bundles (written once per session): ``sd`` (with its safety checker),
    ``clip`` and ``aesthetic`` (a predictor for the tiny CLIP's embedding size)."""
    from raugment.demo.tiny import write_tiny_bundles

    return write_tiny_bundles(session_dir / "models", parts=["sd", "clip", "aesthetic"])


@pytest.fixture
def filter_config(tiny_models):
    """``make(**filter_keys) -> Config`` whose ``filter`` section uses the tiny CLIP on the CPU."""
    from raugment.config import from_dict

    def make(**keys):
        return from_dict({"filter": {"clip_model": str(tiny_models["clip"]), "clip_pretrained": None,
                                     "device": "cpu", **keys}})

    return make
