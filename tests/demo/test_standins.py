"""The rehearsal's stand-ins are in the real on-disk layouts, read by the real readers."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from raugment.core.config import ConfigError
from raugment.demo import rehearse, standins
from raugment.lib.prompts import simple_nows_prompt
from raugment.stages.dataset.classnames import is_synset_id, lookup


def test_imagenet_folder_has_imagenet_s_layout_and_real_synsets(tmp_path):
    shape = standins.write_imagenet_folder(tmp_path / "imagenet", num_classes=6, train_range=(3, 9),
                                           val_per_class=2, side=16)
    ids = sorted(p.name for p in (tmp_path / "imagenet" / "train").iterdir())
    assert ids == shape.class_ids and len(ids) == 6
    assert all(is_synset_id(c) and lookup(c).name for c in ids)  # every folder is a WordNet table synset
    for cid in ids:
        train = sorted((tmp_path / "imagenet" / "train" / cid).iterdir())
        val = sorted((tmp_path / "imagenet" / "val" / cid).iterdir())
        assert len(train) == shape.train[cid] and len(val) == 2
        assert train[0].name.startswith(f"{cid}_") and train[0].suffix == ".JPEG"
        assert val[0].name.startswith("ILSVRC2012_val_")
    assert len(set(shape.train.values())) > 1  # class imbalance, as ImageNet's
    again = standins.write_imagenet_folder(tmp_path / "imagenet", num_classes=6)  # kept, not rewritten
    assert again == shape


def test_laion_index_is_read_by_the_index_stage_and_answers_retrieval_s_prompts(tmp_path):
    from raugment.demo.tiny import write_tiny_bundles
    from raugment.models.clip import load_clip
    from raugment.stages.index.stage import read_laion_embeddings

    clip = write_tiny_bundles(tmp_path / "models", parts=["clip"])["clip"]
    ids = standins.pick_synsets(5)
    shape = standins.write_laion_index(tmp_path / "laion", ids, clip, often=6, rarely=1, rare_every=5,
                                       dead_links=20, side=16)
    assert shape.rare == [ids[0]] and shape.per_class[ids[0]] == 1 and shape.per_class[ids[1]] == 6
    emb, meta = read_laion_embeddings(tmp_path / "laion")  # the reader of index.source=embeddings
    assert len(emb) == len(meta) == 1 + 4 * 6 + 5 * 20
    assert len(list((tmp_path / "laion" / "img_emb").glob("img_emb_*.npy"))) == 2
    rows = meta.to_pylist()
    lemma = lookup(ids[1]).name.split(", ")[0]
    assert sum(lemma in (r["caption"] or "") for r in rows) >= 6  # captions name the class
    assert all(r["aesthetic_score"] is not None for r in rows)
    # retrieval's own prompt finds its class's images first, then dead links (never another class)
    queries = load_clip(str(clip), None, "cpu").embed_texts([simple_nows_prompt(lookup(c).name) for c in ids])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for label, cid in enumerate(ids):
        order = np.argsort(-(emb @ queries[label]))
        own = shape.per_class[cid]
        top = [rows[i]["url"] for i in order[:own + 20]]
        assert all(u.startswith("images/") for u in top[:own]) and all(u.startswith("gone/") for u in top[own:])
        assert all(lookup(cid).name.split(", ")[0] in rows[i]["caption"] for i in order[:own])
    # images are served; dead links are dead
    with standins.serve_directory(tmp_path / "laion") as url:
        live = next(r["url"] for r in rows if r["url"].startswith("images/"))
        with urllib.request.urlopen(url + live, timeout=5) as resp:
            assert resp.status == 200 and resp.read(3) == b"\xff\xd8\xff"
        dead = next(r["url"] for r in rows if r["url"].startswith("gone/"))
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + dead, timeout=5)


def test_rehearsal_overrides_are_paths_model_ids_and_listed_sizes(tmp_path):
    s = rehearse.Standins(tmp_path / "imagenet", tmp_path / "laion",
                          {k: tmp_path / k for k in ("sd", "clip", "aesthetic", "inception")}, None, None)
    sets = rehearse.overrides(s, "http://127.0.0.1:9/", tmp_path / "run")
    keys = [x.split("=", 1)[0] for x in sets]
    assert len(keys) == len(set(keys))
    assert set(keys) == (set(rehearse.path_overrides(s, "u", tmp_path)) | set(rehearse.BOX_OVERRIDES)
                         | set(rehearse.TRAP_WORKAROUNDS))
    # nothing of the study's design is touched: methods, ratios, sets, filters, prompts, k schedule
    touched = {".".join(k.split(".")[:2]) for k in keys if k not in rehearse.TRAP_WORKAROUNDS}
    for kept in ("study.methods", "study.ratios", "study.sets", "filter.filters", "retrieve.prompt",
                 "retrieve.k_max_factor", "train.model", "dataset.fraction"):
        assert kept not in touched
    assert all(len(why) > 40 for _, why in rehearse.TRAP_WORKAROUNDS.values())  # each names its trap
    (tmp_path / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    for i in range(26):
        (tmp_path / "imagenet" / "train" / "n01440764" / f"{i}.JPEG").write_bytes(b"")
    cfg = rehearse.load_config(rehearse.PRESET, sets)
    assert cfg.dataset.path == str((tmp_path / "imagenet").resolve()) and cfg.train.model == "resnet50"
    assert len(cfg.study.methods) == 11 and cfg.study.sets == 5
    # 10 % of 26 rounds half up to 3: what the dataset stage will take
    assert rehearse.dataset_hint(cfg) == {"classes": 1, "train_images": 3, "max_per_class": 3}
    with pytest.raises(ConfigError):
        rehearse.load_config(rehearse.PRESET, [*sets, "study.nope=1"])
    json.dumps(sets)


def test_inception_stand_in_loads_as_feature_weights(tmp_path):
    from raugment.stages.finetune.kmeans import build_inception

    path = standins.write_inception_weights(tmp_path / "inception_v3.safetensors")
    model = build_inception(str(path))  # the loader of finetune.feature_weights: every key present
    assert sum(p.numel() for p in model.parameters()) > 20_000_000


def test_rehearsal_leaves_the_rare_classes_to_the_shortfall_policy(tmp_path):
    """No exclusion by hand (the preset's manual step) and no trap workaround: the preset's own
    ``study.shortfall=exclude`` finds the classes retrieval cannot fill (issue 18)."""
    s = rehearse.Standins(tmp_path, tmp_path, {k: tmp_path / k for k in ("sd", "clip", "aesthetic", "inception")},
                          None, standins.IndexShape({"n01440764": 1, "n01443537": 16}, ["n01440764"], 60))
    sets = dict(x.split("=", 1) for x in rehearse.overrides(s, "http://127.0.0.1:9/", tmp_path / "run"))
    assert "dataset.exclude_classes" not in sets and not rehearse.TRAP_WORKAROUNDS
    for cid, n in (("n01440764", 30), ("n01443537", 26)):
        (tmp_path / "train" / cid).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "train" / cid / f"{i}.JPEG").write_bytes(b"")
    cfg = rehearse.load_config(rehearse.PRESET, [f"{k}={v}" for k, v in sets.items()])
    assert cfg.study.shortfall == "exclude" and cfg.dataset.exclude_classes == []
    hint = rehearse.dataset_hint(cfg)
    assert hint["classes"] == 2 and hint["max_per_class"] == 3  # the rare class is planned too
