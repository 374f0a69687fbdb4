"""The test-leakage audit (paper 4.5): added images vs the held-out splits, by pHash (stage ``audit``).

Every added image is compared with every image of ``audit.splits`` (default val, test and the
unused part of the original training set, as the paper did); a pair whose pHashes differ in fewer
than ``audit.radius`` bits (10, after Cherti et al.) is a *candidate* duplicate. Candidates are not
verdicts: a person confirms them in ``gallery.html``. Hashes are made exactly as de-duplication
makes them (``dedup.hash_side``), and ``phash`` values already in the added tables are reused.

Output (stage ``audit``)::

    pairs.parquet   one row per candidate pair (schema PAIRS)
    summary.json    counts and rates per split and per class; ``leakage_rate`` (share of the test
                    split with a candidate in the added data) is what the report quotes
    gallery.html    candidate pairs side by side with their distance and a mark box per pair,
    gallery/        with thumbnails as files next to it: the folder works offline as it is
"""

from __future__ import annotations

import html
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from raugment.config import Config
from raugment.core import schema as S
from raugment.core.artifacts import GALLERY, GALLERY_DIR, PAIRS_TABLE, SUMMARY
from raugment.core.config import to_dict
from raugment.core.storage import Artifact, StageRun, run_stage, write_text_atomic

log = logging.getLogger(__name__)

STAGE = "audit"
ADDED_COLUMNS = [S.ID, S.LABEL, S.CLASS_NAME, S.SOURCE, S.METHOD]
REFERENCE_COLUMNS = [S.ID, S.LABEL, S.SPLIT]


# ---- pure parts ------------------------------------------------------------------------------

def find_candidates(added: pa.Table, reference: pa.Table, radius: int) -> pa.Table:
    """Candidate pairs (schema PAIRS): every added x reference pair with Hamming distance < ``radius``.

    Args:
        added: rows with ``id``, ``label``, ``source``, ``method``, ``phash`` (non-null).
        reference: rows with ``id``, ``label``, ``split``, ``phash`` (non-null).
        radius: strict bound on the Hamming distance.
    """
    from raugment.lib.hashing import range_pairs, to_codes

    q, r, d = range_pairs(to_codes(added.column(S.PHASH)), to_codes(reference.column(S.PHASH)), radius)
    a, ref = added.take(pa.array(q)), reference.take(pa.array(r))
    table = pa.table({S.ADDED_ID: a.column(S.ID), S.REFERENCE_ID: ref.column(S.ID),
                      S.SPLIT: ref.column(S.SPLIT), S.DISTANCE: pa.array(d, pa.int32()),
                      S.ADDED_LABEL: a.column(S.LABEL), S.REFERENCE_LABEL: ref.column(S.LABEL),
                      S.SOURCE: a.column(S.SOURCE), S.METHOD: a.column(S.METHOD)})
    return S.conform(table, S.PAIRS).sort_by([(S.DISTANCE, "ascending"), (S.SPLIT, "ascending")])


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def summarize(pairs: pa.Table, added: pa.Table, reference: pa.Table, splits: Sequence[str],
              radius: int) -> dict[str, Any]:
    """Counts and rates per split and per class of the added images' labels.

    ``added_rate`` = share of added images with a candidate in that split (the paper's "0.13% of
    the retrieved images were in the validation split or the unused part"); ``reference_rate`` =
    share of the split's images with a candidate among the added ones (the paper's "0.009% of the
    test set leaked"). ``leakage_rate`` is the test split's ``reference_rate``.
    """
    n_added = added.num_rows
    per_split_ref = Counter(reference.column(S.SPLIT).to_pylist())
    p_split = pairs.column(S.SPLIT).to_pylist()
    p_added = pairs.column(S.ADDED_ID).to_pylist()
    p_ref = pairs.column(S.REFERENCE_ID).to_pylist()
    split_stats = {}
    for split in splits:
        idx = [i for i, s in enumerate(p_split) if s == split]
        a = len({p_added[i] for i in idx})
        b = len({p_ref[i] for i in idx})
        split_stats[split] = {"n_reference": per_split_ref.get(split, 0), "pairs": len(idx),
                              "added_with_candidate": a, "reference_with_candidate": b,
                              "added_rate": _rate(a, n_added),
                              "reference_rate": _rate(b, per_split_ref.get(split, 0))}
    class_of = dict(zip(added.column(S.ID).to_pylist(),
                        (n or str(lbl) for n, lbl in zip(added.column(S.CLASS_NAME).to_pylist(),
                                                         added.column(S.LABEL).to_pylist()))))
    n_per_class = Counter(class_of.values())
    flagged: dict[str, set] = defaultdict(set)
    for aid in p_added:
        flagged[class_of.get(aid, "?")].add(aid)
    per_class = {c: {"n_added": n_per_class[c], "added_with_candidate": len(flagged[c]),
                     "added_rate": _rate(len(flagged[c]), n_per_class[c])} for c in sorted(n_per_class)}
    any_candidate = len(set(p_added))
    test = split_stats.get("test")
    return {"radius": radius, "n_added": n_added, "n_reference": reference.num_rows,
            "pairs": pairs.num_rows, "added_with_candidate": any_candidate,
            "candidate_rate": _rate(any_candidate, n_added),
            "leakage_rate": test["reference_rate"] if test else None,
            "splits": split_stats, "per_class": per_class,
            "note": "candidates (pHash distance < radius), not confirmed duplicates; confirm them in "
                    + GALLERY}


# ---- reading ---------------------------------------------------------------------------------

def _hashed(artifacts: Sequence[Artifact], columns: list[str], cfg: Config,
            splits: Sequence[str] | None = None) -> pa.Table:
    """``columns`` + ``phash`` of every row; stored hashes are reused, missing ones computed on Ray."""
    from raugment.lib.hashing import hash_artifacts, image_files

    tables, to_hash = [], []
    for a in artifacts:
        stored = pa.concat_tables([_read(f, [*columns, S.PHASH]) for f in image_files(a)]) \
            if splits is None else None
        if stored is not None and stored.num_rows and stored.column(S.PHASH).null_count == 0:
            tables.append(stored)
        else:
            to_hash.append(a)
    if to_hash:
        tables.append(hash_artifacts(to_hash, cfg.dedup.hash_side, cfg.dedup.pool, columns, splits=splits,
                                     local_max_rows=cfg.dedup.local_rows, cluster=cfg.cluster))
    schema = pa.schema([S.IMAGES.field(c) for c in [*columns, S.PHASH]])
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    return table.filter(table.column(S.PHASH).is_valid())


def _read(path: Path, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in columns if c in present])
    return S.conform(table, pa.schema([S.IMAGES.field(c) for c in columns]))


def fetch_images(artifacts: Sequence[Artifact], ids: set[str]) -> dict[str, bytes]:
    """Encoded bytes of the rows with these ids (reads only the files' id column, then the hits)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raugment.lib.hashing import image_files

    found: dict[str, bytes] = {}
    wanted = pa.array(sorted(ids), pa.string())
    for a in artifacts:
        for f in image_files(a):
            hit = pc.is_in(pq.read_table(f, columns=[S.ID]).column(S.ID), wanted)
            if pc.any(hit).as_py():
                rows = pq.read_table(f, columns=[S.ID, S.IMAGE]).filter(hit)
                found.update(zip(rows.column(S.ID).to_pylist(), rows.column(S.IMAGE).to_pylist()))
    return found


# ---- gallery ---------------------------------------------------------------------------------

_STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;text-align:center;vertical-align:middle}
img{max-width:160px;max-height:160px}tr.marked{background:#fdd}.meta{font-size:small;color:#444}"""

_SCRIPT = """function marked(){return Array.from(document.querySelectorAll('input.dup:checked')).map(
 b=>({added_id:b.dataset.added,reference_id:b.dataset.reference,split:b.dataset.split,
 distance:Number(b.dataset.distance)}));}
function update(b){b.closest('tr').classList.toggle('marked',b.checked);
 document.getElementById('count').textContent=marked().length;}
function exportMarked(){const text=JSON.stringify(marked(),null,1);
 document.getElementById('out').value=text;
 const a=document.createElement('a');a.href=URL.createObjectURL(new Blob([text],{type:'application/json'}));
 a.download='true_duplicates.json';a.click();}"""


def _thumb(data: bytes | None, side: int) -> bytes | None:
    from raugment.core.imageio import ImageDecodeError, decode_image, encode_image, resize_max_side

    if data is None:
        return None
    try:
        return encode_image(resize_max_side(decode_image(data, min_side=side), side), "JPEG", quality=85)
    except ImageDecodeError:
        return None


def write_gallery(out_dir: Path, pairs: pa.Table, images: dict[str, bytes], summary: dict[str, Any],
                  thumb_side: int = 128, limit: int | None = None) -> Path:
    """Write ``gallery.html`` + ``gallery/`` thumbnails: one row per candidate pair, with a mark box.

    File names are pair numbers (never ids or URLs); every text is HTML-escaped.
    """
    shown = pairs if limit is None else pairs.slice(0, limit)
    thumbs = out_dir / GALLERY_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    rows = []
    e = html.escape
    for k, p in enumerate(shown.to_pylist()):
        cells = []
        for side_name, key in (("a", S.ADDED_ID), ("r", S.REFERENCE_ID)):
            jpeg = _thumb(images.get(p[key]), thumb_side)
            if jpeg is None:
                cells.append("<td>(image unavailable)</td>")
                continue
            name = f"{k:06d}{side_name}.jpg"
            (thumbs / name).write_bytes(jpeg)
            cells.append(f'<td><img src="{GALLERY_DIR}/{name}" alt="{side_name}{k}"></td>')
        attrs = " ".join(f'data-{n}="{e(str(v))}"' for n, v in
                         (("added", p[S.ADDED_ID]), ("reference", p[S.REFERENCE_ID]),
                          ("split", p[S.SPLIT]), ("distance", p[S.DISTANCE])))
        rows.append(
            f'<tr id="pair-{k}"><td>{k}</td>{cells[0]}{cells[1]}<td><b>{p[S.DISTANCE]}</b></td>'
            f'<td>{e(str(p[S.SPLIT]))}</td><td class="meta">added {e(str(p[S.ADDED_ID]))} '
            f'(label {e(str(p[S.ADDED_LABEL]))}, {e(str(p[S.METHOD]))})<br>reference '
            f'{e(str(p[S.REFERENCE_ID]))} (label {e(str(p[S.REFERENCE_LABEL]))})</td>'
            f'<td><input type="checkbox" class="dup" {attrs} onchange="update(this)"></td></tr>')
    head = (f"<p>{summary['pairs']} candidate pairs (pHash distance &lt; {summary['radius']}) for "
            f"{summary['n_added']} added images against {summary['n_reference']} reference images; "
            f"showing {shown.num_rows}, closest first. Tick the pairs that are the same image, then "
            f"export.</p>")
    doc = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Leakage audit</title>"
           f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body><h1>Leakage audit</h1>{head}"
           f"<p><button onclick=\"exportMarked()\">Export marked pairs as JSON</button> "
           f"marked: <span id=\"count\">0</span></p><textarea id=\"out\" rows=\"4\" cols=\"80\" "
           f"readonly></textarea><table><tr><th>#</th><th>added</th><th>reference</th><th>distance</th>"
           f"<th>split</th><th>ids</th><th>true duplicate?</th></tr>{''.join(rows)}</table></body></html>")
    return write_text_atomic(doc, out_dir / GALLERY)


# ---- the stage -------------------------------------------------------------------------------

def run(cfg: Config, dataset: Artifact, added: Sequence[Artifact]) -> Artifact:
    """Audit ``added`` against the held-out splits of ``dataset`` (stage ``audit``).

    Args:
        cfg: the whole config; reads ``audit`` and the hashing settings of ``dedup``.
        dataset: the dataset artifact (``images`` with ``split``).
        added: added-image artifacts (typically the dedup output).
    """
    from raugment.lib.hashing import image_files

    added = list(added)
    if not added:
        raise ValueError("audit.run needs at least one added-image artifact")
    for a in [dataset, *added]:
        if not image_files(a):
            raise ValueError(f"{a.path} has no images table")
    section = {**to_dict(cfg.audit), "hash_side": cfg.dedup.hash_side}  # hashes depend on it too
    audit = cfg.audit

    def body(run: StageRun) -> None:
        add = _hashed(added, ADDED_COLUMNS, cfg)
        ref = _hashed([dataset], REFERENCE_COLUMNS, cfg, splits=audit.splits)
        pairs = find_candidates(add, ref, audit.radius)
        run.write_single(pairs, PAIRS_TABLE)
        summary = summarize(pairs, add, ref, audit.splits, audit.radius)
        write_text_atomic(json.dumps(summary, indent=2, sort_keys=True), run.path / SUMMARY)
        shown = pairs.slice(0, audit.gallery_limit)
        ids = set(shown.column(S.ADDED_ID).to_pylist()) | set(shown.column(S.REFERENCE_ID).to_pylist())
        images = fetch_images([*added, dataset], ids)
        write_gallery(run.path, shown, images, summary, audit.thumb_side)
        run.stats.add("added", add.num_rows)
        run.stats.add("reference", ref.num_rows)
        run.stats.add("pairs", pairs.num_rows)
        run.stats.add("added_with_candidate", summary["added_with_candidate"])
        run.stats.extra["leakage_rate"] = summary["leakage_rate"]
        run.stats.extra["candidate_rate"] = summary["candidate_rate"]
        log.info("audit: %d candidate pairs; test leakage rate %s", pairs.num_rows, summary["leakage_rate"])

    inputs = {"dataset": dataset, **{f"added{i}": a for i, a in enumerate(added)}}
    return run_stage(cfg.run.root, STAGE, section, inputs, body)
