import html
import json
import re

import pytest

from raugment.cli import main
from raugment.config import Config
from raugment.core import schema as S
from raugment.core.artifacts import candidate_ids, read_summary
from raugment.core.storage import latest
from raugment.stages.audit import stage as audit
from raugment.stages.dedup import stage as dedup
from tests.helpers.planted import draw, make_artifact, make_dataset, near_copies, png, row

ODD_ID = 'a<b>&"x'  # ids reach the HTML: they must come out escaped


def _dataset_rows(imgs):
    splits = {0: "test", 1: "test", 2: "val", 3: "unused", 4: "train", 5: "test", 6: "val"}
    return [row(f"d{i}", png(imgs[i]), label=i % 3, split=s, source="original", method=None)
            for i, s in splits.items()]


def _added_rows(imgs):
    return [row("a-jpeg0", near_copies(imgs[0])["jpeg"], label=0, rank=0),
            row("a-crop1", near_copies(imgs[1])["crop"], label=1, rank=0),
            row(ODD_ID, near_copies(imgs[2])["resized"], label=2, rank=0, source="generated", method="simple"),
            row("a-up3", near_copies(imgs[3])["upscaled"], label=0, rank=1),
            row("a-train4", png(imgs[4]), label=1, rank=1),        # train is not audited
            row("a-new7", png(imgs[7]), label=1, rank=2),          # unrelated
            row("a-new8", png(imgs[8]), label=2, rank=2)]


@pytest.mark.ray
def test_audit_finds_planted_leaks_writes_gallery_and_summary(tmp_path, ray_session):
    imgs = [draw(100 + s) for s in range(9)]
    dataset = make_dataset(tmp_path / "in", _dataset_rows(imgs), shards=2)
    added = make_artifact(tmp_path / "in", "retrieve", _added_rows(imgs))
    cfg = Config()
    cfg.run.root = str(tmp_path / "runs")
    deduped = dedup.run(cfg, [added])  # fills phash; the audit reuses it

    code = main(["audit", "--dataset", str(dataset.path), "--added", str(deduped.path),
                 "--set", f"run.root={cfg.run.root}", "--set", "dedup.local_rows=0",
                 "--set", "run.progress=false"])
    assert code == 0
    out = latest(cfg.run.root, "audit")
    pairs = out.read("pairs")
    got = {(p[S.ADDED_ID], p[S.REFERENCE_ID], p[S.SPLIT]) for p in pairs.to_pylist()}
    assert got == {("a-jpeg0", "d0", "test"), ("a-crop1", "d1", "test"), (ODD_ID, "d2", "val"),
                   ("a-up3", "d3", "unused")}
    assert all(p[S.DISTANCE] < 10 for p in pairs.to_pylist())
    assert pairs.column(S.DISTANCE).to_pylist() == sorted(pairs.column(S.DISTANCE).to_pylist())
    assert candidate_ids(out) == {"a-jpeg0", "a-crop1", ODD_ID, "a-up3"}

    summary = read_summary(out)
    assert summary["n_added"] == 7 and summary["n_reference"] == 6  # train image not a reference
    assert summary["splits"]["test"]["reference_with_candidate"] == 2
    assert summary["leakage_rate"] == pytest.approx(2 / 3)
    assert summary["splits"]["val"]["added_rate"] == pytest.approx(1 / 7)
    assert summary["candidate_rate"] == pytest.approx(4 / 7)
    assert summary["per_class"]["class0"] == {"n_added": 2, "added_with_candidate": 2, "added_rate": 1.0}
    assert out.stats["counts"]["pairs"] == 4

    page = (out.path / audit.GALLERY).read_text()
    assert ODD_ID not in page and html.escape(ODD_ID) in page
    boxes = re.findall(r'<input type="checkbox" class="dup" data-added="([^"]*)" data-reference="([^"]*)"', page)
    assert {(html.unescape(a), r) for a, r in boxes} == {(a, r) for a, r, _ in got}
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 8 and all((out.path / s).is_file() for s in sources)
    assert "exportMarked" in page and "http" not in page  # offline: nothing fetched from anywhere


def test_gallery_limit_and_missing_images(tmp_path):
    pairs = S.to_table([{S.ADDED_ID: f"a{i}", S.REFERENCE_ID: f"r{i}", S.SPLIT: "test", S.DISTANCE: i}
                        for i in range(5)], S.PAIRS)
    summary = {"pairs": 5, "radius": 10, "n_added": 5, "n_reference": 5}
    page = audit.write_gallery(tmp_path, pairs, {"a0": png(draw(0)), "r0": b"junk"}, summary,
                               limit=3).read_text()
    assert page.count('class="dup"') == 3 and "(image unavailable)" in page
    assert len(list((tmp_path / audit.GALLERY_DIR).iterdir())) == 1
    assert json.dumps(summary)  # the summary stays JSON-serialisable


def test_audit_refuses_missing_inputs(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        audit.run(Config(), make_artifact(tmp_path, "dataset", [row("d", png(draw(0)))]), [])
