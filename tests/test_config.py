import subprocess
import sys

import pytest

from raugment.config import (Config, ConfigError, TrainConfig, apply_overrides, from_dict,
                             load_config, section_hash, with_overrides)


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert cfg.train.batch_size == 256 and cfg.train.lr == 0.1
    assert cfg.train.max_epochs == 270 and cfg.train.lr_patience == 10 and cfg.train.stop_patience == 20
    assert cfg.generate.model == "CompVis/stable-diffusion-v1-4" and cfg.generate.height == 512
    assert cfg.generate.images_per_class == 390 and cfg.generate.num_sets == 5
    assert cfg.retrieve.images_per_class == 130 and cfg.retrieve.aesthetic_threshold == 5.0


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n  workers:\n    num_workers: 3\ngenerate:\n  method: clip_templates\n")
    cfg = load_config(p, ["train.lr=0.01", "study.ratios=[100, 2500]", "cluster.address=auto"])
    assert cfg.train.lr == 0.01
    assert cfg.train.workers.num_workers == 3
    assert cfg.generate.method == "clip_templates"
    assert cfg.study.ratios == [100.0, 2500.0]
    assert cfg.cluster.address == "auto"


@pytest.mark.parametrize("data, needle", [
    ({"train": {"lrr": 0.1}}, "train.lrr"),
    ({"trian": {}}, "trian"),
    ({"train": {"workers": {"num_worker": 2}}}, "train.workers.num_worker"),
])
def test_unknown_key_named(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as exc:
        from_dict(data)
    assert "known keys" in str(exc.value)


@pytest.mark.parametrize("data, needle", [
    ({"train": {"lr": "fast"}}, r"train\.lr: expected a number"),
    ({"train": {"batch_size": 2.5}}, r"train\.batch_size: expected an integer"),
    ({"train": {"batch_size": True}}, r"train\.batch_size: expected an integer"),
    ({"train": {"channels_last": "yes"}}, r"train\.channels_last: expected true/false"),
    ({"train": {"amp": "fp8"}}, r"train\.amp: 'fp8' is not one of"),
    ({"study": {"ratios": "100"}}, r"study\.ratios: expected a list"),
])
def test_wrong_type_named(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(data)


@pytest.mark.parametrize("data, needle", [
    ({"train": {"lr": -1}}, r"train\.lr must be > 0"),
    ({"assemble": {"ratio": 3000}}, r"assemble\.ratio"),
    ({"generate": {"height": 500}}, r"generate\.height must be a positive multiple of 8"),
    ({"dataset": {"fraction": 0}}, r"dataset\.fraction"),
    ({"dataset": {"source": "imagefolder"}}, r"dataset\.path is required"),
    ({"train": {"workers": {"cpus_per_worker": 0}}}, r"train\.workers\.cpus_per_worker"),
])
def test_bad_value_named(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(data)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_depends_on_section_and_inputs():
    a = TrainConfig()
    assert section_hash(a) == section_hash(TrainConfig())
    assert section_hash(a) != section_hash(TrainConfig(lr=0.2))
    assert section_hash(a, {"data": "k1"}) != section_hash(a, {"data": "k2"})
    assert section_hash(a, {"x": "1", "y": "2"}) == section_hash(a, {"y": "2", "x": "1"})


def test_with_overrides_dotted_keys():
    cfg = with_overrides(Config(), {"train.lr": 0.03, "finetune.clusters": 5})
    assert cfg.train.lr == 0.03 and cfg.finetune.clusters == 5
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(Config(), {"train.nope": 1})
    with pytest.raises(ConfigError, match="expected an integer"):
        with_overrides(Config(), {"finetune.clusters": "five"})


def test_config_import_is_light():
    code = ("import sys, raugment.config, raugment.cli, raugment.registry, raugment.schema;"
            "bad=[m for m in ('torch','ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
