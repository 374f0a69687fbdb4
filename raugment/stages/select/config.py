"""Config of the ``select`` stage (section ``select``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raugment.core.config import ConfigError, positive


@dataclass
class SelectConfig:
    """Choosing a fine-tuning checkpoint by the downstream classifier (paper 3.1; ``raugment.stages.select.stage``).

    For each candidate checkpoint the study generates a small set (``images_per_class`` per class),
    assembles it with the original training split at ``ratio`` percent and trains a classifier
    with the ``train`` section; the checkpoint whose classifier has the best validation top-1 is
    the one the method's generation uses (ties: the earlier epoch). Candidates that share a
    snapshot are scored once. The scoring sets go straight from generation to ``assemble`` (no
    filter, dedup or leakage audit). The study runs this for methods 5-9 while
    ``study.select_checkpoint`` is true.

    Attributes:
        candidates: checkpoint names to score: ``best_train``, ``best_val``, ``epoch_001`` ...
            Empty: every checkpoint the method keeps (best train and validation loss and the
            epochs of ``finetune.keep_epochs``, Imagic's first ``finetune.imagic_epochs``) up to
            ``finetune.max_epochs``.
        images_per_class: generated images per class per candidate; null: what ``ratio`` needs
            for the largest class.
        ratio: augmentation ratio (percent) of the scoring classifiers.
        checkpoint: use this checkpoint without scoring (the planner sets it for each
            candidate's scoring chain; set it yourself to pin one).
    """

    candidates: list[str] = field(default_factory=list)
    images_per_class: int | None = None
    ratio: float = 100.0
    checkpoint: str | None = None

    def validate(self, key: str) -> None:
        for i, name in enumerate(self.candidates + ([self.checkpoint] if self.checkpoint else [])):
            if not _is_checkpoint_name(name):
                where = f"{key}.candidates[{i}]" if i < len(self.candidates) else f"{key}.checkpoint"
                raise ConfigError(f"{where}: {name!r} is not a checkpoint name; use best_train, best_val "
                                  "or epoch_NNN (e.g. epoch_002)")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"{key}.candidates has duplicates: {self.candidates}")
        if self.images_per_class is not None:
            positive(self.images_per_class, f"{key}.images_per_class")
        if not 0 < self.ratio <= 2500:
            raise ConfigError(f"{key}.ratio is a percentage in (0, 2500], got {self.ratio}")


def _is_checkpoint_name(name: str) -> bool:
    """``best_train``, ``best_val`` or ``epoch_NNN`` (the names the fine-tuning stage keeps)."""
    return name in ("best_train", "best_val") or (
        name.startswith("epoch_") and len(name) == 9 and name[6:].isdigit() and int(name[6:]) >= 1)
