"""Config of the study (section ``study``) and of Ray Tune sweeps (section ``tune``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from raugment.core.config import (
    ACTORS_REASON,
    MAX_ACTORS,
    MAX_SETS,
    SETS_REASON,
    ConfigError,
    at_most,
    no_duplicates,
    positive,
)


@dataclass
class TuneConfig:
    """Ray Tune sweep over dotted config keys, e.g. ``{"train.lr": [0.1, 0.03]}`` (a grid).

    ``scheduler: asha`` stops weak trials early on ``metric`` per epoch (``grace_period`` epochs
    at least, ``reduction_factor`` as in ASHA); ``fifo`` runs every trial to its end.

    ``pipeline`` is what one trial runs: ``train`` = assemble -> train on the added images given
    to the sweep (it reads only ``assemble.*`` and ``train.*``, so only those may be swept);
    ``study`` = the study's whole graph for the one method of ``study.methods`` at the one ratio
    of ``study.ratios``, set 0 (fine-tuning -> checkpoint selection -> generation -> filter ->
    ... -> assemble -> train), so keys of every stage may be swept (``finetune.lr``,
    ``finetune.clusters``, ``generate.guidance_scale``, ...); trials share what they have in common.
    """

    space: dict[str, list[Any]] = field(default_factory=dict)
    num_samples: int = 1
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = 1
    grace_period: int = 5
    reduction_factor: int = 3
    trial_cpus: float = 0.01
    pipeline: Literal["train", "study"] = "train"

    def validate(self, key: str) -> None:
        positive(self.num_samples, f"{key}.num_samples")
        positive(self.max_concurrent, f"{key}.max_concurrent")
        positive(self.grace_period, f"{key}.grace_period")
        if self.reduction_factor < 2:
            raise ConfigError(f"{key}.reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.trial_cpus <= 0:
            raise ConfigError(f"{key}.trial_cpus must be > 0 (Ray refuses 0); try 0.01")
        for name, values in self.space.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{key}.space.{name} must be a non-empty list of values")


@dataclass
class StudyConfig:
    """Datasets x methods x augmentation ratios x resampled sets (x seeds) of one study.

    The planner turns this into the set of stage runs, sharing every common artifact: one
    generation pool of ``pool_factor x largest ratio`` images per class serves all ratios and sets
    (it overrides ``generate.images_per_class``), one retrieval at the largest ratio's quota serves
    the smaller ones (it overrides ``retrieve.images_per_class``). A stage command (``raugment
    generate``, ...) plans one stage with the same graph but uses those sections as given; its
    ``filter``/``dedup``/``audit``/``select_checkpoint`` switches and ``methods`` apply as here.

    Attributes:
        methods: method names (``retrieval``, ``simple``, ``clip_templates``, ``ft_conditioning``,
            ...) or names of ``variants``.
        ratios: augmentation ratios in percent of each class's training images.
        sets: resampled sets per method and ratio (paper: 5); each is one classifier.
        seeds: classifier seeds; each (method, ratio, set) is trained once per seed. Empty: the
            seed of set ``s`` is ``train.seeds[0] + s``.
        baseline: also train on the original data alone (one run per set).
        datasets: name -> dotted overrides for that dataset (``{"dataset.fraction": 0.1}``); empty
            means the one dataset of the ``dataset`` section, named ``default``.
        variants: name -> ``{"method": base method, "pipeline": optional, dotted overrides...}``,
            e.g. ``ft_cluster_k5: {method: ft_cluster_conditioning, finetune.clusters: 5}``.
        pool_factor: generated images per class per added image needed by the largest ratio
            (paper: 390 per class for at most 130 training images = 3x).
        filter/dedup/audit: run these stages on added images.
        costs: per-image cost overrides for the planner (see ``raugment.study.planner.DEFAULT_COSTS``).
        expected: planning hints used before the dataset stage has run: ``classes``,
            ``train_images``, ``max_per_class``; ``index_vectors``: the size of the index to build
            while ``index.path`` is not there yet (the planner costs the index build from it).
        node_gpus/node_cpus: the node that the plan's wall-time estimate is for.
        parallel: stage runs of ``parallel_stages`` kept in flight at once (each still takes
            the resources its own section asks for); other stages run one at a time, so Ray
            Data actor pools never wait on each other for CPUs.
        keep_going: a failed stage run leaves out what depends on it and the study goes on
            (the report lists it); false: the first failure ends the study.
        shortfall: what happens to a class that a method's final pool (after filter and dedup)
            cannot fill at the largest ratio: ``exclude`` (the paper: the class is left out of
            every classifier of the dataset, the baseline's too, and the report lists it),
            ``allow`` (that method uses what there is) or ``fail`` (its assemble stops, naming
            the classes). See :mod:`raugment.stages.assemble.shortfall`.
        retrieval_margin: retrieval fills each class with ``(1 + margin) x`` the quota, so that
            what the filter and dedup stages drop is topped up from the next-best neighbours
            (assemble takes the best-ranked survivors); 0 when neither stage runs.
        select_checkpoint: pick each fine-tuned method's (5-9) checkpoint by the validation
            accuracy of a classifier trained on a small set generated from it (the ``select``
            section); false: generate from the best-validation-loss checkpoint.
    """

    methods: list[str] = field(default_factory=lambda: ["retrieval", "simple"])
    ratios: list[float] = field(default_factory=lambda: [100.0])
    sets: int = 5
    seeds: list[int] = field(default_factory=list)
    baseline: bool = True
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    pool_factor: float = 3.0
    filter: bool = True
    dedup: bool = True
    audit: bool = True
    costs: dict[str, float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    node_gpus: int = 8
    node_cpus: int = 64
    parallel: int = 1
    parallel_stages: list[str] = field(default_factory=lambda: ["train"])
    keep_going: bool = True
    select_checkpoint: bool = True
    shortfall: Literal["exclude", "allow", "fail"] = "exclude"
    retrieval_margin: float = 0.25

    def validate(self, key: str) -> None:
        positive(self.sets, f"{key}.sets")
        at_most(self.sets, MAX_SETS, f"{key}.sets", SETS_REASON)
        at_most(len(self.seeds), MAX_SETS, f"{key}.seeds (count)", "each seed trains every classifier once more")
        no_duplicates(self.seeds, f"{key}.seeds", "a seed twice trains the same classifier twice and counts "
                      "it as two runs")
        positive(self.parallel, f"{key}.parallel")
        at_most(self.parallel, MAX_ACTORS, f"{key}.parallel", "stage runs in flight at once; " + ACTORS_REASON)
        positive(self.pool_factor, f"{key}.pool_factor")
        if not 0 <= self.retrieval_margin <= 10:
            raise ConfigError(f"{key}.retrieval_margin is a fraction of the quota in [0, 10] (0.25 = "
                              f"retrieve 25 % more than needed), got {self.retrieval_margin}")
        positive(self.node_gpus, f"{key}.node_gpus")
        positive(self.node_cpus, f"{key}.node_cpus")
        if not self.ratios:
            raise ConfigError(f"{key}.ratios is empty; give at least one ratio, e.g. [100]")
        for i, r in enumerate(self.ratios):
            if not 0 < r <= 2500:
                raise ConfigError(f"{key}.ratios[{i}] is a percentage in (0, 2500], got {r}")
        if not self.methods and not self.baseline:
            raise ConfigError(f"{key}: no methods and baseline=false leaves nothing to run")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"{key}.methods has duplicates: {self.methods}")
        for name, variant in self.variants.items():
            if not isinstance(variant, dict):
                raise ConfigError(f"{key}.variants.{name} must be a mapping of dotted overrides")
        for name in self.expected:
            if name not in ("classes", "train_images", "max_per_class", "index_vectors"):
                raise ConfigError(f"{key}.expected.{name}: unknown hint; known: classes, "
                                  "train_images, max_per_class, index_vectors")
