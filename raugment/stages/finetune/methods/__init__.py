"""Fine-tuning methods (paper 3.1, methods 5-9): one module each, registered by name in :data:`FINETUNERS`.

A method is a class in ``<name>.py``, registered with ``@FINETUNERS.register("<name>")``, whose
``name`` is the same. It subclasses :class:`FinetuneMethod` and one family of
:mod:`raugment.lib.finetuned.families`, which says what its learned table is and how a row
becomes the UNet's conditioning (:class:`~raugment.lib.finetuned.families.ConditioningFamily` or
:class:`~raugment.lib.finetuned.families.PseudowordFamily`); the generator samples from any
method's artifact through its family, so a new method needs no generation code. It declares:

* ``trains_unet``: whether the UNet is fine-tuned with the table;
* ``gpu_s_per_image``: the study planner's cost of a whole run per training image, in GPU-seconds
  (the paper's figures: :func:`paper_gpu_s_per_image`); ``study.costs`` key
  ``finetune.<name>.gpu_s_per_image`` overrides it;
* optionally ``settings``: a :class:`~raugment.core.config.PluginSettings` dataclass of its own
  ``finetune.*`` keys (read with ``Settings.of(section)``), which the ``finetune`` section
  carries; and it may override :meth:`FinetuneMethod.keep_epochs` (the checkpoints it keeps)
  and :meth:`FinetuneMethod.cluster_images` (the rows its table has per class).

The registry imports every public module of this folder the first time it is asked, so a new
method is a new module (and its test, ``tests/stages/finetune/methods/``); nothing else is
edited. The study plans a registered name as fine-tuning -> checkpoint selection -> generation.
The registry contract tests (``tests/stages/finetune/test_methods_contract.py``) check every method.

Plug-in modules import cheaply (torch inside functions) and never import the stage's
``config.py`` at module level (it imports this folder while it is being defined); for the same
reason the base class types the config as :data:`FinetuneSection` / ``Any``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from raugment.core.registry import Registry
from raugment.lib.finetuned.families import Method

if TYPE_CHECKING:  # pragma: no cover
    from raugment.core.storage import Artifact

FINETUNERS: Registry = Registry("fine-tuning method", package=__name__)

# The ``finetune`` section (``raugment.stages.finetune.config.FinetuneConfig``, with every method's
# settings). Not imported here: the section imports this package to collect the settings.
FinetuneSection = Any

# The paper's cost figures (section 4) are V100 GPU-hours of a whole run (<= 40 epochs, 512 px) on
# 10 % of ImageNet, this many training images.
PAPER_TRAIN_IMAGES = 126_861


def paper_gpu_s_per_image(gpu_hours: float) -> float:
    """GPU-seconds per training image of a run the paper measured at ``gpu_hours`` V100 GPU-hours."""
    return gpu_hours * 3600 / PAPER_TRAIN_IMAGES


class FinetuneMethod(Method):
    """A fine-tuning method: a family of :mod:`raugment.lib.finetuned.families` plus what the
    fine-tuning stage and the study need to know (see the package docstring)."""

    settings: type | None = None
    gpu_s_per_image: float | None = None

    def keep_epochs(self, section: FinetuneSection) -> list[int]:
        """Epochs that keep a checkpoint whatever their loss: ``finetune.keep_epochs``."""
        return list(section.keep_epochs)

    def cluster_images(self, cfg: Any, dataset: Artifact, ids: list[str], labels: list[int]) -> np.ndarray:
        """The cluster of each training image within its class (``cfg``: the whole config); the
        table gets one row per (class, cluster). Default: one cluster, so one row per class."""
        return np.zeros(len(ids), dtype=np.int64)


def get_method(name: str, key: str | None = None) -> FinetuneMethod:
    """An instance of the fine-tuning method registered as ``name`` (see :meth:`Registry.get`)."""
    return FINETUNERS.get(name, key)()
