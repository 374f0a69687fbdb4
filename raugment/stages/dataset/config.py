"""Config of the ``dataset`` stage (section ``dataset``).

The section holds the keys every source shares; each source of
:mod:`raugment.stages.dataset.sources` adds its own (``image_column`` ..., the ``synthetic``
subsection), in the same section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raugment.core.config import ConfigError, positive, with_plugins
from raugment.stages.dataset.sources import DATASETS


@with_plugins(DATASETS)
@dataclass
class DatasetConfig:
    """The target dataset and its splits (paper section 3, "Dataset")."""

    # A name in DATASETS (raugment.stages.dataset.sources): "imagefolder", "parquet" or "synthetic".
    source: str = "synthetic"
    path: str | None = None
    # The test split when it is not under ``path`` (ImageFolder: ``path/test`` or ``path/val``).
    test_path: str | None = None
    # subsample: train = fraction of each class, val = as many again, rest "unused";
    # full: all but that same val; split_80_10_10: Caltech256-style, for data without a test split.
    protocol: Literal["subsample", "split_80_10_10", "full"] = "subsample"
    fraction: float = 0.1
    class_names: Literal["auto", "wordnet", "folder"] = "auto"
    exclude_classes: list[str] = field(default_factory=list)
    max_side: int | None = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    seed: int = 0
    shard_size: int = 1000
    read_threads: int = 4

    def validate(self, key: str) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{key}.fraction must be in (0, 1], got {self.fraction}")
        # An unknown source is reported by the stage's pre-flight, with the known names.
        if self.source in DATASETS and DATASETS.get(self.source).needs_path and not self.path:
            raise ConfigError(f"{key}.path is required when {key}.source={self.source!r}")
        if self.source in DATASETS and not DATASETS.get(self.source).needs_path:
            # ``--set dataset.path=/my/imagenet`` alone would train on the drawn demo shapes
            for name in ("path", "test_path"):
                if getattr(self, name):
                    raise ConfigError(
                        f"{key}.{name}={getattr(self, name)!r} is set, but {key}.source={self.source!r} "
                        f"draws its own images and would ignore it; set {key}.source=imagefolder "
                        f"(train/ and val/ or test/ class folders) or {key}.source=parquet, or drop "
                        f"{key}.{name}")
        if self.protocol == "split_80_10_10" and self.test_path:
            raise ConfigError(f"{key}.test_path is set but {key}.protocol=split_80_10_10 makes its own "
                              "test split; drop one of them")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"{key}.max_side must be >= 8 pixels or null, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"{key}.quality must be in [1, 100], got {self.quality}")
        positive(self.shard_size, f"{key}.shard_size")
        positive(self.read_threads, f"{key}.read_threads")
