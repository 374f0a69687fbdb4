"""Dataset sources: one module each, registered by name in :data:`DATASETS` (``dataset.source``).

A source is a :class:`DatasetSource` subclass registered as
``@DATASETS.register("<its module name>")``. It lists what a dataset holds before any image is
read, ``listing(section, run_root) -> Listing`` (class id -> item refs of the training pool and of
the test split, and a :class:`Reader` that turns a ref into encoded bytes); the dataset stage
splits, reads and stores the items. Every error of config or input is raised by the listing.

Class attributes: ``settings`` (its own config keys, a
:class:`~raugment.core.config.PluginSettings` dataclass that the ``dataset`` section carries, e.g.
``dataset.image_column``), ``needs`` (stages it cannot work without; usually none) and
``needs_path`` (whether ``dataset.path`` must be set; checked when the config loads). A source may
also tell the training pool's size per class without reading anything
(:meth:`DatasetSource.expected_class_sizes`), which the study planner uses to size a plan.

A source module imports cheaply and imports the stage's ``config.py`` for types only
(``if TYPE_CHECKING:``): that module imports this folder while it composes the section. This
package itself does not even do that (it would make an import cycle), so it types the section as
``Any``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from raugment.core.config import PluginSettings
from raugment.core.registry import Registry

DATASETS: Registry = Registry("dataset source", package=__name__)


class Reader(Protocol):
    """Reads the encoded bytes of items given by their refs (a source's stable item names)."""

    def read(self, ref: str) -> bytes: ...


@dataclass
class Listing:
    """What a source holds, before any image is read.

    Attributes:
        train: class id -> refs of its training-pool items (sorted).
        test: class id -> refs of its test items, or None when the source has no test split.
        reader: turns a ref into bytes.
        names: class id -> a name the source itself provides (Parquet ``class_name``), if any.
        ignored: files skipped because they are not images (by extension).
        folders: class id -> the folder of its training-pool items, for messages (sources of
            class folders).
    """

    train: dict[str, list[str]]
    test: dict[str, list[str]] | None
    reader: Reader
    names: dict[str, str] = field(default_factory=dict)
    ignored: int = 0
    folders: dict[str, str] = field(default_factory=dict)


class DatasetSource:
    """The contract of a dataset source (see the module docstring)."""

    settings: ClassVar[type[PluginSettings] | None] = None
    needs: ClassVar[tuple[str, ...]] = ()
    needs_path: ClassVar[bool] = True

    @classmethod
    def listing(cls, section: Any, run_root: Path) -> Listing:
        """List the dataset of ``section`` (the ``dataset`` section); ``run_root`` for anything the
        source writes first (the synthetic source draws its images there once)."""
        raise NotImplementedError

    @classmethod
    def expected_class_sizes(cls, section: Any) -> list[int] | None:
        """Training-pool images per class, known without reading the data; None when unknown."""
        return None


def source_class(name: str) -> type[DatasetSource]:
    """The source registered as ``name``; a ConfigError naming ``dataset.source`` otherwise."""
    return DATASETS.get(name, key="dataset.source")
