"""Fixtures of the study tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fake_stages(monkeypatch):
    """``use(stages)``: the executor runs every node through ``stages`` (stand-ins of the stage
    modules, e.g. ``tests.study.test_study.FakeStages``), with no Ray and no per-stage preflight."""
    from raugment.study import executor as study
    from raugment.study.planner import DatasetSize

    monkeypatch.setattr(study, "measured_size", lambda art: DatasetSize(2, 6, 3, measured=True))
    monkeypatch.setattr("raugment.runtime.cluster.init_ray", lambda *a, **k: None)
    monkeypatch.setattr(study, "check_node", lambda node: None)  # stand-ins take any config

    def use(stages):
        monkeypatch.setattr(study, "run_node", stages)
        return stages
    return use
