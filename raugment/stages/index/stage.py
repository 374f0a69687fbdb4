"""Stage "index": a local CLIP kNN index (faiss) + Parquet metadata over a captioned image pool.

Built from (a) captioned images — a Parquet file/directory with url, caption and image bytes, or a
folder of images with ``<name>.txt`` captions — whose CLIP image embeddings are computed on a
leased Ray actor pool (``cluster.POOLS``), or (b) embeddings already computed in LAION's published
layout (``img_emb/*.npy`` + ``metadata/*.parquet``). The output directory holds::

    index.faiss        faiss index over L2-normalised embeddings, inner product = cosine
    embeddings.npy     the embeddings themselves (float16), row i = faiss id i
    metadata.parquet   schema.INDEX_METADATA, row i = faiss id i
    index_info.json    CLIP model that made the embeddings, dim, size, index type

Why faiss directly and not clip-retrieval/autofaiss: neither installs beside Ray 2.60 (they pin
numpy<2 and pyarrow<16; Ray 2.60 needs pyarrow>=17); faiss-cpu does, and faiss-gpu takes the same calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raugment.config import Config
from raugment.core import schema
from raugment.core.config import ConfigError, InputError
from raugment.core.extras import require
from raugment.core.storage import Artifact, StageRun, read_parquet, run_stage
from raugment.lib.knn_index import EMBEDDINGS_FILE, INDEX_FILE, INFO_FILE, METADATA
from raugment.stages.index.config import IndexConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# LAION / img2dataset column spellings -> ours
_ALIASES = {
    schema.URL: ("url", "URL"),
    schema.CAPTION: ("caption", "TEXT", "text"),
    schema.AESTHETIC_SCORE: ("aesthetic_score", "aesthetic", "AESTHETIC_SCORE"),
    schema.NSFW_SCORE: ("nsfw_score", "punsafe", "NSFW"),
    schema.POOL_LABEL: ("pool_label",),
}
_NSFW_TAGS = {"UNLIKELY": 0.0, "UNSURE": 0.5, "NSFW": 1.0}


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


def _parquet_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.parquet"))


def normalise_metadata(table: pa.Table) -> pa.Table:
    """Map LAION/img2dataset/pool column names onto ``schema.INDEX_METADATA``."""
    n = table.num_rows
    cols: dict[str, Any] = {}
    for ours, names in _ALIASES.items():
        found = next((c for c in names if c in table.column_names), None)
        if found is None:
            cols[ours] = pa.nulls(n, schema.INDEX_METADATA.field(ours).type)
            continue
        col = table.column(found)
        if ours == schema.NSFW_SCORE and pa.types.is_string(col.type):
            col = pa.array([_NSFW_TAGS.get(v) if v is not None else None for v in col.to_pylist()],
                           pa.float32())
        cols[ours] = col.cast(schema.INDEX_METADATA.field(ours).type)
    if cols[schema.URL].null_count == n:
        raise ValueError("the index source has no url column (expected 'url' or 'URL')")
    return pa.table(cols, schema=schema.INDEX_METADATA)


def read_captioned_images(path: str | Path) -> pa.Table:
    """A Parquet file/directory of captioned images, or a folder of images + ``.txt`` captions.

    Returns a table with the ``schema.INDEX_METADATA`` columns plus ``image`` bytes. Folder images
    get their path relative to the folder as url.
    """
    p = Path(path)
    files = _parquet_files(p) if (p.is_file() or any(p.glob("*.parquet"))) else []
    if files:
        table = pa.concat_tables([read_parquet(f, fix="replace or remove that file under index.path")
                                  for f in files], promote_options="default")
        if schema.IMAGE not in table.column_names:
            raise ValueError(f"{path}: no '{schema.IMAGE}' column of image bytes; for precomputed "
                             "embeddings use index.source=embeddings")
        return normalise_metadata(table).append_column(schema.IMAGE, table.column(schema.IMAGE))
    images = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{path} holds neither Parquet files nor images")
    rows = []
    for f in images:
        txt = f.with_suffix(".txt")
        rows.append({schema.URL: str(f.relative_to(p)), schema.CAPTION: _read_caption(txt)})
    meta = normalise_metadata(pa.Table.from_pylist(rows))
    return meta.append_column(schema.IMAGE, pa.array([f.read_bytes() for f in images], pa.binary()))


def _read_caption(txt: Path) -> str | None:
    """The UTF-8 caption beside an image (None without one); other encodings are named, not guessed."""
    if not txt.exists():
        return None
    try:
        return txt.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InputError(f"index.path: caption file {txt} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                         "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def read_laion_embeddings(path: str | Path) -> tuple[np.ndarray, pa.Table]:
    """LAION layout: ``img_emb/*.npy`` + ``metadata/*.parquet``, shards matched by sorted order."""
    p = Path(path)
    embs = sorted((p / "img_emb").glob("*.npy"))
    metas = sorted((p / "metadata").glob("*.parquet"))
    if not embs or len(embs) != len(metas):
        raise ValueError(f"{path}: expected img_emb/*.npy and as many metadata/*.parquet shards, found "
                         f"{len(embs)} and {len(metas)}")
    arrays, tables = [], []
    for e, m in zip(embs, metas):
        arr, tab = np.load(e, mmap_mode="r"), read_parquet(m, fix="replace that metadata shard")
        if len(arr) != tab.num_rows:
            raise ValueError(f"{e.name} has {len(arr)} embeddings but {m.name} has {tab.num_rows} rows")
        arrays.append(np.asarray(arr, dtype=np.float32))
        tables.append(normalise_metadata(tab))
    return np.concatenate(arrays), pa.concat_tables(tables)


def source_key(path: str | Path) -> str:
    """A key of the source files (names, sizes, mtimes) so a changed pool gives a new index."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Embedding (a leased actor pool) and building
# --------------------------------------------------------------------------------------------


class ImageEmbedder:
    """The object an index actor hosts: CLIP loaded once; encoded images -> embeddings (NaN rows if undecodable)."""

    def __init__(self, model: str, pretrained: str | None, device: str):
        from raugment.models.clip import load_clip

        self.encoder = load_clip(model, pretrained, device)

    def embed(self, images: list[bytes]) -> np.ndarray:
        from raugment.core.imageio import ImageDecodeError, decode_image

        decoded, ok = [], []
        for data in images:
            try:
                decoded.append(decode_image(data))
                ok.append(True)
            except ImageDecodeError:
                ok.append(False)
        emb = np.full((len(images), self.encoder.dim), np.nan, dtype=np.float32)
        if decoded:
            emb[np.asarray(ok)] = self.encoder.embed_images(decoded)
        return emb


def embed_images_ray(images: pa.Array, cfg: IndexConfig) -> np.ndarray:
    """CLIP image embeddings of encoded ``images`` on a leased actor pool (``index.pool``; row order kept).

    Inside a study the actors come from (and go back to) the study's idle pools, so the CLIP
    import is paid once per study.
    """
    from raugment.runtime.cluster import POOLS

    with POOLS.lease(ImageEmbedder, cfg.pool, cfg.clip_model, cfg.clip_pretrained, cfg.device,
                     name="index", key="index.pool") as group:
        parts = list(group.map("embed", group.batches(images.to_pylist())))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def build_faiss_index(embeddings: np.ndarray, index_type: str = "Flat") -> Any:
    """An inner-product faiss index over ``embeddings`` (trained first when the type needs it)."""
    faiss = require("faiss")
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.index_factory(emb.shape[1], index_type, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(emb)
    index.add(emb)
    return index


def write_index(out: Path, embeddings: np.ndarray, metadata: pa.Table, cfg: IndexConfig) -> dict[str, Any]:
    """Write the four index files into ``out``; returns the info dict."""
    faiss = require("faiss")
    from raugment.core.storage import write_parquet_atomic

    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(build_faiss_index(embeddings, cfg.index_type), str(out / INDEX_FILE))
    np.save(out / EMBEDDINGS_FILE, embeddings.astype(np.float16))
    write_parquet_atomic(schema.conform(metadata, schema.INDEX_METADATA), out / f"{METADATA}.parquet")
    info = {"clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained, "dim": int(embeddings.shape[1]),
            "ntotal": len(embeddings), "index_type": cfg.index_type, "metric": "inner_product",
            "source": cfg.source}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def build_index(cfg: IndexConfig, out: str | Path, stats: Any = None,
                table: pa.Table | None = None) -> dict[str, Any]:
    """Build the index of ``cfg.path`` into ``out`` (the pure part of the stage; Ray for images).

    ``table``: the captioned images when the caller has read them already (``read_captioned_images``).
    """
    out = Path(out)
    path = check_config(cfg)
    if cfg.source == "embeddings":
        embeddings, metadata = read_laion_embeddings(path)
    else:
        table = read_captioned_images(path) if table is None else table
        embeddings = embed_images_ray(table.column(schema.IMAGE).combine_chunks(), cfg)
        ok = ~np.isnan(embeddings).any(axis=1)
        if stats is not None and (~ok).sum():
            stats.fail("undecodable_image", int((~ok).sum()))
        metadata = table.drop_columns([schema.IMAGE]).filter(pa.array(ok))
        embeddings = embeddings[ok]
    if len(embeddings) == 0:
        raise ValueError(f"{cfg.path}: nothing to index")
    info = write_index(out, embeddings, metadata, cfg)
    if stats is not None:
        stats.add("indexed", info["ntotal"])
        stats.extra["index"] = info
    log.info("indexed %d items (dim %d, %s) into %s", info["ntotal"], info["dim"], cfg.index_type, out)
    return info


def check_config(cfg: IndexConfig) -> str:
    """Errors naming the key, before any work; ``index.path`` when it is fine."""
    if not cfg.path:
        raise ConfigError("index.path is required: a Parquet file/directory or image folder "
                          "(index.source=images) or a LAION embeddings directory (index.source=embeddings)")
    if not Path(cfg.path).exists():
        raise ConfigError(f"index.path {cfg.path!r} does not exist; point it at the captioned images "
                          "(index.source=images) or the LAION embeddings (index.source=embeddings)")
    return cfg.path


def preflight(cfg: Config) -> None:
    """Checks before a study starts Ray (:func:`check_config`)."""
    check_config(cfg.index)


def run(cfg: Config) -> Artifact:
    """Stage "index": build (or reuse) the local CLIP kNN index of ``cfg.index.path``."""
    from raugment.runtime.cluster import init_ray

    path = check_config(cfg.index)
    inputs = {"source": source_key(path)}
    table = None
    if cfg.index.source == "images" and not StageRun(cfg.run.root, "index", cfg.index, inputs).complete:
        table = read_captioned_images(path)  # input errors before anything is written

    def body(run_: StageRun) -> None:
        if cfg.index.source == "images":  # only image sources need Ray (a skipped stage starts nothing)
            init_ray(cfg.cluster, cfg.run.progress)
        build_index(cfg.index, run_.path, run_.stats, table)

    return run_stage(cfg.run.root, "index", cfg.index, inputs, body)


# --------------------------------------------------------------------------------------------
# Searching
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# clip-retrieval's ``clip back`` layout
# --------------------------------------------------------------------------------------------

CLIP_BACK_INDICES = "indices.json"
CLIP_BACK_COLUMNS = [schema.URL, schema.CAPTION, schema.AESTHETIC_SCORE, schema.NSFW_SCORE, schema.POOL_LABEL]


def export_clip_back(index_dir: str | Path, out: str | Path, name: str = "raugment") -> Path:
    """Write an index in the layout clip-retrieval's ``clip back`` reads; returns the indices JSON.

    ``clip back --indices_paths <out>/indices.json`` loads ``<out>/<name>/image.index`` (a faiss
    index it queries with ``search_and_reconstruct``, so IVF types get a direct map here) and
    ``<out>/<name>/metadata/*.parquet`` (row i = faiss id i, read in sorted file order). The JSON
    names our metadata columns in ``columns_to_return`` so the server returns them under our
    names. The CLIP that embeds text queries is the server's ``--clip_model``; it must be the
    index's model (``index_info.json``), which the caller arranges.
    """
    faiss = require("faiss")
    src, out = Path(index_dir), Path(out)
    if not (src / INDEX_FILE).is_file():
        raise ValueError(f"{src} is not a raugment index (no {INDEX_FILE}); build one with `raugment index build`")
    if not name or "/" in name:
        raise ValueError(f"clip back index name {name!r} must be non-empty and contain no '/'")
    from raugment.core.storage import write_parquet_atomic, write_text_atomic

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    index = faiss.read_index(str(src / INDEX_FILE))
    try:
        index.reconstruct(0)
    except RuntimeError:  # IVF indexes reconstruct only with a direct map
        faiss.extract_index_ivf(index).make_direct_map()
    faiss.write_index(index, str(folder / "image.index"))
    write_parquet_atomic(pq.read_table(src / f"{METADATA}.parquet"), folder / METADATA / "part-00000.parquet")
    spec = {name: {"indice_folder": str(folder.resolve()), "columns_to_return": CLIP_BACK_COLUMNS}}
    path = write_text_atomic(json.dumps(spec, indent=2), out / CLIP_BACK_INDICES)
    log.info("clip back layout of %s written to %s (index %r)", src, out, name)
    return path


def build_outside(cfg: Config, out: str | Path) -> None:
    """``raugment index build --out DIR``: build the ``index`` section's index in ``out``, outside
    the run root (no stage directory; e.g. for ``retrieve.index`` or an export)."""
    from raugment.runtime.cluster import init_ray

    path = check_config(cfg.index)
    table = read_captioned_images(path) if cfg.index.source == "images" else None
    if table is not None:
        init_ray(cfg.cluster, cfg.run.progress)
    build_index(cfg.index, out, table=table)
    log.info("index written to %s", out)
