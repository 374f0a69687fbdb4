"""The local index: LAION-layout and image sources, faiss search, metadata, the stage contract."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raugment.config import from_dict
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.lib.knn_index import open_index
from raugment.stages.index.config import IndexConfig
from raugment.stages.index.stage import build_index, normalise_metadata, run

DIM = 8


def known_embeddings(n_per_class: int = 10, classes: int = 3, seed: int = 0):
    """Items clustered around orthogonal class directions; returns (embeddings, labels, directions)."""
    rng = np.random.default_rng(seed)
    directions = np.eye(DIM, dtype=np.float32)[:classes]
    labels = np.repeat(np.arange(classes), n_per_class)
    emb = directions[labels] + 0.15 * rng.normal(size=(len(labels), DIM)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels, directions


def write_laion_layout(root, emb, labels, shards: int = 2):
    """LAION's published layout: img_emb/img_emb_i.npy + metadata/metadata_i.parquet (LAION columns)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(emb)), shards)):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", emb[part].astype(np.float16))
        pq.write_table(pa.table({
            "url": [f"https://example.org/{j}.jpg" for j in part],
            "caption": [f"item {j} of class {labels[j]}" for j in part],
            "NSFW": ["NSFW" if j % 7 == 0 else "UNLIKELY" for j in part],
            "similarity": [0.3] * len(part),
            "pool_label": [f"c{labels[j]}" for j in part],
        }), root / "metadata" / f"metadata_{i}.parquet")
    return root


@pytest.fixture
def laion_index(tmp_path):
    emb, labels, directions = known_embeddings()
    src = write_laion_layout(tmp_path / "laion", emb, labels)
    cfg = IndexConfig(source="embeddings", path=str(src), clip_model="fake-clip", clip_pretrained=None)
    info = build_index(cfg, tmp_path / "index")
    return tmp_path / "index", info, emb, labels, directions


def test_laion_layout_index_returns_the_known_neighbours(laion_index):
    path, info, emb, labels, directions = laion_index
    assert info["ntotal"] == len(emb) and info["dim"] == DIM and info["clip_model"] == "fake-clip"
    idx = open_index(path)
    scores, ids = idx.search(directions, 10)
    for c in range(len(directions)):
        assert set(labels[ids[c]]) == {c}                      # the 10 nearest are the class's 10 items
        assert np.all(np.diff(scores[c]) <= 1e-6)              # most similar first
    s, i = idx.search(emb[[4, 17]], 1)
    assert list(i[:, 0]) == [4, 17] and np.allclose(s[:, 0], 1.0, atol=2e-3)
    rows = idx.rows([17, 0])
    assert rows[0][schema.URL] == "https://example.org/17.jpg" and rows[0][schema.NSFW_SCORE] == 0.0
    assert rows[1][schema.NSFW_SCORE] == 1.0                   # LAION's "NSFW" tag -> 1.0
    assert rows[0][schema.POOL_LABEL] == f"c{labels[17]}"
    np.testing.assert_allclose(idx.vectors([17])[0], emb[17], atol=2e-3)
    assert idx.search(directions[:1], 10_000)[1].shape == (1, len(emb))   # k capped at the index size
    with pytest.raises(ValueError, match="dim"):
        idx.search(np.ones((1, DIM + 1)), 3)


def test_other_faiss_index_types_answer_too(tmp_path):
    emb, labels, directions = known_embeddings(n_per_class=40)
    src = write_laion_layout(tmp_path / "laion", emb, labels, shards=1)
    build_index(IndexConfig(source="embeddings", path=str(src), index_type="IVF4,Flat"), tmp_path / "ivf")
    idx = open_index(tmp_path / "ivf")
    idx.index.nprobe = 4
    _, ids = idx.search(directions, 5)
    assert all(set(labels[ids[c]]) == {c} for c in range(3))


def test_metadata_aliases_and_errors(tmp_path):
    t = normalise_metadata(pa.table({"URL": ["u"], "TEXT": ["t"], "punsafe": [0.9], "aesthetic": [6.5]}))
    assert t.to_pylist() == [{schema.URL: "u", schema.CAPTION: "t", schema.AESTHETIC_SCORE: 6.5,
                              schema.NSFW_SCORE: pytest.approx(0.9), schema.POOL_LABEL: None}]
    with pytest.raises(ValueError, match="url"):
        normalise_metadata(pa.table({"caption": ["x"]}))
    (tmp_path / "img_emb").mkdir()
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", np.zeros((2, DIM), np.float16))
    with pytest.raises(ValueError, match="metadata"):
        build_index(IndexConfig(source="embeddings", path=str(tmp_path)), tmp_path / "out")
    with pytest.raises(ValueError, match="not a raugment index"):
        open_index(tmp_path)


def test_config_errors_before_work(tmp_path):
    with pytest.raises(ConfigError, match="index.path is required"):
        run(from_dict({"run": {"root": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="does not exist"):
        run(from_dict({"run": {"root": str(tmp_path)}, "index": {"path": str(tmp_path / "nope")}}))


def test_index_stage_embeds_a_captioned_pool_with_ray(ray_session, tmp_path):
    from raugment.demo.corpus import build_corpus, read_corpus
    from raugment.models.clip import load_clip, write_tiny_clip
    from raugment.stages.dataset.sources.synthetic import SYNTHETIC_CLASSES

    pool = build_corpus(tmp_path / "pool", SYNTHETIC_CLASSES[:2], per_class=6, distractors=3, seed=0)
    clip = write_tiny_clip(tmp_path / "clip")
    cfg = from_dict({"run": {"root": str(tmp_path / "runs"), "progress": False},
                     "index": {"path": str(pool / "pool.parquet"), "clip_model": str(clip), "clip_pretrained": None,
                               "device": "cpu", "pool": {"batch_size": 4}}})
    from raugment.runtime.cluster import POOLS, keep_pools

    with keep_pools():                       # in a study the CLIP actor stays for the next stage run
        art = run(cfg)
        assert [len(pids) for pids in POOLS.idle_pids()] == [1]
    assert POOLS.idle_pids() == []
    assert art.complete and art.stats["counts"]["indexed"] == 15
    table = read_corpus(pool)
    meta = art.read("metadata")
    assert meta.column(schema.URL).to_pylist() == table.column(schema.URL).to_pylist()   # row i = faiss id i
    assert meta.column(schema.AESTHETIC_SCORE).to_pylist() == [
        None if v is None else pytest.approx(v) for v in table.column(schema.AESTHETIC_SCORE).to_pylist()]
    # Row order survives the actor pool: each stored vector is that image's own embedding.
    from raugment.core.imageio import decode_image

    enc = load_clip(str(clip))
    direct = enc.embed_images([decode_image(b) for b in table.column(schema.IMAGE).to_pylist()])
    np.testing.assert_allclose(open_index(art.path).vectors(range(15)), direct, atol=3e-3)
    assert run(cfg).path == art.path                                                       # complete key: skipped


def test_export_clip_back_layout_is_what_clip_back_reads(laion_index, tmp_path):
    """indices.json -> <name>/image.index (search_and_reconstruct) + <name>/metadata/*.parquet, row i = faiss id i."""
    import faiss

    from raugment import cli
    from raugment.stages.index.stage import CLIP_BACK_COLUMNS, export_clip_back

    path, _info, _emb, _labels, directions = laion_index
    out = tmp_path / "clip_back"
    assert cli.main(["index", "export-clip-back", "--index", str(path), "--out", str(out), "--name", "pool"]) == 0
    spec = json.loads((out / "indices.json").read_text())
    assert spec == {"pool": {"indice_folder": str((out / "pool").resolve()), "columns_to_return": CLIP_BACK_COLUMNS}}
    served = faiss.read_index(str(out / "pool" / "image.index"))
    _, ids, recon = served.search_and_reconstruct(directions, 5)     # the call clip back makes
    want = open_index(path)
    np.testing.assert_array_equal(ids, want.search(directions, 5)[1])
    np.testing.assert_allclose(recon[0], want.vectors(ids[0]), atol=2e-3)
    meta = pq.read_table(sorted((out / "pool" / "metadata").glob("*.parquet"))[0]).to_pylist()
    assert [meta[i] for i in ids[1]] == want.rows(ids[1])
    # IVF types reconstruct only with a direct map, which the export adds.
    emb40, labels40, _ = known_embeddings(n_per_class=40)
    build_index(IndexConfig(source="embeddings", path=str(write_laion_layout(tmp_path / "l40", emb40, labels40, 1)),
                            index_type="IVF4,Flat"), tmp_path / "ivf")
    export_clip_back(tmp_path / "ivf", tmp_path / "ivf_out")
    ivf = faiss.read_index(str(tmp_path / "ivf_out" / "raugment" / "image.index"))
    np.testing.assert_allclose(ivf.reconstruct(7), open_index(tmp_path / "ivf").vectors([7])[0], atol=2e-3)
    with pytest.raises(ValueError, match="not a raugment index"):
        export_clip_back(tmp_path, tmp_path / "x")
    with pytest.raises(ValueError, match="no '/'"):
        export_clip_back(path, tmp_path / "x", name="a/b")
    assert cli.main(["index", "export-clip-back", "--out", str(tmp_path / "y")]) == 2   # no index named
