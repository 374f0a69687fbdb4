"""Human-readable class names: the ImageNet (ILSVRC-2012) WordNet table and folder names.

The 1000-class table ships as package data (``data/imagenet_classes.tsv``), generated once by
``tools/make_imagenet_classes.py`` from WordNet 3.0 (Debian ``wordnet-base``) and timm's synset
list, so nothing here touches WordNet or the network at run time.

A class name is what the paper prompts with: all lemmas of the synset joined by ", " ("tiger
shark, Galeocerdo cuvieri"). ``hypernym`` is the first lemma of the synset's first hypernym
("requiem shark"), ``definition`` its WordNet gloss without examples.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

TABLE = "imagenet_classes.tsv"
SYNSET_RE = re.compile(r"^n\d{8}$")
# Caltech256 folders look like "001.ak47" or "251.airplanes-101": a numeric prefix and a dot, and a
# "-101" suffix on the classes taken over from Caltech101.
_NUMBERED_FOLDER = re.compile(r"^\d+\.(?=.)")
_CALTECH101_SUFFIX = re.compile(r"-101$")


@dataclass(frozen=True)
class ClassInfo:
    """One ImageNet class.

    Attributes:
        label: index in the standard sorted-synset order (0 = n01440764).
        class_id: the WordNet synset id, e.g. ``"n01491361"``.
        name: all lemmas joined by ", ", e.g. ``"tiger shark, Galeocerdo cuvieri"``.
        lemmas: the lemmas one by one.
        hypernym: first lemma of the first hypernym, e.g. ``"requiem shark"``.
        definition: the WordNet gloss before its examples.
    """

    label: int
    class_id: str
    name: str
    lemmas: tuple[str, ...]
    hypernym: str
    definition: str


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> list[ClassInfo]:
    """The 1000 ILSVRC-2012 classes in label order (read once, cached)."""
    text = resources.files("raugment").joinpath("data", TABLE).read_text(encoding="utf-8")
    lines = text.splitlines()[1:]  # header: class_id, name, hypernym, definition
    out = []
    for label, line in enumerate(lines):
        class_id, name, hypernym, definition = line.split("\t")
        out.append(ClassInfo(label, class_id, name, tuple(name.split(", ")), hypernym, definition))
    return out


@functools.lru_cache(maxsize=1)
def _by_id() -> dict[str, ClassInfo]:
    return {c.class_id: c for c in imagenet_classes()}


def lookup(synset_id: str) -> ClassInfo:
    """The ImageNet class with WordNet id ``synset_id``.

    Raises:
        ValueError: naming the id when it is not one of the 1000 ILSVRC-2012 classes.
    """
    try:
        return _by_id()[synset_id]
    except KeyError:
        raise ValueError(
            f"{synset_id!r} is not one of the 1000 ILSVRC-2012 synset ids (like 'n01440764'); "
            "use dataset.class_names=folder for other datasets") from None


def is_synset_id(name: str) -> bool:
    """True for names shaped like a WordNet noun synset id (``n`` + 8 digits)."""
    return bool(SYNSET_RE.match(name))


def folder_class_name(folder: str) -> str:
    """A readable class name from a dataset folder name.

    Drops a Caltech256-style numeric prefix ("001.ak47" -> "ak47") and, after such a prefix, the
    "-101" suffix of classes taken from Caltech101 ("251.airplanes-101" -> "airplanes"); turns
    underscores and hyphens into spaces ("037.chess-board" -> "chess board", "golden_retriever"
    -> "golden retriever") and collapses whitespace; keeps case. Hyphens become spaces because
    Caltech256 uses them as word separators and prompts read better that way ("232.t-shirt" ->
    "t shirt" is the price). A folder that is only a number keeps it ("7" -> "7").
    """
    name = folder.strip()
    if _NUMBERED_FOLDER.match(name):
        name = _CALTECH101_SUFFIX.sub("", _NUMBERED_FOLDER.sub("", name))
    name = re.sub(r"[_\-]+", " ", name)
    return " ".join(name.split()) or folder.strip()
