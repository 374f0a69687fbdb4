"""The bad-input sweep: malformed configs and inputs each give one clear error, before Ray starts.

Each case runs ``raugment run`` (or a stage command) in-process on a tiny ImageFolder study with
``init_ray`` replaced by a tripwire, and checks: exit code 2, a message naming the key or the file
(and, through the fragment, the fix), that Ray was never started, and that the run root holds no
incomplete stage directory. A valid config reaches the tripwire (the control), so the checks do
not pass by failing everything.

``pytest tests/test_bad_inputs.py -s`` prints every case with its message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raugment import cli
from raugment.core.storage import SUCCESS, Artifact
from tests.helpers.studies import RayStarted, make_folder, valid_study


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A valid study: tiny ImageFolder, a stand-in diffusers directory, and its YAML."""
    return valid_study(tmp_path_factory.mktemp("bad_inputs"), ["simple", "retrieval", "ft_conditioning"])


def _stage_dirs(root: Path) -> dict[str, bool]:
    """Every ``<stage>/<key>`` directory under a run root -> whether it is complete."""
    if not root.is_dir():
        return {}
    return {str(d.relative_to(root)): (d / SUCCESS).exists()
            for stage in root.iterdir() if stage.is_dir() and not stage.name.startswith("_")
            for d in stage.iterdir() if d.is_dir()}


def run_cli(argv: list[str], root: Path, capsys) -> tuple[int, str]:
    """Run the CLI; return (exit code, stderr); assert nothing incomplete was left in ``root``."""
    before = _stage_dirs(root)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    after = _stage_dirs(root)
    new_incomplete = [d for d, ok in after.items() if not ok and d not in before]
    assert not new_incomplete, f"left incomplete stage directories {new_incomplete}"
    assert not (set(after) - set(before)) or all(after[d] for d in set(after) - set(before))
    return rc, err


# ---- the control -------------------------------------------------------------------------------


def test_valid_study_passes_preflight_and_reaches_ray(world, tripwire, tmp_path):
    with pytest.raises(RayStarted):
        cli.main(["run", str(world["study"]), "--set", f"run.root={tmp_path / 'ok'}"])
    # the dataset stage (no Ray) finished before the tripwire
    assert any(d.startswith("dataset/") and ok for d, ok in _stage_dirs(tmp_path / "ok").items())


# ---- cases: (id, extra --set overrides, a setup(world, tmp) -> more overrides, message fragments) --

Setup = Callable[[dict, Path], list[str]]


def _garbage_file(world: dict, tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def _index_dir(tmp: Path, *, faiss_bytes: bytes | None = None, metadata: pa.Table | None = None) -> Path:
    """A real small index directory, optionally with a damaged faiss file or metadata."""
    import faiss

    d = tmp / "idx"
    d.mkdir()
    emb = np.eye(4, 8, dtype=np.float32)
    if faiss_bytes is None:
        index = faiss.IndexFlatIP(8)
        index.add(emb)
        faiss.write_index(index, str(d / "index.faiss"))
    else:
        (d / "index.faiss").write_bytes(faiss_bytes)
    np.save(d / "embeddings.npy", emb.astype(np.float16))
    meta = metadata if metadata is not None else pa.table({"url": [f"u{i}" for i in range(4)],
                                                           "caption": [f"c{i}" for i in range(4)]})
    pq.write_table(meta, d / "metadata.parquet")
    (d / "index_info.json").write_text(json.dumps({"clip_model": "x", "dim": 8, "ntotal": 4}))
    return d


def _folder(world, tmp, classes, train=4) -> list[str]:
    root = make_folder(tmp / "data", classes, train=train)
    return [f"dataset.path={root}"]


def _empty_class(world, tmp) -> list[str]:
    root = make_folder(tmp / "data")
    for f in (root / "train" / "001.blue_square").iterdir():
        f.unlink()
    return [f"dataset.path={root}"]


def _non_images(world, tmp) -> list[str]:
    root = make_folder(tmp / "data")
    for f in (root / "train" / "001.blue_square").iterdir():
        f.rename(f.with_suffix(".txt"))
    return [f"dataset.path={root}"]


def _no_class_folders(world, tmp) -> list[str]:
    (tmp / "empty" / "train").mkdir(parents=True)
    (tmp / "empty" / "test").mkdir(parents=True)
    return [f"dataset.path={tmp / 'empty'}"]


def _parquet_dataset(world, tmp, *, drop_image: bool = False, truncate: bool = False) -> list[str]:
    rows = {"label": [0, 0, 0, 0, 1, 1, 1, 1], "split": ["train", "train", "train", "test"] * 2,
            "image": [b"x"] * 8}
    if drop_image:
        rows.pop("image")
    p = tmp / "ds.parquet"
    pq.write_table(pa.table(rows), p)
    if truncate:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["dataset.source=parquet", f"dataset.path={p}", "dataset.split_column=split"]


CASES: list[tuple[str, list[str], Setup | None, list[str]]] = [
    # config values (refused when the config is loaded)
    ("unknown section", ["trainer.lr=0.1"], None, ["trainer"]),
    ("unknown key", ["train.lrate=0.1"], None, ["train.lrate"]),
    ("wrong type", ["train.lr=fast"], None, ["train.lr"]),
    ("negative batch size", ["train.batch_size=-1"], None, ["train.batch_size"]),
    ("negative ratio", ["study.ratios=[-50]"], None, ["study.ratios[0]", "(0, 2500]"]),
    ("ratio above 2500 %", ["study.ratios=[3000]"], None, ["study.ratios[0]"]),
    ("no ratios", ["study.ratios=[]"], None, ["study.ratios is empty"]),
    ("zero sets", ["study.sets=0"], None, ["study.sets"]),
    ("nothing to run", ["study.methods=[]", "study.baseline=false"], None, ["nothing to run"]),
    ("duplicate methods", ["study.methods=[simple,simple]"], None, ["study.methods has duplicates"]),
    ("unknown shortfall policy", ["study.shortfall=skip"], None, ["study.shortfall", "exclude"]),
    ("negative retrieval margin", ["study.retrieval_margin=-0.1"], None, ["study.retrieval_margin", "[0, 10]"]),
    ("census ratio above 2500 %", ["assemble.census_ratio=3000"], None, ["assemble.census_ratio"]),
    ("bad --set syntax", ["train.lr"], None, ["section.key=value"]),
    ("k start below 1", ["retrieve.k_start_factor=0.5"], None, ["retrieve", "k_start_factor"]),
    ("k max below k start", ["retrieve.k_max_factor=1.2"], None, ["k_max_factor"]),
    ("zero clusters k", ["finetune.clusters=0"], None, ["finetune.clusters"]),
    ("zero CPUs per worker", ["train.workers.cpus_per_worker=0"], None, ["train.workers.cpus_per_worker"]),
    ("negative GPUs", ["generate.pool.num_gpus=-1"], None, ["generate.pool"]),
    ("global batch below workers", ["train.batch_size=1", "train.workers.num_workers=2"], None,
     ["train.batch_size=1", "train.workers.num_workers=2"]),
    ("resolution not a multiple of 8", ["finetune.resolution=100"], None, ["finetune.resolution"]),
    ("preload entry not a module name", ["cluster.preload_modules=[torch, 'diffusers pipelines']"], None,
     ["cluster.preload_modules[1]", "not a Python module name"]),
    ("preload of a module not installed", ["cluster.preload_modules=[difusers]"], None,
     ["cluster.preload_modules[0]", "'difusers'", "installed"]),
    # hostile values (issue 22): each was accepted, or crashed with a traceback, before
    ("NaN learning rate", ["train.lr=.nan"], None, ["train.lr: nan is not a finite number"]),
    ("NaN pool factor", ["study.pool_factor=.nan"], None, ["study.pool_factor: nan is not a finite number"]),
    ("infinite k factor", ["retrieve.k_max_factor=.inf"], None, ["retrieve.k_max_factor: inf is not a finite"]),
    ("infinite k start", ["retrieve.k_start_factor=.inf"], None, ["retrieve.k_start_factor: inf is not a"]),
    ("NaN inside a variant", ["study.methods=[v]", "study.variants={v: {method: simple, train.lr: .nan}}"],
     None, ["study.variants.v.train.lr", "not a finite number"]),
    ("number too large for a float", ["train.lr=1" + "0" * 400], None, ["train.lr", "not a finite number"]),
    ("duplicate key in a --set mapping", ["study.variants={v: {method: simple, method: retrieval}}"], None,
     ["override study.variants", "key 'method' is given twice"]),
    ("YAML alias in a --set value", ["study.ratios=[&r 100, *r]"], None,
     ["override study.ratios", "anchors and aliases"]),
    ("unknown variant pipeline", ["study.methods=[v]", "study.variants={v: {method: simple, pipeline: magic}}"],
     None, ["study.variants.v.pipeline", "'magic'", "known: baseline, combined, finetune, generate, retrieval"]),
    ("synthetic images too large", ["dataset.source=synthetic", "dataset.synthetic.size=30000"], None,
     ["dataset.synthetic.size must be <= 1024", "imagefolder"]),
    ("more synthetic classes than defined", ["dataset.source=synthetic", "dataset.synthetic.num_classes=17"],
     None, ["dataset.synthetic.num_classes must be <= 16"]),
    ("duplicate train seeds", ["train.seeds=[0, 0]"], None, ["train.seeds lists 0 more than once"]),
    ("duplicate study seeds", ["study.seeds=[3, 4, 3]"], None, ["study.seeds lists 3 more than once"]),
    ("too many sets", ["study.sets=200000"], None, ["study.sets must be <= 100"]),
    ("too many repeat sets", ["train.repeat_sets=5000"], None, ["train.repeat_sets must be <= 100"]),
    ("unknown log level", ["run.log_level=LOUD"], None, ["run.log_level: 'LOUD'", "DEBUG"]),
    ("run root is a file", [], lambda w, t: [f"run.root={_garbage_file(w, t, 'root.txt', b'x')}"],
     ["run.root:", "root.txt' is a file", "point run.root at a directory"]),
    ("run root below a file", [], lambda w, t: [f"run.root={_garbage_file(w, t, 'root.txt', b'x') / 'runs'}"],
     ["run.root:", "root.txt' is a file"]),
    # names and paths (refused by the study's pre-flight, before Ray)
    ("unknown method", ["study.methods=[magic]"], None, ["study.methods[0]", "'magic'", "known:"]),
    ("variant of an unknown method", ["study.methods=[v]", "study.variants={v: {method: nope}}"], None,
     ["study.variants.v.method", "'nope'"]),
    ("unknown retrieval backend", ["retrieve.backend=faiss_remote"], None, ["retrieve.backend", "known:"]),
    ("unknown filter", ["filter.filters=[sharpness]"], None, ["filter.filters", "sharpness"]),
    ("unknown classifier", ["train.model=vgg99"], None, ["train.model", "vgg99", "known:"]),
    ("unknown dataset source", ["dataset.source=hdf5"], None, ["dataset.source", "hdf5"]),
    ("unknown cost key", ["study.costs={foo: 1}"], None, ["study.costs.foo"]),
    ("missing dataset path", ["dataset.path=/nonexistent/data"], None, ["dataset.path", "/nonexistent/data"]),
    ("missing index path", ["index.path=/nonexistent/pool"], None, ["index.path", "/nonexistent/pool"]),
    ("missing diffusion model dir", ["generate.model=/nonexistent/sd"], None, ["generate.model", "does not exist"]),
    ("model dir that is not diffusers", [], lambda w, t: [f"generate.model={t}"],
     ["generate.model", "model_index.json"]),
    ("retrieve.index not an index", [], lambda w, t: [f"retrieve.index={t}"],
     ["retrieve.index", "missing index.faiss", "raugment index build"]),
    ("corrupt faiss file", [], lambda w, t: [f"retrieve.index={_index_dir(t, faiss_bytes=b'IxF2 garbage' * 4)}"],
     ["index.faiss", "not a readable faiss index"]),
    ("index metadata without captions", [],
     lambda w, t: [f"retrieve.index={_index_dir(t, metadata=pa.table({'url': ['a', 'b', 'c', 'd']}))}"],
     ["metadata.parquet", "caption"]),
    ("more CPUs than the local cluster", ["train.workers.cpus_per_worker=4"], None,
     ["train.workers asks for 4 CPUs", "cluster.num_cpus=2"]),
    ("more GPUs than the local cluster", ["cluster.num_gpus=1", "generate.pool.num_gpus=2"], None,
     ["generate.pool asks for 2 GPUs", "cluster.num_gpus=1"]),
    ("generation on a GPU where there is none", ["generate.pool.num_gpus=1"], None,
     ["generate.pool asks for 1 GPUs", "cluster.num_gpus=0 has none", "num_gpus to 0"]),
    ("training on a GPU where there is none", ["train.workers.use_gpu=true"], None,
     ["train.workers asks for 1 GPUs", "has none", "use_gpu=false"]),
    ("GPU fallback asked of generation", ["generate.pool.gpu_fallback=true"], None,
     ["generate.pool.gpu_fallback is not supported", "num_gpus=0"]),
    # the data itself (refused by the dataset stage's listing, which needs no Ray)
    ("no class folders", [], _no_class_folders, ["has no class folders"]),
    ("class with zero images", [], _empty_class, ["001.blue_square", "no training images"]),
    ("non-image files only", [], _non_images, ["001.blue_square", "no training images"]),
    ("duplicate class names", [], lambda w, t: _folder(w, t, {"000.red_circle": (200, 0, 0),
                                                              "001.red_circle": (0, 0, 200)}),
     ["same name 'red circle'", "rename"]),
    ("Parquet dataset without an image column", [], lambda w, t: _parquet_dataset(w, t, drop_image=True),
     ["dataset.image_column", "'image'"]),
    ("truncated Parquet dataset file", [], lambda w, t: _parquet_dataset(w, t, truncate=True),
     ["cannot read Parquet file", "ds.parquet", "replace or remove"]),
]


@pytest.mark.parametrize("name,overrides,setup,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_study_input_is_refused_before_ray(name, overrides, setup, fragments, world, tripwire,
                                               tmp_path, capsys):
    root = tmp_path / "runs"
    extra = setup(world, tmp_path) if setup else []
    argv = ["run", str(world["study"]), "--set", f"run.root={root}"]
    for item in overrides + extra:
        argv += ["--set", item]
    rc, err = run_cli(argv, root, capsys)  # RayStarted would propagate: the check came too late
    print(f"\n[{name}] {err.strip()}")
    assert rc == 2
    assert err.count("error:") == 1
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_config_file_not_a_mapping(tmp_path, capsys):
    p = tmp_path / "list.yaml"
    p.write_text("- train\n- lr\n")
    rc, err = run_cli(["run", str(p)], tmp_path / "runs", capsys)
    assert rc == 2 and "must hold a mapping of sections" in err and str(p) in err


def test_config_file_invalid_yaml(tmp_path, capsys):
    p = tmp_path / "broken.yaml"
    p.write_text("train: [1, 2\n")
    rc, err = run_cli(["run", str(p)], tmp_path / "runs", capsys)
    assert rc == 2 and "is not valid YAML" in err and str(p) in err


DUPLICATES = {
    "second study section": ("study:\n  sets: 1\ntrain:\n  lr: 0.1\nstudy:\n  sets: 3\n", 5,
                             "key 'study' is given twice (first on line 1)"),
    "second nested key": ("train:\n  lr: 0.1\n  batch_size: 8\n  lr: 5.0\n", 4,
                          "key 'lr' is given twice (first on line 2)"),
    "deep in a flow mapping": ("study:\n  variants: {v: {method: simple, method: retrieval}}\n", 2,
                               "key 'method' is given twice"),
}


@pytest.mark.parametrize("name", list(DUPLICATES))
def test_config_file_duplicate_key_named_with_line(name, tmp_path, capsys):
    text, line, fragment = DUPLICATES[name]
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    rc, err = run_cli(["config", "--config", str(p)], tmp_path / "runs", capsys)
    print(f"\n[duplicate key: {name}] {err.strip()}")
    assert rc == 2 and err.count("\n") == 1 and str(p) in err
    assert f"line {line}: {fragment}" in err


def test_config_file_alias_bomb_refused_at_once(tmp_path, capsys):
    """Seven levels of nested aliases (the "billion laughs" shape): refused at the first anchor."""
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size < 1024
    t0 = time.perf_counter()
    rc, err = run_cli(["run", str(p)], tmp_path / "runs", capsys)
    assert time.perf_counter() - t0 < 2.0
    assert rc == 2 and str(p) in err and "line 1: YAML anchors and aliases (&a0)" in err
    assert not (tmp_path / "runs").exists()


def test_config_file_not_utf8_is_an_input_error(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("train:\n  lr: 0.1  # caf\xe9\n".encode("latin-1"))
    rc, err = run_cli(["run", str(p)], tmp_path / "runs", capsys)
    print(f"\n[non-UTF-8 config] {err.strip()}")
    assert rc == 2 and err.count("\n") == 1
    assert "input error" in err and str(p) in err and "not UTF-8" in err and "re-encode" in err


def test_truncated_shard_of_a_finished_stage_is_named_on_rerun(world, tripwire, tmp_path, capsys):
    """A study re-run over a finished stage whose shard was damaged since: one line naming the
    shard and what to do, not a traceback from whatever reads it next."""
    root = tmp_path / "runs"
    argv = ["run", str(world["study"]), "--set", f"run.root={root}"]
    with pytest.raises(RayStarted):  # the first run: the dataset stage finishes, then Ray would start
        cli.main(argv)
    capsys.readouterr()
    (dataset,) = (root / "dataset").iterdir()
    shard = sorted((dataset / "images").glob("part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-12])
    rc, err = run_cli(argv, root, capsys)
    print(f"\n[truncated shard on re-run] {err.strip()}")
    assert rc == 2 and err.count("\n") == 1
    assert f"shard images/{shard.name} is corrupt or truncated" in err
    assert f"delete the stage directory {dataset}" in err


def test_skipped_stage_checks_its_shards(tmp_path):
    """storage.run_stage reads the footers of a complete stage before skipping it."""
    from raugment.core.config import InputError
    from raugment.core.storage import run_stage

    def body(run):
        run.write(pa.table({"id": ["a", "b"]}), shard="0")

    art = run_stage(tmp_path, "generate", {"k": 1}, None, body)
    assert run_stage(tmp_path, "generate", {"k": 1}, None, body).path == art.path  # the control: skipped
    shard = art.path / "images" / "part-0.parquet"
    shard.write_bytes(shard.read_bytes()[:-12])
    with pytest.raises(InputError, match=r"shard images/part-0\.parquet is corrupt.*delete the stage directory"):
        run_stage(tmp_path, "generate", {"k": 1}, None, body)


def test_missing_config_file(tmp_path, capsys):
    rc, err = run_cli(["run", str(tmp_path / "nope.yaml")], tmp_path / "runs", capsys)
    assert rc == 2 and "nope.yaml" in err and "does not exist" in err


def test_non_utf8_caption_named_before_ray(world, tripwire, tmp_path, capsys):
    pool = make_folder(tmp_path / "pool") / "train"
    bad = pool / "000.red_circle" / "0.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    rc, err = run_cli(["index", "build", "--set", f"index.path={pool}", "--set", f"run.root={tmp_path / 'runs'}"],
                      tmp_path / "runs", capsys)
    print(f"\n[non-UTF-8 caption] {err.strip()}")
    assert rc == 2 and str(bad) in err and "not UTF-8" in err and "re-encode" in err


def _artifact(tmp: Path) -> Path:
    d = tmp / "generate" / "abc123"
    (d / "images").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"]}), d / "images" / "part-0.parquet")
    pq.write_table(pa.table({"id": ["c"]}), d / "images" / "part-1.parquet")
    (d / SUCCESS).write_text("")
    return d


def test_truncated_shard_in_input_artifact_is_named(tmp_path):
    from raugment.core.config import InputError

    d = _artifact(tmp_path)
    assert Artifact.open(d).read("images").num_rows == 3  # the control: intact shards read
    shard = d / "images" / "part-1.parquet"
    shard.write_bytes(shard.read_bytes()[:-12])  # cut off the footer
    with pytest.raises(InputError) as exc:
        Artifact.open(d)
    msg = str(exc.value)
    print(f"\n[truncated shard] {msg}")
    assert "images/part-1.parquet" in msg and str(d) in msg and "re-run stage 'generate'" in msg


def test_corrupt_shard_read_is_named(tmp_path):
    """A shard damaged after the artifact was opened is named when read."""
    from raugment.core.config import InputError

    d = _artifact(tmp_path)
    art = Artifact.open(d)
    (d / "images" / "part-0.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    with pytest.raises(InputError, match="part-0.parquet"):
        art.read("images")


def test_incomplete_input_artifact(tmp_path):
    d = _artifact(tmp_path)
    (d / SUCCESS).unlink()
    with pytest.raises(ValueError, match="not a complete stage output"):
        Artifact.open(d)


def test_sweep_has_at_least_thirty_cases():
    assert len(CASES) + 7 >= 30
