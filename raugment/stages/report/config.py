"""Config of the ``report`` stage (section ``report``)."""

from __future__ import annotations

from dataclasses import dataclass

from raugment.core.config import positive


@dataclass
class ReportConfig:
    """The study report (HTML + Markdown + ``report.json``), one self-contained folder."""

    title: str = "raugment study"
    samples_per_cell: int = 4
    grid_classes: int = 8
    thumb_size: int = 64
    histogram_bins: int = 20
    upper_bound: dict[str, float] | None = None  # row label -> top-1 %, e.g. {"20% ImageNet": 70.2}
    # A `raugment models train-mini` artifact (the demo sets it): its CLIP's precision@n and its
    # models' training cost go into the report.
    mini_models: str | None = None

    def validate(self, key: str) -> None:
        positive(self.samples_per_cell, f"{key}.samples_per_cell")
        positive(self.grid_classes, f"{key}.grid_classes")
        positive(self.thumb_size, f"{key}.thumb_size")
        positive(self.histogram_bins, f"{key}.histogram_bins")
