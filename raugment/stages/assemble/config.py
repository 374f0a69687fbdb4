"""Config of the ``assemble`` stage (section ``assemble``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raugment.core.config import MAX_SETS, SETS_REASON, ConfigError, at_most, positive


@dataclass
class AssembleConfig:
    """Original training split + added images at an augmentation ratio (percent).

    ``sources`` names the added methods to mix (empty = every added artifact given); each class's
    quota ``round(n_train * ratio / 100)`` is split evenly between them. Generated pools are
    resampled into ``num_sets`` sets (``set_index`` picks one); retrieved pools give their top
    ranks. ``leakage: remove`` drops the audit's candidate ids first.

    ``shortfall`` is what happens to a class whose pool cannot fill its quota
    (:mod:`raugment.stages.assemble.shortfall`): ``exclude`` leaves the class out (originals
    too), ``allow`` uses what there is, ``fail`` stops naming the classes. A study sets it from
    ``study.shortfall`` and checks every method's pool at ``census_ratio`` (the largest ratio;
    None = ``ratio``), so that all its classifiers share one class set.
    """

    sources: list[str] = field(default_factory=list)
    ratio: float = 100.0
    set_index: int = 0
    num_sets: int = 5
    leakage: Literal["keep", "remove"] = "keep"
    shortfall: Literal["exclude", "allow", "fail"] = "exclude"
    census_ratio: float | None = None

    def validate(self, key: str) -> None:
        if not 0 <= self.ratio <= 2500:
            raise ConfigError(f"{key}.ratio is a percentage in [0, 2500], got {self.ratio}")
        positive(self.num_sets, f"{key}.num_sets")
        at_most(self.num_sets, MAX_SETS, f"{key}.num_sets", SETS_REASON)
        if self.census_ratio is not None and not 0 <= self.census_ratio <= 2500:
            raise ConfigError(f"{key}.census_ratio is a percentage in [0, 2500], got {self.census_ratio}")
        if not 0 <= self.set_index < self.num_sets:
            raise ConfigError(f"{key}.set_index must be in [0, {key}.num_sets={self.num_sets}), "
                              f"got {self.set_index}")
