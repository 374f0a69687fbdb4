"""The LAION aesthetic predictor: an MLP on L2-normalised CLIP image embeddings -> a 1-10 score.

The network has the shape of LAION's "improved aesthetic predictor" (``layers.0`` ... ``layers.7``:
dim -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between), so its published weights (for ViT-L/14,
dim 768) load into it unchanged from a safetensors file, or from a ``.pth`` state dict with
``torch.load(weights_only=True)``. Stable Diffusion 1.4 was trained on images scoring >= 5
(paper 3.1), which is why retrieval keeps only those.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CONFIG_FILE = "aesthetic_config.json"
WEIGHTS_FILE = "aesthetic.safetensors"
# The one name that asks for a random (seeded, calibrated) predictor: tests and demos only.
RANDOM = "random"
# Where the real predictor comes from (for ViT-L/14 image embeddings, as the paper used).
LAION_WEIGHTS_HINT = ("the LAION improved aesthetic predictor for ViT-L/14: sac+logos+ava1-l14-linearMSE.pth "
                      "from https://github.com/christophschuhmann/improved-aesthetic-predictor (a local "
                      "file, or a directory holding " + WEIGHTS_FILE + ")")
HIDDEN = (1024, 128, 64, 16)
# Where the random tiny predictor puts its scores: around the paper's threshold of 5, so that a
# threshold test drops a visible share of images (real weights need no calibration).
TINY_MEAN, TINY_STD = 5.0, 1.5


def build_mlp(dim: int):
    """The predictor network for embedding dimension ``dim`` (random weights)."""
    from torch import nn

    return nn.Sequential(nn.Linear(dim, HIDDEN[0]), nn.Dropout(0.2), nn.Linear(HIDDEN[0], HIDDEN[1]),
                         nn.Dropout(0.2), nn.Linear(HIDDEN[1], HIDDEN[2]), nn.Dropout(0.1),
                         nn.Linear(HIDDEN[2], HIDDEN[3]), nn.Linear(HIDDEN[3], 1))


def _random_module(dim: int, seed: int) -> Any:
    """A module whose ``layers`` attribute gives LAION's state-dict key names, seeded and calibrated."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):  # deterministic without touching the caller's RNG
        torch.manual_seed(seed)
        module = nn.Module()
        module.layers = build_mlp(dim)
    module.eval()
    _calibrate(module, dim, seed)
    return module


@dataclass
class AestheticPredictor:
    """Scores CLIP image embeddings.

    Attributes:
        module: the torch module (``layers`` = the MLP).
        dim: expected embedding dimension.
        source: where the weights came from (provenance).
    """

    module: Any
    dim: int
    source: str

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) embeddings -> (n,) float32 scores. Embeddings are re-normalised to be safe."""
        import torch

        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"aesthetic predictor expects (n, {self.dim}) embeddings, got {emb.shape}")
        if len(emb) == 0:
            return np.zeros(0, dtype=np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        with torch.no_grad():
            return self.module.layers(torch.from_numpy(emb)).squeeze(1).numpy().astype(np.float32)


def _calibrate(module: Any, dim: int, seed: int) -> None:
    """Rescale the last layer so random weights score random unit vectors ~ N(TINY_MEAN, TINY_STD)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    probe = torch.nn.functional.normalize(torch.randn(512, dim, generator=g), dim=1)
    with torch.no_grad():
        raw = module.layers(probe).squeeze(1)
        last = module.layers[-1]
        scale = TINY_STD / max(float(raw.std()), 1e-6)
        last.weight.mul_(scale)
        last.bias.mul_(scale).add_(TINY_MEAN - float(raw.mean()) * scale)


def write_tiny_aesthetic(out: str | Path, seed: int = 0, dim: int | None = None) -> Path:
    """Write a random-weight predictor for the tiny CLIP's embedding size (scores spread around 5)."""
    from safetensors.torch import save_file

    if dim is None:
        from raugment.models.clip import TINY_EMBED_DIM

        dim = TINY_EMBED_DIM
    module = _random_module(dim, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"dim": dim, "architecture": "laion-improved-aesthetic-mlp"}))
    return out


def _read_state(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # LAION publishes a .pth state dict; weights_only refuses pickled code (untrusted checkpoint).
    return torch.load(str(path), map_location="cpu", weights_only=True)


def check_aesthetic_ref(ref: str | None, key: str) -> None:
    """Before any work: ``key`` names real predictor weights that are there, or ``random`` by name.

    Unset is refused (it used to mean a random predictor, silently, at threshold 5); ``random``
    is allowed and logged as a warning here, on the driver, where a user sees it.

    Raises:
        ConfigError: naming ``key``, where to get the real weights and how to ask for ``random``.
    """
    from raugment.core.config import ConfigError

    if not ref:
        raise ConfigError(f"{key} is unset: set it to {LAION_WEIGHTS_HINT}; or {key}={RANDOM} for a random "
                          "predictor whose scores mean nothing (tests and demos only)")
    if ref == RANDOM:
        log.warning("%s=%s: a RANDOM aesthetic predictor scores the images; its scores and what it drops "
                    "mean nothing (tests and demos only). Use %s for a real study", key, RANDOM,
                    LAION_WEIGHTS_HINT)
        return
    p = Path(ref).expanduser()
    if not (p.is_file() or (p / WEIGHTS_FILE).is_file()):
        raise ConfigError(f"{key}: {ref!r} is neither a weights file nor a directory with {WEIGHTS_FILE}; "
                          f"point it at {LAION_WEIGHTS_HINT}")


def load_aesthetic(path: str | None, dim: int) -> AestheticPredictor:
    """Load the predictor.

    Args:
        path: a directory written by :func:`write_tiny_aesthetic`, a ``.safetensors`` file or a
            ``.pth`` state dict with LAION's key names. :data:`RANDOM` builds a random predictor
            calibrated to scores around 5 (tests and the offline demo only; logged as a warning).
        dim: the CLIP embedding dimension the scores are computed on.

    Raises:
        ValueError: ``path`` unset, missing, or not weights for ``dim``-d embeddings.
    """
    if not path:
        raise ValueError(f"no aesthetic predictor given: pass {LAION_WEIGHTS_HINT}, or {RANDOM!r} for a "
                         "random one (tests and demos only)")
    if path == RANDOM:
        log.warning("aesthetic predictor %r: a random predictor scores the images (its scores mean nothing)",
                    RANDOM)
        return AestheticPredictor(module=_random_module(dim, seed=0), dim=dim, source=RANDOM)
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise ValueError(f"aesthetic predictor weights not found at {path!r}")
    state = _read_state(p)
    w0 = state.get("layers.0.weight")
    if w0 is None:
        raise ValueError(f"{p} does not hold LAION aesthetic predictor weights (no layers.0.weight)")
    if w0.shape[1] != dim:
        raise ValueError(f"aesthetic predictor {p} expects {w0.shape[1]}-d CLIP embeddings, but the "
                         f"CLIP model gives {dim}-d; use the predictor made for that CLIP model")
    module = _random_module(dim, seed=0)
    module.load_state_dict(state)
    return AestheticPredictor(module=module, dim=dim, source=str(p))
