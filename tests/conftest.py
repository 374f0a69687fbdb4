"""Shared fixtures: offline environment, one session Ray cluster, tiny models, demo data.

Tests that need Ray take ``ray_session``; it starts one local cluster with this machine's real CPU
count (2 here), so a resource default that would hang on 2 CPUs hangs here too (and the
pytest-timeout turns that into a failure).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole session, sized like the machine."""
    import ray

    from raugment.core.config import ClusterConfig
    from raugment.runtime.cluster import init_ray

    # AF_UNIX socket paths must stay short: keep the temp dir near /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    # Functions and classes defined in test modules (package ``tests``) are pickled by reference:
    # put the repository on the workers' path so they can import them.
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    init_ray(ClusterConfig(num_cpus=os.cpu_count() or 2, temp_dir=temp_dir), progress=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_sd(session_dir) -> Path:
    """The tiny random-weight Stable Diffusion bundle (written once per session)."""
    from raugment.demo.tiny import write_tiny_bundles

    return write_tiny_bundles(session_dir / "models", parts=["sd"])["sd"]


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory):
    """The demo's mini-world and its trained small CLIP (``raugment.demo.miniworld.train_mini``), once per
    session: the demo's ``mini`` settings, without the diffusion model (its tests train their own).

    Returns ``(config, root, MiniModels)``.
    """
    from raugment.core.config import with_overrides
    from raugment.demo import command as demo
    from raugment.demo.miniworld import train_mini

    root = tmp_path_factory.mktemp("mini")
    cfg = with_overrides(demo.build_config(None, None, str(root / "runs")), {"mini.diffusion": False})
    return cfg, root, train_mini(root, cfg)


@pytest.fixture
def tripwire(monkeypatch):
    """Ray must not start: its start-up raises :class:`tests.helpers.studies.RayStarted`."""
    import ray

    from tests.helpers.studies import RayStarted

    def refuse(*_a, **_k):
        raise RayStarted("Ray would start here")

    monkeypatch.setattr("raugment.runtime.cluster.init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def one_thread():
    """Two intra-op threads on a loaded 2-core box spin against each other; one keeps it fast."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
