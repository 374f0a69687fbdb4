"""Column names and one Arrow schema per artifact.

Every stage reads and writes through these names, so a rename happens here once. Image rows carry
their provenance: where an image came from, how it was made, and which filters
it passed. Method-specific provenance (scheduler, steps, guidance, conditioning artifact, ...) goes
into the ``params`` column as a JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

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

# ---- dropped items (filter, dedup): why each added image left --------------------------------
SCORE = "score"                # the score that decided the drop (NSFW score, aesthetic score, ...)
DUPLICATE_OF = "duplicate_of"  # dedup: id of the kept copy this near-duplicate was dropped for
DISTANCE = "distance"          # Hamming distance between two pHashes
DROPPED = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(LABEL, pa.int32()),
    pa.field(CLASS_NAME, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field(METHOD, pa.string()),
    pa.field(RANK, pa.int32()),
    pa.field(REASON, pa.string(), nullable=False),
    pa.field(DETAIL, pa.string()),
    pa.field(SCORE, pa.float32()),
    pa.field(DUPLICATE_OF, pa.string()),
    pa.field(DISTANCE, pa.int32()),
])

# ---- leakage audit: candidate pairs (added image, reference image of a held-out split) -------
ADDED_ID = "added_id"
REFERENCE_ID = "reference_id"
ADDED_LABEL = "added_label"
REFERENCE_LABEL = "reference_label"
PAIRS = pa.schema([
    pa.field(ADDED_ID, pa.string(), nullable=False),
    pa.field(REFERENCE_ID, pa.string(), nullable=False),
    pa.field(SPLIT, pa.string(), nullable=False),      # the reference image's split
    pa.field(DISTANCE, pa.int32(), nullable=False),
    pa.field(ADDED_LABEL, pa.int32()),
    pa.field(REFERENCE_LABEL, pa.int32()),
    pa.field(SOURCE, pa.string()),                     # of the added image
    pa.field(METHOD, pa.string()),                     # of the added image
])

# ---- retrieval: index metadata, candidates, downloads, the demo pool ------------------------
POOL_LABEL = "pool_label"      # hidden true class of a pool image (demo/test pools: precision@n)
STATUS = "status"              # candidate outcome: "selected" or "dropped"
K = "k"                        # the k of the kNN round that first returned a candidate
CONTENT_HASH = "content_hash"  # sha256 of the downloaded bytes (exact de-duplication)
NUM_BYTES = "num_bytes"
ATTEMPTS = "attempts"
FAULT = "fault"                # demo pool: how the test server misbehaves for this URL ("" = serves it)
INDEX_METADATA = pa.schema([   # row i describes faiss id i
    pa.field(URL, pa.string()),
    pa.field(CAPTION, pa.string()),
    pa.field(AESTHETIC_SCORE, pa.float32()),
    pa.field(NSFW_SCORE, pa.float32()),
    pa.field(POOL_LABEL, pa.string()),
])
CANDIDATES = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLASS_NAME, pa.string()),
    pa.field(PROMPT, pa.string()),
    pa.field(RANK, pa.int32(), nullable=False),
    pa.field(K, pa.int32()),
    pa.field(CLIP_SIMILARITY, pa.float32()),
    pa.field(URL, pa.string()),
    pa.field(CAPTION, pa.string()),
    pa.field(AESTHETIC_SCORE, pa.float32()),
    pa.field(NSFW_SCORE, pa.float32()),
    pa.field(POOL_LABEL, pa.string()),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(REASON, pa.string()),
    pa.field(DETAIL, pa.string()),
])
DOWNLOADS = pa.schema([        # one row per download attempt outcome; reason null = success
    pa.field(ID, pa.string(), nullable=False),
    pa.field(URL, pa.string(), nullable=False),
    pa.field(REASON, pa.string()),
    pa.field(DETAIL, pa.string()),
    pa.field(ATTEMPTS, pa.int32()),
    pa.field(NUM_BYTES, pa.int64()),
    pa.field(CONTENT_HASH, pa.string()),
    pa.field(IMAGE, pa.binary()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
])
POOL = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(URL, pa.string(), nullable=False),
    pa.field(CAPTION, pa.string()),
    pa.field(POOL_LABEL, pa.string()),
    pa.field(AESTHETIC_SCORE, pa.float32()),
    pa.field(NSFW_SCORE, pa.float32()),
    pa.field(FAULT, pa.string()),
    pa.field(IMAGE, pa.binary()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
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

# ---- training: per-epoch history and run results (train, repeats, tune) --------------------
EPOCH = "epoch"
LR = "lr"
TRAIN_LOSS = "train_loss"
VAL_TOP1 = "val_top1"
VAL_TOP5 = "val_top5"
TRAIN_IMAGES = "train_images"
EPOCH_S = "epoch_s"             # whole epoch: training + validation
TRAIN_S = "train_s"             # training phase of the epoch only
HISTORY = pa.schema([
    pa.field(EPOCH, pa.int32(), nullable=False),
    pa.field(LR, pa.float64()),
    pa.field(TRAIN_LOSS, pa.float64()),
    pa.field(VAL_TOP1, pa.float64()),
    pa.field(VAL_TOP5, pa.float64()),
    pa.field(TRAIN_IMAGES, pa.int64()),
    pa.field(EPOCH_S, pa.float64()),
    pa.field(TRAIN_S, pa.float64()),
])
# results.json keys of a train run (also the metric columns of repeats and tune tables)
VAL_TOP1_BEST = "val_top1_best"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
TEST_TOP1 = "test_top1"
TEST_TOP5 = "test_top5"
IMAGES_PER_S = "images_per_s"
TRIAL_ID = "trial_id"
RUN_PATH = "path"
BASELINE_TOP1 = "baseline_top1"  # per-class improvement table (Fig. 5A)
IMPROVEMENT = "improvement"

# ---- study index (one row per classifier of a study) ----------------------------------------
DATASET = "dataset"            # name of the study's dataset ("default" for a one-dataset study)
RATIO = "ratio"                # augmentation ratio in percent (0 for the baseline)
ARTIFACTS = "artifacts"        # JSON: role (train, assemble, source, filter, ...) -> stage dir
STUDY_RUNS = pa.schema([
    pa.field(DATASET, pa.string(), nullable=False),
    pa.field(METHOD, pa.string(), nullable=False),
    pa.field(RATIO, pa.float64(), nullable=False),
    pa.field(SET_INDEX, pa.int32(), nullable=False),
    pa.field(SEED, pa.int64()),
    pa.field(ARTIFACTS, pa.string(), nullable=False),
])

# ---- shortfalls (assemble): classes whose added pool cannot fill their quota -----------------
NEED = "need"                  # added images the class needs (at the ratio checked)
AVAILABLE = "available"        # images its pool holds (after leakage removal)
ACTION = "action"              # what the shortfall policy did: excluded / allowed / failed
SHORTFALLS = pa.schema([
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLASS_NAME, pa.string()),
    pa.field(METHOD, pa.string()),
    pa.field(RATIO, pa.float64()),
    pa.field(NEED, pa.int32()),
    pa.field(AVAILABLE, pa.int32()),
    pa.field(ACTION, pa.string()),
])

# ---- fine-tuning (finetune stage): learned rows, training items, checkpoints -------------
CLUSTER = "cluster"            # k-means cluster of an image within its class (0 = no clustering)
COND_ROW = "cond_row"          # row of a learned conditioning / pseudo-word table
N_IMAGES = "n_images"          # training images behind a learned row (clusters are drawn by it)
TOKEN = "token"                # a class's pseudo-word ("<raug-12>"); "" for conditioning methods
CHECKPOINT = "checkpoint"      # checkpoint name: best_train, best_val, epoch_001, ...
VAL_LOSS = "val_loss"
SNAPSHOT = "snapshot"          # snapshot directory of a checkpoint, relative to its artifact
CONDITIONINGS = pa.schema([
    pa.field(COND_ROW, pa.int32(), nullable=False),
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLASS_NAME, pa.string()),
    pa.field(CLUSTER, pa.int32(), nullable=False),
    pa.field(N_IMAGES, pa.int32()),
    pa.field(TOKEN, pa.string()),
])
FINETUNE_ITEMS = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(LABEL, pa.int32(), nullable=False),
    pa.field(CLUSTER, pa.int32(), nullable=False),
    pa.field(COND_ROW, pa.int32(), nullable=False),
    pa.field(SPLIT, pa.string()),      # "train" or "val" (held out for the validation loss)
])
CHECKPOINTS = pa.schema([
    pa.field(CHECKPOINT, pa.string(), nullable=False),
    pa.field(EPOCH, pa.int32(), nullable=False),
    pa.field(TRAIN_LOSS, pa.float64()),
    pa.field(VAL_LOSS, pa.float64()),
    pa.field(SNAPSHOT, pa.string()),
])

SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES,
    "classes": CLASSES,
    "prompts": PROMPTS,
    "failures": FAILURES,
    "manifest": MANIFEST,
    "shortfalls": SHORTFALLS,
    "results_per_class": RESULTS_PER_CLASS,
    "index_metadata": INDEX_METADATA,
    "candidates": CANDIDATES,
    "downloads": DOWNLOADS,
    "pool": POOL,
    "dropped": DROPPED,
    "pairs": PAIRS,
    "history": HISTORY,
    "study_runs": STUDY_RUNS,
    "conditionings": CONDITIONINGS,
    "finetune_items": FINETUNE_ITEMS,
    "checkpoints": CHECKPOINTS,
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
