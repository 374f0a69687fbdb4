"""The whole configuration: every section, in one place.

Each section is owned by the package that reads it (``raugment/stages/<stage>/config.py``, the
study's and the demo's ``config.py``; ``run`` and ``cluster`` by :mod:`raugment.core.config`). This
module only lists them, so a YAML file or ``--set`` override is checked against every key before
any work starts. ``raugment config`` prints them all with their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raugment.core import config as core
from raugment.core.config import ClusterConfig, RunConfig
from raugment.demo.config import MiniConfig
from raugment.stages.assemble.config import AssembleConfig
from raugment.stages.audit.config import AuditConfig
from raugment.stages.dataset.config import DatasetConfig
from raugment.stages.dedup.config import DedupConfig
from raugment.stages.filter.config import FilterConfig
from raugment.stages.finetune.config import FinetuneConfig
from raugment.stages.generate.config import GenerateConfig
from raugment.stages.index.config import IndexConfig
from raugment.stages.report.config import ReportConfig
from raugment.stages.retrieve.config import RetrieveConfig
from raugment.stages.select.config import SelectConfig
from raugment.stages.train.config import TrainConfig
from raugment.study.config import StudyConfig, TuneConfig


@dataclass
class Config:
    """The whole configuration; each stage reads its own section."""

    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    mini: MiniConfig = field(default_factory=MiniConfig)


# keyed by the declared class: a section composed with its plug-ins' settings names its base
core.SECTION_NAMES.update({getattr(t, "__section_base__", t): f.name for f in Config.__dataclass_fields__.values()
                           for t in [f.type if isinstance(f.type, type) else globals()[f.type]]})
core.SECTION_NAMES[Config] = ""


def from_dict(data: dict | None, cls: type = Config) -> Any:
    """Build and validate the whole config (or one section, via ``cls``) from plain data."""
    return core.from_dict(data, cls)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults <- ``base`` <- YAML file <- overrides, validated."""
    return core.from_dict(core.load_data(path, overrides, base), Config)
