"""The shipped ImageNet class table, lookups, folder names, and the table's generator script."""

from __future__ import annotations

import importlib.util

import pytest

from raugment.stages.dataset.classnames import folder_class_name, imagenet_classes, is_synset_id, lookup
from tests import REPO

TOOL = REPO / "tools" / "make_imagenet_classes.py"


@pytest.mark.parametrize("synset, label, name, hypernym", [
    ("n01440764", 0, "tench, Tinca tinca", "cyprinid"),
    ("n01491361", 3, "tiger shark, Galeocerdo cuvieri", "requiem shark"),
    ("n03180011", None, "desktop computer", "personal computer"),
    ("n02086910", None, "papillon", "toy spaniel"),
])
def test_well_known_classes(synset, label, name, hypernym):
    info = lookup(synset)
    assert info.class_id == synset
    assert info.name == name
    assert info.lemmas == tuple(name.split(", "))
    assert info.hypernym == hypernym
    assert info.definition and '"' not in info.definition  # gloss without its quoted examples
    if label is not None:
        assert info.label == label
    assert imagenet_classes()[info.label] is info


def test_table_is_the_1000_sorted_synsets():
    classes = imagenet_classes()
    ids = [c.class_id for c in classes]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert ids == sorted(ids)  # the standard label order
    assert [c.label for c in classes] == list(range(1000))
    assert all(is_synset_id(i) for i in ids)
    assert all(c.name.strip() and all(lem.strip() for lem in c.lemmas) for c in classes)
    assert all(c.hypernym and c.definition for c in classes)
    assert not any("_" in c.name for c in classes)  # underscores became spaces


def test_lookup_unknown_names_the_id():
    with pytest.raises(ValueError, match="n99999999"):
        lookup("n99999999")


@pytest.mark.parametrize("folder, name", [
    ("001.ak47", "ak47"),
    ("037.chess-board", "chess board"),
    ("251.airplanes-101", "airplanes"),
    ("golden_retriever", "golden retriever"),
    ("Red_Fox", "Red Fox"),
    ("x-101", "x 101"),  # the Caltech101 suffix only goes with a Caltech-style prefix
    ("7", "7"),
])
def test_folder_class_name(folder, name):
    assert folder_class_name(folder) == name


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_imagenet_classes", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_parses_wordnet_lines(tmp_path):
    tool = _load_tool()
    shark = ("01491361 05 n 02 tiger_shark 0 Galeocerdo_cuvieri 0 002 @ 01488918 n 0000 "
             "#m 01491235 n 0000 | large dangerous warm-water shark with striped or spotted body  ")
    lemmas, pointers, _gloss = tool.parse_data_line(shark)
    assert lemmas == ["tiger shark", "Galeocerdo cuvieri"]
    assert pointers == [("@", 1488918), ("#m", 1491235)]
    assert tool.definition_of('a thing; used for stuff; "an example"; "another"') == "a thing; used for stuff"

    # A two-synset data.noun with lines at their byte offsets, like WordNet's.
    hyper = "01488918 05 n 01 requiem_shark 0 000 | a shark"
    header = " license text\n"
    pad = 1488918 - len(header)
    data = header + " " * (pad - 1) + "\n" + hyper + "\n"
    data += " " * (1491361 - len(data) - 1) + "\n" + shark + "\n"
    rows = tool.build_rows(["n01491361"], data.encode())
    assert rows == [("n01491361", "tiger shark, Galeocerdo cuvieri", "requiem shark",
                     "large dangerous warm-water shark with striped or spotted body")]
