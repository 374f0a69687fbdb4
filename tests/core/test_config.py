import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from raugment.config import Config, from_dict, load_config
from raugment.core.config import (
    ConfigError,
    PluginSettings,
    apply_overrides,
    section_hash,
    with_overrides,
    with_plugins,
)
from raugment.core.registry import Registry
from raugment.stages.train.config import TrainConfig


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
    ({"train": {"channels_last": "yes"}}, r"train\.channels_last: 'yes' is not one of \[True, False, 'auto'\]"),
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


def test_plugin_settings_replace_in_changes_only_its_own_keys():
    registry = Registry("thing")

    @dataclass
    class ThingSettings(PluginSettings):
        threshold: float = 1.0

    @registry.register("thing")
    class Thing:
        settings = ThingSettings

    @with_plugins(registry)
    @dataclass
    class Section:
        name: str = "a"

    section = Section()
    out = ThingSettings.replace_in(section, threshold=2.0)
    assert type(out) is Section and (out.name, out.threshold) == ("a", 2.0)
    assert section.threshold == 1.0  # a copy
    with pytest.raises(TypeError, match=r"declares no key\(s\) \['name'\]"):
        ThingSettings.replace_in(section, name="b")
    with pytest.raises(TypeError, match="does not carry the keys of"):
        ThingSettings.replace_in(TrainConfig(), threshold=2.0)


def test_config_import_is_light():
    code = ("import sys, raugment.config, raugment.cli, raugment.core.registry, raugment.core.schema;"
            "bad=[m for m in ('torch','ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- "auto" GPU options: resolved by the device the stage's workers run on --------------------


def test_generate_auto_options_resolve_by_device():
    from raugment.stages.generate.stage import key_section

    gpu = load_config(None, [])  # default pool: one GPU per actor
    cpu = load_config(None, ["generate.pool.num_gpus=0"])
    assert (gpu.generate.dtype, gpu.generate.channels_last) == ("auto", "auto")
    g, c = gpu.generate.resolved(), cpu.generate.resolved()
    assert (g.device, g.dtype, g.channels_last, g.sdpa) == ("cuda", "float16", True, True)
    assert (c.device, c.dtype, c.channels_last, c.sdpa) == ("cpu", "float32", False, True)
    # explicit settings are kept; an explicit device wins over the pool's GPUs
    pinned = load_config(None, ["generate.dtype=bfloat16", "generate.channels_last=false"]).generate.resolved()
    assert (pinned.dtype, pinned.channels_last) == ("bfloat16", False)
    assert load_config(None, ["generate.device=cpu"]).generate.resolved().dtype == "float32"
    # the key holds resolved values: auto on CPU shares the directory of explicit float32, a GPU
    # run (float16 changes the images) gets its own
    explicit = load_config(None, ["generate.pool.num_gpus=0", "generate.dtype=float32",
                                  "generate.channels_last=false"]).generate.resolved()
    assert key_section(c) == key_section(explicit) and key_section(c) != key_section(g)


def test_train_auto_options_resolve_by_device():
    cfg = load_config(None, [])
    assert (cfg.train.amp, cfg.train.channels_last, cfg.train.compile) == ("auto", "auto", "auto")
    assert cfg.train.run_device() == "cpu"
    cpu, gpu = cfg.train.resolved("cpu"), cfg.train.resolved("cuda:0")
    assert (cpu.amp, cpu.channels_last, cpu.compile) == ("none", False, False)
    assert (gpu.amp, gpu.channels_last, gpu.compile) == ("bf16", True, True)
    assert load_config(None, ["train.workers.use_gpu=true"]).train.resolved().amp == "bf16"
    assert load_config(None, ["train.amp=fp16"]).train.resolved("cuda").amp == "fp16"


def test_train_key_holds_resolved_gpu_options():
    from raugment.stages.train.stage import result_section

    auto = load_config(None, [])
    explicit = load_config(None, ["train.amp=none", "train.channels_last=false", "train.compile=false"])
    on_gpu = load_config(None, ["train.workers.use_gpu=true"])
    assert result_section(auto.train) == result_section(explicit.train)
    assert result_section(on_gpu.train)["amp"] == "bf16" and result_section(auto.train)["amp"] == "none"


def test_pick_device_auto_follows_cuda(monkeypatch):
    """The in-process path (no Ray pool): ``auto`` follows torch's view of the GPU (faked here)."""
    import torch

    from raugment.runtime.cluster import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Config().generate.resolved(pick_device("auto")).dtype == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Config().generate.resolved(pick_device("auto")).dtype == "float32"


@pytest.mark.parametrize("overrides, needle", [
    (["generate.device=cuda", "generate.pool.num_gpus=0"], r"generate\.device=cuda but generate\.pool\.num_gpus=0"),
    (["generate.device=tpu"], r"generate\.device must be auto, cpu, cuda"),
    (["generate.dtype=half"], r"generate\.dtype: 'half' is not one of"),
    (["train.compile=maybe"], r"train\.compile: 'maybe' is not one of \[True, False, 'auto'\]"),
])
def test_bad_gpu_options_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


# ---- hostile inputs (issue 22) ---------------------------------------------------------------


def _float_keys(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, its shape) of every key of ``cls`` that takes floats: ``float`` and ``float |
    None`` ("scalar"), ``list[float]`` ("list"), ``dict[str, float]`` and optional ones ("dict")."""
    import dataclasses
    import typing

    keys: list[tuple[str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{f.name}.")
            continue
        for arg in (tp, *typing.get_args(tp)):
            origin, args = typing.get_origin(arg), typing.get_args(arg)
            if arg is float:
                keys.append((prefix + f.name, "scalar"))
            elif origin is list and args == (float,):
                keys.append((prefix + f.name, "list"))
            elif origin is dict and args[1:] == (float,):
                keys.append((prefix + f.name, "dict"))
            else:
                continue
            break
    return keys


FLOAT_KEYS = _float_keys(Config)


def test_float_keys_found():
    # the control: the walk finds plug-in and nested keys, not only top-level ones
    keys = dict(FLOAT_KEYS)
    assert {"train.lr", "study.pool_factor", "retrieve.k_max_factor", "dataset.synthetic.imbalance",
            "train.workers.cpus_per_worker", "retrieve.aesthetic_threshold"} <= set(keys)
    assert keys["study.ratios"] == "list" and keys["study.costs"] == "dict" and keys["report.upper_bound"] == "dict"
    assert len(FLOAT_KEYS) > 40


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_key_refuses_nan_and_infinity(value):
    for key, shape in FLOAT_KEYS:
        given, named = {"scalar": (value, key), "list": (f"[{value}]", f"{key}[0]"),
                        "dict": (f"{{x: {value}}}", f"{key}.x")}[shape]
        with pytest.raises(ConfigError, match=rf"^{re.escape(named)}: (nan|inf|-inf) is not a finite"):
            load_config(None, [f"{key}={given}"])


def test_non_finite_inside_free_form_values_named():
    with pytest.raises(ConfigError, match=r"^study\.costs\.generate: nan is not a finite"):
        from_dict({"study": {"costs": {"generate": float("nan")}}})
    with pytest.raises(ConfigError, match=r"^tune\.space\.train\.lr\[1\]: inf is not a finite"):
        from_dict({"tune": {"space": {"train.lr": [0.1, float("inf")]}}})


def test_strict_loader_refuses_duplicates_at_any_depth_with_line():
    from raugment.core.config import StrictYAMLError, load_yaml_text

    assert load_yaml_text("a: 1\nb: {c: 2, d: [3]}\n") == {"a": 1, "b": {"c": 2, "d": [3]}}  # the control
    for text, line, key in [("a: 1\nb: 2\na: 3\n", 3, "a"),
                            ("s:\n  t:\n    u: 1\n    v: 2\n    u: 3\n", 5, "u"),
                            ("- {x: 1, x: 2}\n", 1, "x"),
                            ("1: a\n1: b\n", 2, 1)]:
        with pytest.raises(StrictYAMLError, match=rf"^line {line}: key {key!r} is given twice"):
            load_yaml_text(text)


@pytest.mark.parametrize("text", ["a: &x 1\n", "a: &x 1\nb: *x\n", "a: {<<: {b: 1}}\n"])
def test_strict_loader_refuses_anchors_aliases_merge_keys(text):
    from raugment.core.config import StrictYAMLError, load_yaml_text

    with pytest.raises(StrictYAMLError, match="not accepted in a config"):
        load_yaml_text(text)


def test_config_dump_reads_back_under_the_strict_loader(tmp_path):
    from raugment.core.config import dump_yaml, read_yaml, to_dict

    shared = [1.0, 2.0]
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml({"a": shared, "b": shared}))  # the same object twice: no alias written
    assert read_yaml(p) == {"a": shared, "b": shared}
    p.write_text(dump_yaml(Config()))
    assert from_dict(read_yaml(p)) == Config() and to_dict(from_dict(read_yaml(p))) == to_dict(Config())


def test_run_section_checks_log_level_and_root(tmp_path):
    assert load_config(None, ["run.log_level=debug", f"run.root={tmp_path / 'new' / 'runs'}"])  # the control
    with pytest.raises(ConfigError, match=r"^run\.log_level: 'LOUD' is not a logging level; use one of"):
        load_config(None, ["run.log_level=LOUD"])
    (tmp_path / "f").write_text("")
    for root in (tmp_path / "f", tmp_path / "f" / "runs"):
        with pytest.raises(ConfigError, match=r"^run\.root: .*/f' is a file, not a directory"):
            load_config(None, [f"run.root={root}"])


@pytest.mark.parametrize("overrides, needle", [
    (["train.seeds=[1, 2, 1]"], r"^train\.seeds lists 1 more than once"),
    (["study.seeds=[0, 0]"], r"^study\.seeds lists 0 more than once"),
    (["study.sets=101"], r"^study\.sets must be <= 100 \("),
    (["generate.num_sets=101"], r"^generate\.num_sets must be <= 100"),
    (["assemble.num_sets=101"], r"^assemble\.num_sets must be <= 100"),
    (["train.repeat_sets=101"], r"^train\.repeat_sets must be <= 100"),
    (["study.seeds=" + str(list(range(101)))], r"^study\.seeds \(count\) must be <= 100"),
    (["dataset.synthetic.size=1025"], r"^dataset\.synthetic\.size must be <= 1024 \(pixels"),
    (["dataset.synthetic.num_classes=17"], r"^dataset\.synthetic\.num_classes must be <= 16"),
    (["dataset.synthetic.train_per_class=100000"], r"^dataset\.synthetic\.train_per_class \+"),
    (["generate.pool.concurrency=5000"], r"^generate\.pool\.concurrency must be <= 4096 \(one process"),
    (["train.workers.num_workers=5000", "train.batch_size=8192"], r"^train\.workers\.num_workers must be <= 4096"),
    (["study.parallel=5000"], r"^study\.parallel must be <= 4096"),
    (["generate.height=8192"], r"^generate\.height must be <= 4096"),
    (["train.image_size=5000"], r"^train\.image_size must be <= 4096"),
])
def test_count_bounds_and_duplicate_seeds(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_count_bounds_admit_their_limit():
    cfg = load_config(None, ["study.sets=100", "train.repeat_sets=100", "dataset.synthetic.size=1024",
                             "generate.pool.concurrency=4096", "generate.width=4096", "train.image_size=4096",
                             "dataset.synthetic.num_classes=16", "study.seeds=[0, 1]", "train.seeds=[5, 6]"])
    assert cfg.study.sets == 100 and cfg.dataset.synthetic.size == 1024


def test_unknown_variant_pipeline_lists_the_known_ones():
    from raugment.study.planner import method_config

    cfg = load_config(None, ["study.methods=[v]", "study.variants={v: {method: simple, pipeline: magic}}"])
    with pytest.raises(ConfigError, match=r"^study\.variants\.v\.pipeline: unknown pipeline 'magic'; known: "
                                          r"baseline, combined, finetune, generate, retrieval"):
        method_config(cfg, "v")
    ok = load_config(None, ["study.methods=[v]", "study.variants={v: {method: simple, pipeline: generate}}"])
    assert method_config(ok, "v")[:2] == ("simple", "generate")  # the control
