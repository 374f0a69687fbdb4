"""The one-screen map stays true: it fits a screen, names every package, stage and plug-in folder
that exists, and the code cites no document that is not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import REPO

ARCH = REPO / "raugment" / "ARCHITECTURE.md"
PACKAGE = REPO / "raugment"


def test_architecture_fits_one_screen():
    lines = ARCH.read_text().splitlines()
    assert len(lines) <= 80 and max(len(line) for line in lines) <= 100


def test_architecture_names_every_package_and_stage():
    text = ARCH.read_text()
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    stages = sorted(p.name for p in (PACKAGE / "stages").iterdir() if (p / "stage.py").exists())
    assert stages, "no stage packages found"
    assert [p for p in packages if f"{p}/" not in text] == []
    assert [s for s in stages if s not in text] == []


def test_every_plugin_folder_in_the_table_exists_and_holds_its_registry():
    rows = re.findall(r"\| `(stages/\w+/\w+)/` \| `(\w+)` \|", ARCH.read_text())
    assert len(rows) == 5
    for folder, registry in rows:
        init = PACKAGE / folder / "__init__.py"
        assert init.exists(), folder
        assert re.search(rf"^{registry}\b.*= Registry\(", init.read_text(), re.M), (folder, registry)


@pytest.mark.parametrize("pattern", [r"DESIGN(\.md)? (section|§)", r"STACK-NOTES", r"\.\./shared/"])
def test_code_cites_no_document_outside_the_repository(pattern):
    files = [p for d in ("raugment", "tests", "benchmarks", "jobs", "tools") for p in (REPO / d).rglob("*.py")
             if p != Path(__file__)]
    hits = [f"{p.relative_to(REPO)}:{n}" for p in files
            for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert hits == []
