"""CLIP image/text encoders for retrieval, CLIP filters and aesthetic scoring.

One loading path for everything: :func:`load_clip` takes an open_clip model name with a pretrained
tag (``"ViT-L-14"``, ``"openai"`` — downloads on a networked machine) or a local directory in
open_clip's ``local-dir:`` layout (``open_clip_config.json`` + ``open_clip_model.safetensors``), which
is what :func:`write_tiny_clip` and :func:`save_clip` write. Embeddings are float32 and
L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raugment.core.extras import require

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"

# A tiny ViT + text transformer: CLIP's real 49,408-token BPE vocabulary, everything else small.
TINY_EMBED_DIM = 32
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _model_ref(name: str) -> str:
    """An existing directory becomes open_clip's ``local-dir:`` reference; anything else is kept."""
    if name.startswith(LOCAL_DIR) or name.startswith("hf-hub:"):
        return name
    p = Path(name)
    if p.is_dir():
        if not (p / CONFIG_FILE).is_file():
            raise ValueError(f"{p} is not an open_clip model directory (no {CONFIG_FILE}); "
                             "write one with `raugment models tiny DIR` or point to a model name")
        return LOCAL_DIR + str(p.resolve())
    return name


@dataclass
class ClipEncoder:
    """A loaded CLIP model with its preprocessing and tokenizer.

    Attributes:
        model: the open_clip model (eval mode).
        preprocess: PIL image -> tensor transform of the model.
        tokenizer: list[str] -> token tensor.
        device: where the model lives.
        name: the reference it was loaded from (recorded as provenance).
    """

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    name: str

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        proj = getattr(self.model.visual, "proj", None)
        if proj is not None:
            return int(proj.shape[1])
        return int(self.model.visual.output_dim)

    def embed_images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """PIL images -> (n, dim) float32, L2-normalised."""
        import torch

        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk]).to(self.device)
            with torch.no_grad():
                out.append(self.model.encode_image(x, normalize=True).float().cpu().numpy())
        return _stack(out, self.dim)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> (n, dim) float32, L2-normalised."""
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            with torch.no_grad():
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return _stack(out, self.dim)


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32))


def load_clip(name: str, pretrained: str | None = None, device: str = "cpu") -> ClipEncoder:
    """Load a CLIP model by open_clip name + pretrained tag, or from a local directory.

    Args:
        name: ``"ViT-L-14"`` (with ``pretrained="openai"``), ``"hf-hub:org/repo"``, a directory
            written by :func:`write_tiny_clip` / :func:`save_clip`, or ``"local-dir:<dir>"``.
        pretrained: open_clip pretrained tag or checkpoint file; ignored for directories.
        device: ``"cpu"``, ``"cuda"``, or ``"auto"``.
    """
    open_clip = require("open_clip")
    from raugment.runtime.cluster import pick_device

    device = pick_device(device)
    ref = _model_ref(name)
    model, _, preprocess = open_clip.create_model_and_transforms(
        ref, pretrained=None if ref.startswith(LOCAL_DIR) else pretrained, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(ref)
    return ClipEncoder(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device, name=name)


def build_clip_model(model_cfg: dict[str, Any], seed: int = 0):
    """A random-weight open_clip ``CLIP`` from a model config (used by the tiny writer and training)."""
    import torch

    open_clip = require("open_clip")
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**model_cfg)


def save_clip(model: Any, model_cfg: dict[str, Any], out: str | Path) -> Path:
    """Save an open_clip model in the ``local-dir:`` layout that :func:`load_clip` reads."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = model_cfg["vision_cfg"]["image_size"]
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"size": size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    return out


def write_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight CLIP (ViT + text transformer) in open_clip's local-dir layout."""
    model = build_clip_model(TINY_MODEL_CFG, seed=seed)
    path = save_clip(model, TINY_MODEL_CFG, out)
    log.info("wrote tiny CLIP (dim %d) to %s", TINY_EMBED_DIM, path)
    return path


def read_model_cfg(path: str | Path) -> dict[str, Any]:
    """The ``model_cfg`` of a local CLIP directory."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())["model_cfg"]
