"""Classifier architectures by name, and the classifier bundle (``config.json`` + ``model.safetensors``).

``registry.MODELS`` maps a name to a builder ``(num_classes) -> nn.Module``: ``resnet50`` (the
paper's classifier, torchvision, trained from scratch), ``resnet18`` and ``tiny_cnn`` (a few
thousand parameters; learns the synthetic demo data in seconds on CPU). A bundle is what the train
stage keeps (its best-validation weights) and what ``raugment models tiny`` writes as part
"classifier": both load through :func:`load_classifier`, which reads safetensors only (never
pickle).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raugment.core.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

MODELS: Registry = Registry("classifier model")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BUNDLE_FORMAT = "raugment-classifier/1"


@MODELS.register("resnet50")
def resnet50(num_classes: int) -> torch.nn.Module:
    """torchvision ResNet-50 with random weights (the paper trains from scratch)."""
    from torchvision.models import resnet50 as build

    return build(weights=None, num_classes=num_classes)


@MODELS.register("resnet18")
def resnet18(num_classes: int) -> torch.nn.Module:
    """torchvision ResNet-18 with random weights."""
    from torchvision.models import resnet18 as build

    return build(weights=None, num_classes=num_classes)


@MODELS.register("tiny_cnn")
def tiny_cnn(num_classes: int, width: int = 16) -> torch.nn.Module:
    """Three conv blocks + global pooling: enough for shapes x colours at 32 px, cheap on CPU."""
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
    )


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    """The registered architecture ``name`` with ``num_classes`` outputs.

    Raises:
        ValueError: unknown name (listing the known ones) or ``num_classes < 1``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS.get(name)(num_classes)


def save_classifier_state(state: dict[str, torch.Tensor], name: str, num_classes: int,
                          out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a state dict as a bundle directory loadable by :func:`load_classifier`.

    Args:
        state: the weights (keys must match ``build_model(name, num_classes)``; unwrap DDP first).
        name: the architecture's registry name.
        num_classes: its number of outputs.
        out: the bundle directory (created).
        extra: more JSON-able fields for ``config.json`` (e.g. class names, image size).
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared/non-contiguous storage; a detached contiguous copy is always safe.
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    meta = {"format": BUNDLE_FORMAT, "model": name, "num_classes": int(num_classes), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def save_classifier(model: torch.nn.Module, name: str, num_classes: int, out: str | Path,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights as a bundle (see :func:`save_classifier_state`)."""
    return save_classifier_state(model.state_dict(), name, num_classes, out, extra)


def read_bundle_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a classifier bundle, checked for the fields loading needs."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise ValueError(f"{path} is not a classifier bundle: {CONFIG_FILE} is missing")
    meta = json.loads(p.read_text())
    for key in ("model", "num_classes"):
        if key not in meta:
            raise ValueError(f"{p} lacks {key!r}; re-write the bundle with save_classifier")
    return meta


def load_classifier(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Build the bundle's architecture and load its safetensors weights (strict), in eval mode."""
    from safetensors.torch import load_file

    meta = read_bundle_config(path)
    model = build_model(meta["model"], int(meta["num_classes"]))
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE), device="cpu"), strict=True)
    return model.to(device).eval()


def write_tiny_classifier(out: str | Path, seed: int = 0, num_classes: int = 4) -> Path:
    """A random-weight ``tiny_cnn`` bundle (part "classifier" of ``raugment models tiny``)."""
    import torch

    torch.manual_seed(seed)
    model = build_model("tiny_cnn", num_classes)
    return save_classifier(model, "tiny_cnn", num_classes, out, extra={"image_size": 32})
