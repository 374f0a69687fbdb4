"""Config of the demo's mini-world and its small models (section ``mini``)."""

from __future__ import annotations

from dataclasses import dataclass

from raugment.core.config import ConfigError, positive


@dataclass
class MiniConfig:
    """The mini-world and its small trained models (``raugment models train-mini``, the demo).

    The world's labelled classes and test split are the synthetic dataset's (``dataset.synthetic``,
    ``dataset.seed``); this section sets the captioned pool drawn around them and the training of
    the small CLIP and the small diffusion model on that pool.
    """

    pool_per_class: int = 100       # captioned pool images per class
    distractors: int = 60           # pool images of other colour/shape pairs
    near_duplicates: int = 2        # per class: slightly altered copies of test images put in the pool
    heldout_per_class: int = 30     # a second pool (another seed) the CLIP never sees: precision@n
    precision_n: int = 20           # n of precision@n
    # The CLIP also trains on a larger training-only pool of the same world (another seed, no
    # faults; never served or indexed): more varied data is the cure for its over-fitting on the
    # served pool. 0 + 0 trains on the served pool alone.
    # Distractors (other colour/shape pairs) are what teaches shape: a class shares its colour only
    # with them, and same-colour distractors were the CLIP's confusions (validation seeds 7, 8).
    clip_train_per_class: int = 300
    clip_train_distractors: int = 1800
    clip_shift: int = 3             # augmentation: random translation by up to this many pixels (+ flips)
    clip_steps: int = 250           # a step count, not a time limit: the same model on any machine
    clip_batch_size: int = 64
    clip_lr: float = 2e-3
    # Warm-up then cosine decay: at a constant 2e-3 one validation seed (9) collapsed blue onto green.
    clip_warmup_steps: int = 25
    clip_cosine: bool = True
    clip_caption_positives: bool = True  # same-caption pairs in a batch count as matches, not negatives
    diffusion: bool = True          # False trains only the CLIP (tests, CLIP-only experiments)
    diffusion_steps: int = 150      # UNet steps of raugment.demo.mini_diffusion (its default)
    num_threads: int = 1            # torch threads while training

    def validate(self, key: str) -> None:
        for name in ("pool_per_class", "heldout_per_class", "precision_n", "clip_steps", "clip_batch_size",
                     "diffusion_steps", "num_threads"):
            positive(getattr(self, name), f"{key}.{name}")
        positive(self.clip_lr, f"{key}.clip_lr")
        if self.distractors < 0 or self.near_duplicates < 0:
            raise ConfigError(f"{key}.distractors and {key}.near_duplicates must be >= 0")
        for name in ("clip_train_per_class", "clip_train_distractors", "clip_shift", "clip_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
