"""Column names and one Arrow schema per artifact.

Every stage reads and writes through these names, so a rename happens here once. Image rows carry
their provenance (DESIGN section 2): where an image came from, how it was made, and which filters
it passed. Method-specific provenance (scheduler, steps, guidance, conditioning artifact, ...) goes
into the ``params`` column as a JSON object.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa

# ---- image columns -------------------------------------------------------------------------
ID = "id"                      # stable per-item id: class, method, index, seed (or URL hash)
LABEL = "label"                # integer class index into the dataset's class table
CLASS_ID = "class_id"          # WordNet synset id ("n01440764") or folder name
CLASS_NAME = "class_name"      # "tench, Tinca tinca"
SPLIT = "split"                # train / val / test / unused / added
SOURCE = "source"              # original / generated / retrieved
METHOD = "method"              # simple, clip_templates, retrieval, boomerang, ...
PROMPT = "prompt"
SEED = "seed"
MODEL_ID = "model_id"
MODEL_REVISION = "model_revision"
URL = "url"
CAPTION = "caption"
RANK = "rank"                  # rank among a class's candidates (0 = most similar / first made)
CLIP_SIMILARITY = "clip_similarity"
AESTHETIC_SCORE = "aesthetic_score"
NSFW_SCORE = "nsfw_score"
PHASH = "phash"                # 64-bit perceptual hash, stored as int64 (two's complement)
IMAGE = "image"                # encoded bytes (JPEG/PNG/WEBP)
WIDTH = "width"
HEIGHT = "height"
FILTERS = "filters"            # names of the filters the row passed
PARAMS = "params"              # JSON object with method-specific provenance

SPLITS = ("train", "val", "test", "unused", "added")
SOURCES = ("original", "generated", "retrieved")

IMAGES = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLASS_ID, pa.string()),
    pa.field(CLASS_NAME, pa.string()),
    pa.field(SPLIT, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field(METHOD, pa.string()),
    pa.field(PROMPT, pa.string()),
    pa.field(SEED, pa.int64()),
    pa.field(MODEL_ID, pa.string()),
    pa.field(MODEL_REVISION, pa.string()),
    pa.field(URL, pa.string()),
    pa.field(CAPTION, pa.string()),
    pa.field(RANK, pa.int32()),
    pa.field(CLIP_SIMILARITY, pa.float32()),
    pa.field(AESTHETIC_SCORE, pa.float32()),
    pa.field(NSFW_SCORE, pa.float32()),
    pa.field(PHASH, pa.int64()),
    pa.field(IMAGE, pa.binary()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(FILTERS, pa.list_(pa.string())),
    pa.field(PARAMS, pa.string()),
])

# ---- classes table (dataset stage) ---------------------------------------------------------
HYPERNYM = "hypernym"
DEFINITION = "definition"
COUNT_TRAIN = "n_train"

CLASSES = pa.schema([
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLASS_ID, pa.string(), nullable=False),
    pa.field(CLASS_NAME, pa.string(), nullable=False),
    pa.field(HYPERNYM, pa.string()),
    pa.field(DEFINITION, pa.string()),
    pa.field(COUNT_TRAIN, pa.int32()),
])

# ---- prompts table (generation input) ------------------------------------------------------
INDEX = "index"                # index of the image within its class and method
PROMPTS = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLASS_ID, pa.string()),
    pa.field(CLASS_NAME, pa.string()),
    pa.field(METHOD, pa.string()),
    pa.field(INDEX, pa.int32()),
    pa.field(PROMPT, pa.string()),
    pa.field(SEED, pa.int64()),
    pa.field(PARAMS, pa.string()),
])

# ---- failures / dropped items (any stage) --------------------------------------------------
REASON = "reason"              # why an item failed or was dropped ("http_404", "nsfw", ...)
DETAIL = "detail"
FAILURES = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(LABEL, pa.int32()),
    pa.field(URL, pa.string()),
    pa.field(REASON, pa.string(), nullable=False),
    pa.field(DETAIL, pa.string()),
])

# ---- manifests (assemble, resampled sets): ids, never image copies --------------------------
ARTIFACT = "artifact"          # stage directory (relative to the run root) that holds the image
SET_INDEX = "set_index"
MANIFEST = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(SOURCE, pa.string()),
    pa.field(METHOD, pa.string()),
    pa.field(ARTIFACT, pa.string()),
    pa.field(SET_INDEX, pa.int32()),
])

# ---- per-class evaluation results -----------------------------------------------------------
ACC_TOP1 = "top1"
ACC_TOP5 = "top5"
N_TEST = "n_test"
RESULTS_PER_CLASS = pa.schema([
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLASS_NAME, pa.string()),
    pa.field(N_TEST, pa.int32()),
    pa.field(ACC_TOP1, pa.float64()),
    pa.field(ACC_TOP5, pa.float64()),
])

SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES,
    "classes": CLASSES,
    "prompts": PROMPTS,
    "failures": FAILURES,
    "manifest": MANIFEST,
    "results_per_class": RESULTS_PER_CLASS,
}


def get_schema(name: str) -> pa.Schema:
    """The Arrow schema of an artifact kind; a clear error for unknown names."""
    try:
        return SCHEMAS[name]
    except KeyError:
        raise ValueError(f"unknown artifact schema {name!r}; known: {', '.join(SCHEMAS)}") from None


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema | str = IMAGES) -> pa.Table:
    """Rows (dicts) -> a Table of ``schema``. Missing columns become nulls; unknown keys are errors.

    ``params`` given as a dict is serialised to JSON.
    """
    schema = get_schema(schema) if isinstance(schema, str) else schema
    rows = list(rows)
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"columns {sorted(extra)} are not in the schema; add them to schema.py")
    columns = {}
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if f.name == PARAMS:
            values = [json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in values]
        columns[f.name] = pa.array(values, type=f.type)
    return pa.table(columns, schema=schema)


def conform(table: pa.Table, schema: pa.Schema | str = IMAGES) -> pa.Table:
    """Reorder/cast ``table`` to ``schema``, adding missing nullable columns as nulls."""
    schema = get_schema(schema) if isinstance(schema, str) else schema
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns {sorted(extra)} are not in the schema; add them to schema.py")
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, type=f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def phash_to_int64(value: int) -> int:
    """Unsigned 64-bit hash -> signed int64 for Arrow storage."""
    return value - (1 << 64) if value >= (1 << 63) else value


def int64_to_phash(value: int) -> int:
    """Signed int64 from storage -> unsigned 64-bit hash."""
    return value + (1 << 64) if value < 0 else value
