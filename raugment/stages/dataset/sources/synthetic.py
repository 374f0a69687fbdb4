"""``synthetic`` source: the embedded demo dataset, procedurally drawn coloured shapes a small CNN learns in seconds.

Each class is a "<colour> <shape>" pair ("red circle", "blue square", ...), drawn at a random
position, size and rotation, with colour jitter, on a noisy tinted background. The first eight
classes differ in both colour and shape (easy), later ones reuse colours with other shapes, so a
model has to look at shape too. The names are real phrases, usable in prompts and captions.

:func:`draw` is pure: the same ``rng`` state gives the same image. The retrieval demo pool draws
its captioned images (targets and distractors) with :func:`draw_named` from the same code.
:func:`write_imagefolder` writes ``train/<NNN.class>/*.png`` and ``test/<NNN.class>/*.png`` so the
synthetic source is read through the same ImageFolder path as real data: the source draws that
folder under ``<run.root>/synthetic/<key>/`` once (key: the ``dataset.synthetic`` subsection and
``dataset.seed``), then lists it as the ``imagefolder`` source does. It needs no ``dataset.path``.

Keys (section ``dataset``, declared by :class:`Settings`): the ``synthetic`` subsection
(:class:`SyntheticConfig`). The demo (its mini-world and captioned pool) draws with the same code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from raugment.core.config import ConfigError, PluginSettings, at_most, positive, to_dict
from raugment.stages.dataset.sources import DATASETS, DatasetSource, Listing
from raugment.stages.dataset.sources.imagefolder import list_imagefolder

if TYPE_CHECKING:
    from raugment.core.storage import StageRun
    from raugment.stages.dataset.config import DatasetConfig

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 225),
    "green": (40, 170, 60),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "pink": (245, 125, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")

# Diagonal first (colour and shape both distinct), then each colour with another shape.
SYNTHETIC_CLASSES: list[str] = [
    *(f"{c} {s}" for c, s in zip(COLOURS, SHAPES)),
    *(f"{c} {SHAPES[(i + 1) % len(SHAPES)]}" for i, c in enumerate(COLOURS)),
]


MAX_SYNTHETIC_SIDE = 1024
MAX_SYNTHETIC_IMAGES = 100_000


@dataclass
class SyntheticConfig:
    """The embedded demo dataset (subsection ``dataset.synthetic``): coloured shapes a small CNN can learn.

    Classes are the first ``num_classes`` of :data:`SYNTHETIC_CLASSES` ("red circle", ...).
    """

    num_classes: int = 4
    train_per_class: int = 60
    test_per_class: int = 20
    size: int = 32
    imbalance: float = 0.0  # 0 = balanced; 0.5 = last class has half the images of the first

    def validate(self, key: str) -> None:
        positive(self.num_classes, f"{key}.num_classes")
        positive(self.train_per_class, f"{key}.train_per_class")
        if self.test_per_class < 0:
            raise ConfigError(f"{key}.test_per_class must be >= 0, got {self.test_per_class}")
        at_most(self.num_classes, len(SYNTHETIC_CLASSES), f"{key}.num_classes",
                "the number of coloured-shape classes defined")
        if self.size < 8:
            raise ConfigError(f"{key}.size must be >= 8 pixels, got {self.size}")
        # Each image is drawn at 4x the side and held in memory: 30000 px is ~14 GB of mask per
        # image; a demo dataset needs tens of pixels, and real data comes through imagefolder/parquet.
        at_most(self.size, MAX_SYNTHETIC_SIDE, f"{key}.size", "pixels per side of a drawn demo image; use "
                "dataset.source=imagefolder or parquet for real data")
        at_most(self.train_per_class + self.test_per_class, MAX_SYNTHETIC_IMAGES,
                f"{key}.train_per_class + {key}.test_per_class",
                "images drawn per class of the demo dataset")
        if not 0 <= self.imbalance < 1:
            raise ConfigError(f"{key}.imbalance must be in [0, 1), got {self.imbalance}")


@dataclass
class Settings(PluginSettings):
    """Keys of the ``synthetic`` source (section ``dataset``)."""

    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


_SUPERSAMPLE = 4      # draw the mask at 4x and downscale: anti-aliased edges at 32 px
_COLOUR_JITTER = 25   # per-channel jitter of the shape colour
_NOISE_SIGMA = 10.0   # pixel noise over the whole image


def folder_name(class_index: int) -> str:
    """Caltech256-style class folder, ``0`` -> ``"000.red_circle"``.

    The numeric prefix makes sorted folder order equal class order (so labels follow
    :data:`SYNTHETIC_CLASSES`); ``classnames.folder_class_name`` maps it back to ``"red circle"``.
    """
    return f"{class_index:03d}.{SYNTHETIC_CLASSES[class_index].replace(' ', '_')}"


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of ``shape`` around the origin (before rotation)."""
    def regular(n: int, r: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "square":
        return regular(4, 1.0, math.pi / 4)
    if shape == "triangle":
        return regular(3, 1.0, -math.pi / 2)
    if shape == "hexagon":
        return regular(6)
    if shape == "diamond":
        return [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    if shape == "star":
        outer, inner = regular(5, 1.0, -math.pi / 2), regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = 0.32, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    """Anti-aliased coverage mask (mode "L", ``size`` x ``size``) of one shape."""
    s = size * _SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    x, y, r = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, radius * _SUPERSAMPLE
    if shape in ("circle", "ring"):
        d.ellipse((x - r, y - r, x + r, y + r), fill=255)
        if shape == "ring":
            ri = 0.55 * r
            d.ellipse((x - ri, y - ri, x + ri, y + ri), fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        pts = [(x + r * (px * cos - py * sin), y + r * (px * sin + py * cos)) for px, py in _polygon(shape)]
        d.polygon(pts, fill=255)
    return mask.resize((size, size), Image.Resampling.BOX)


def draw_named(name: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Draw one image of ``"<colour> <shape>"`` (any colour of :data:`COLOURS`, shape of :data:`SHAPES`).

    Args:
        name: e.g. ``"green star"``; combinations outside :data:`SYNTHETIC_CLASSES` work too
            (distractors for a retrieval pool).
        rng: the only source of randomness; draws happen in a fixed order.
        size: side of the square RGB image in pixels.

    Raises:
        ValueError: for an unknown colour or shape, or ``size`` < 8.
    """
    colour, _, shape = name.partition(" ")
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"{name!r} is not '<colour> <shape>' with colour in {list(COLOURS)} "
                         f"and shape in {list(SHAPES)}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    fg = np.clip(np.array(COLOURS[colour], float) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
    # Desaturated background: a grey level, a small tint and a linear gradient.
    grey = rng.uniform(50, 200)
    tint = rng.uniform(-20, 20, 3)
    gx, gy = rng.uniform(-30, 30, 2)
    ramp = np.linspace(-0.5, 0.5, size)
    bg = grey + tint[None, None, :] + (gx * ramp[None, :, None] + gy * ramp[:, None, None])
    radius = size * rng.uniform(0.2, 0.38)
    cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
    angle = rng.uniform(0, 2 * math.pi)
    alpha = np.asarray(_shape_mask(shape, size, cx, cy, radius, angle), float)[:, :, None] / 255.0
    img = alpha * fg[None, None, :] + (1 - alpha) * bg
    img += rng.normal(0.0, _NOISE_SIGMA, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def draw(class_index: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Draw one image of class ``SYNTHETIC_CLASSES[class_index]`` (pure: depends only on ``rng``)."""
    if not 0 <= class_index < len(SYNTHETIC_CLASSES):
        raise ValueError(f"class_index must be in [0, {len(SYNTHETIC_CLASSES)}), got {class_index}")
    return draw_named(SYNTHETIC_CLASSES[class_index], rng, size)


def class_sizes(cfg: SyntheticConfig) -> list[int]:
    """Train images per class: linear falloff from ``train_per_class`` to ``(1 - imbalance)`` of it."""
    n = cfg.num_classes
    return [max(1, round(cfg.train_per_class * (1 - cfg.imbalance * i / max(1, n - 1)))) for i in range(n)]


def check_config(cfg: SyntheticConfig, key: str = "dataset.synthetic") -> None:
    """Raise :class:`ConfigError` naming the key if ``cfg`` cannot be drawn.

    Runs the section's own validation too, for configs built in code rather than loaded.
    """
    cfg.validate(key)
    if cfg.num_classes > len(SYNTHETIC_CLASSES):
        raise ConfigError(f"{key}.num_classes must be in [1, {len(SYNTHETIC_CLASSES)}], got {cfg.num_classes}")


def write_imagefolder(out: str | Path, cfg: SyntheticConfig, seed: int = 0) -> Path:
    """Write ``out/train/<folder>/NNNNN.png`` and ``out/test/<folder>/NNNNN.png`` (see :func:`folder_name`).

    Every (split, class) has its own generator seeded by ``(seed, split, class)``, so changing the
    number of classes or images leaves the other images unchanged. The test split is balanced
    (like ImageNet's val); the train split follows :func:`class_sizes`.

    Returns:
        ``out`` as a Path.
    """
    check_config(cfg)
    out = Path(out)
    counts = {"train": class_sizes(cfg), "test": [cfg.test_per_class] * cfg.num_classes}
    for split_code, (split, per_class) in enumerate(counts.items()):
        for label, n in enumerate(per_class):
            if n == 0:
                continue
            folder = out / split / folder_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(split_images(label, n, split_code, cfg.size, seed)):
                img.save(folder / f"{i:05d}.png")
    return out


def split_images(label: int, n: int, split_code: int, size: int, seed: int = 0) -> list[Image.Image]:
    """The first ``n`` images of class ``label`` in split ``split_code`` (0 train, 1 test), as written.

    :func:`write_imagefolder` writes exactly these, so other code (the mini-world's near-duplicates
    of test images) can redraw a split's images without reading the dataset.
    """
    rng = np.random.default_rng([seed, split_code, label])
    return [draw(label, rng, size) for _ in range(n)]


def list_synthetic(cfg: DatasetConfig, run_root: Path) -> Listing:
    """Draw the synthetic ImageFolder under ``<run_root>/synthetic/<key>/`` (once), then list it."""
    from raugment.core.storage import run_stage

    syn = Settings.of(cfg).synthetic
    check_config(syn)
    section = {"synthetic": to_dict(syn), "seed": cfg.seed}

    def body(run: StageRun) -> None:
        write_imagefolder(run.path / "imagefolder", syn, seed=cfg.seed)
        run.stats.add("train", sum(class_sizes(syn)))
        run.stats.add("test", syn.test_per_class * syn.num_classes)

    art = run_stage(run_root, "synthetic", section, None, body)
    folder = dataclasses.replace(cfg, path=str(art.path / "imagefolder"), test_path=None)
    return list_imagefolder(folder, run_root)


@DATASETS.register("synthetic")
class SyntheticSource(DatasetSource):
    """Draws the demo dataset of ``dataset.synthetic`` (no ``dataset.path``)."""

    settings = Settings
    needs_path = False

    @classmethod
    def listing(cls, section: DatasetConfig, run_root: Path) -> Listing:
        return list_synthetic(section, run_root)

    @classmethod
    def expected_class_sizes(cls, section: DatasetConfig) -> list[int]:
        return class_sizes(Settings.of(section).synthetic)
