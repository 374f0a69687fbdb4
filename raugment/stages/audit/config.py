"""Config of the ``audit`` stage (section ``audit``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raugment.core.config import ConfigError, positive


@dataclass
class AuditConfig:
    """Test-leakage audit (paper 4.5, ``raugment.stages.audit.stage``): Hamming distance < radius to val/test/unused."""

    radius: int = 10
    splits: list[str] = field(default_factory=lambda: ["val", "test", "unused"])
    gallery_limit: int = 500
    thumb_side: int = 128

    def validate(self, key: str) -> None:
        if not 1 <= self.radius <= 64:
            raise ConfigError(f"{key}.radius is a strict Hamming bound in [1, 64], got {self.radius}")
        bad = [s for s in self.splits if s not in ("train", "val", "test", "unused")]
        if bad or not self.splits:
            raise ConfigError(f"{key}.splits must be a non-empty subset of train/val/test/unused, got {self.splits}")
        if self.gallery_limit < 0:
            raise ConfigError(f"{key}.gallery_limit must be >= 0")
        positive(self.thumb_side, f"{key}.thumb_side")
