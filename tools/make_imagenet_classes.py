"""Generate ``raugment/data/imagenet_classes.tsv`` from WordNet 3.0 database files (run once).

Sources (both install from package registries, nothing from the model hub):

* The 1000 ILSVRC-2012 synset ids in the standard sorted order (label 0 = n01440764): a text file
  with one id per line, or a wheel that ships one. timm ships ``timm/data/_info/imagenet_synsets.txt``;
  ``pip download --no-deps timm -d /tmp/timm`` fetches the wheel without installing it.
* WordNet 3.0 ``data.noun``: Debian's ``wordnet-base`` (``apt-get install wordnet-base``) installs it
  as ``/usr/share/wordnet/data.noun``. ImageNet synset ids are WordNet 3.0 noun offsets, and a
  synset's line starts at exactly that byte offset.

Usage::

    python tools/make_imagenet_classes.py --synsets /tmp/timm/timm-*.whl \
        --data-noun /usr/share/wordnet/data.noun --out raugment/data/imagenet_classes.tsv

Output columns (tab-separated, header line first, label = row index):
``class_id`` (synset id), ``name`` (all lemmas of the synset, underscores -> spaces, joined by
", "), ``hypernym`` (the first lemma of the first hypernym, ``@`` or instance ``@i`` pointer), and
``definition`` (the WordNet gloss without its quoted examples).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

SYNSETS_IN_WHEEL = "timm/data/_info/imagenet_synsets.txt"
HEADER = ("class_id", "name", "hypernym", "definition")


def read_synset_ids(path: Path) -> list[str]:
    """Synset ids, one per line, from a text file or from ``SYNSETS_IN_WHEEL`` inside a wheel."""
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as zf:
            text = zf.read(SYNSETS_IN_WHEEL).decode()
    else:
        text = path.read_text()
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if len(ids) != 1000 or len(set(ids)) != 1000:
        raise SystemExit(f"{path}: expected 1000 unique synset ids, found {len(ids)} ({len(set(ids))} unique)")
    if ids != sorted(ids):
        raise SystemExit(f"{path}: synset ids are not in the standard sorted order")
    return ids


def parse_data_line(line: str) -> tuple[list[str], list[tuple[str, int]], str]:
    """One ``data.noun`` line -> (lemmas, pointers as (symbol, offset), gloss).

    Format (wndb(5WN)): ``offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt
    [symbol offset pos source/target]... | gloss``.
    """
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    w_cnt = int(fields[3], 16)
    words = [fields[4 + 2 * i] for i in range(w_cnt)]
    pos = 4 + 2 * w_cnt
    p_cnt = int(fields[pos])
    pointers = []
    for i in range(p_cnt):
        symbol, offset = fields[pos + 1 + 4 * i], fields[pos + 2 + 4 * i]
        pointers.append((symbol, int(offset)))
    return [w.replace("_", " ") for w in words], pointers, gloss.strip()


def definition_of(gloss: str) -> str:
    """The gloss before its first quoted example (``definition; "example"``)."""
    cut = gloss.find('"')
    text = gloss[:cut] if cut >= 0 else gloss
    return text.strip().rstrip(";").strip()


def read_at(data: bytes, offset: int) -> str:
    end = data.index(b"\n", offset)
    line = data[offset:end].decode()
    if not line.startswith(f"{offset:08d} "):
        raise SystemExit(f"data.noun has no synset at offset {offset:08d}: is it WordNet 3.0?")
    return line


def build_rows(ids: list[str], data: bytes) -> list[tuple[str, str, str, str]]:
    rows = []
    for sid in ids:
        lemmas, pointers, gloss = parse_data_line(read_at(data, int(sid[1:])))
        hyper = next((off for sym, off in pointers if sym in ("@", "@i")), None)
        hypernym = parse_data_line(read_at(data, hyper))[0][0] if hyper is not None else ""
        row = (sid, ", ".join(lemmas), hypernym, definition_of(gloss))
        if any("\t" in v or "\n" in v for v in row):
            raise SystemExit(f"{sid}: a field holds a tab or newline")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synsets", type=Path, required=True, help="synset id list (.txt) or a timm wheel")
    parser.add_argument("--data-noun", type=Path, default=Path("/usr/share/wordnet/data.noun"))
    parser.add_argument("--out", type=Path, default=Path("raugment/data/imagenet_classes.tsv"))
    args = parser.parse_args(argv)
    rows = build_rows(read_synset_ids(args.synsets), args.data_noun.read_bytes())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join("\t".join(r) for r in [HEADER, *rows]) + "\n")
    sys.stderr.write(f"wrote {len(rows)} classes to {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
