"""Config of the ``dedup`` stage (section ``dedup``; its pHash settings are the audit's too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raugment.core.config import ActorPoolConfig, ConfigError


@dataclass
class DedupConfig:
    """Near-duplicate removal among added images (``raugment.stages.dedup.stage``) and the shared pHash settings.

    ``hash_side`` and ``pool`` also drive the hashing of the leakage audit, so that both compare
    hashes made the same way.
    """

    # <= 8 of 64 bits catches resized, re-encoded and slightly cropped copies (crops move pHash
    # most); unrelated images differ in ~32 bits. The audit's radius (< 10) is one step wider.
    max_distance: int = 8
    hash_side: int = 64
    # Optional second test: a pHash pair is a duplicate only if CLIP cosine >= clip_cosine too.
    clip_cosine: float | None = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    device: str = "auto"
    # Hashing runs as Ray Data tasks (no model to hold): num_cpus and batch_size per task are
    # used, concurrency is left to Ray Data.
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    # Inputs up to this many rows are hashed in the driver: Ray Data's start-up costs more.
    local_rows: int = 2000

    def validate(self, key: str) -> None:
        if not 0 <= self.max_distance < 64:
            raise ConfigError(f"{key}.max_distance is a Hamming distance in [0, 63], got {self.max_distance}")
        if self.hash_side < 32:
            raise ConfigError(f"{key}.hash_side must be >= 32 (pHash works on 32x32), got {self.hash_side}")
        if self.clip_cosine is not None and not -1 <= self.clip_cosine <= 1:
            raise ConfigError(f"{key}.clip_cosine is a cosine in [-1, 1], got {self.clip_cosine}")
