"""Config of the ``dataset`` stage (section ``dataset``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from raugment.core.config import ConfigError, positive


@dataclass
class SyntheticConfig:
    """The embedded demo dataset (``raugment.stages.dataset.synthetic``): coloured shapes a small CNN can learn.

    Classes are the first ``num_classes`` of ``synthetic.SYNTHETIC_CLASSES`` ("red circle", ...).
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
        if self.size < 8:
            raise ConfigError(f"{key}.size must be >= 8 pixels, got {self.size}")
        if not 0 <= self.imbalance < 1:
            raise ConfigError(f"{key}.imbalance must be in [0, 1), got {self.imbalance}")


@dataclass
class DatasetConfig:
    """The target dataset and its splits (paper section 3, "Dataset")."""

    # A name in registry.DATASETS: "imagefolder", "parquet" or "synthetic".
    source: str = "synthetic"
    path: Optional[str] = None
    # The test split when it is not under ``path`` (ImageFolder: ``path/test`` or ``path/val``).
    test_path: Optional[str] = None
    # subsample: train = fraction of each class, val = as many again, rest "unused";
    # full: all but that same val; split_80_10_10: Caltech256-style, for data without a test split.
    protocol: Literal["subsample", "split_80_10_10", "full"] = "subsample"
    fraction: float = 0.1
    class_names: Literal["auto", "wordnet", "folder"] = "auto"
    exclude_classes: list[str] = field(default_factory=list)
    max_side: Optional[int] = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    seed: int = 0
    # Parquet sources: the image column (bytes, or a struct with a "bytes" field as Hugging Face
    # writes), the class column (None: the first of label, class_id, class_name) and a split column.
    image_column: str = "image"
    label_column: Optional[str] = None
    split_column: Optional[str] = "split"
    shard_size: int = 1000
    read_threads: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, key: str) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{key}.fraction must be in (0, 1], got {self.fraction}")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"{key}.path is required when {key}.source={self.source!r}")
        if self.protocol == "split_80_10_10" and self.test_path:
            raise ConfigError(f"{key}.test_path is set but {key}.protocol=split_80_10_10 makes its own "
                              "test split; drop one of them")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"{key}.max_side must be >= 8 pixels or null, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"{key}.quality must be in [1, 100], got {self.quality}")
        positive(self.shard_size, f"{key}.shard_size")
        positive(self.read_threads, f"{key}.read_threads")
