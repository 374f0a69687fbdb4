"""The contract every generation method keeps, checked for each registered name (and a new one).

A new module in ``raugment/stages/generate/methods/`` gets these tests for free: its name, its
docstrings, its config keys (in the ``generate`` section, loadable from YAML and ``--set``) and
its plan (exactly ``images_per_class`` rows per class, unique stable ids, the same plan twice,
string prompts, a ``prompts`` table the stage can write).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from raugment.config import load_config
from raugment.core import schema
from raugment.core.config import ConfigError, from_dict, with_plugins
from raugment.core.registry import Registry
from raugment.stages.generate import stage as generate
from raugment.stages.generate.config import GenerateConfig
from raugment.stages.generate.methods import GENERATORS, GenerationMethod, PromptMethod
from tests.helpers.plugins import check_registration, check_settings, plugin_folder
from tests.helpers.prompts import TIGER_SHARK, rng

NAMES = GENERATORS.names()
PER_CLASS = 3
ROW_KEYS = {schema.LABEL, schema.CLASS_ID, schema.CLASS_NAME, schema.INDEX, schema.PROMPT, schema.PARAMS,
            schema.METHOD, schema.SEED, schema.ID}


def check_method(registry: Registry, name: str) -> type:
    """The shared checks, then: a known kind and a cost fraction in (0, 1]."""
    cls = check_registration(registry, name, GenerationMethod)
    assert cls.kind in ("text2img", "img2img")
    assert 0 < cls.cost_fraction <= 1
    return cls


def check_plan(method: GenerationMethod, classes: list[dict], dataset) -> None:
    """``PER_CLASS`` rows per class, indices 0..n-1, unique stable ids, the same plan twice."""
    g = load_config(None, [f"generate.images_per_class={PER_CLASS}"]).generate
    rows = method.plan(classes, g, dataset=dataset, finetune=None)
    assert rows == method.plan(classes, g, dataset=dataset, finetune=None)
    assert Counter(int(r[schema.LABEL]) for r in rows) == {int(c[schema.LABEL]): PER_CLASS for c in classes}
    for c in classes:
        assert sorted(r[schema.INDEX] for r in rows if r[schema.LABEL] == c[schema.LABEL]) == list(range(PER_CLASS))
    assert all(set(r) >= ROW_KEYS and r[schema.METHOD] == method.name for r in rows)
    assert len({r[schema.ID] for r in rows}) == len(rows) == PER_CLASS * len(classes)
    assert all(isinstance(r[schema.PROMPT], str) for r in rows)
    if isinstance(method, PromptMethod):
        assert all(r[schema.PROMPT].strip() for r in rows)
    json.dumps([r[schema.PARAMS] for r in rows])  # provenance is JSON
    table = schema.to_table([{k: r[k] for k in schema.PROMPTS.names if k in r} for r in rows], schema.PROMPTS)
    assert table.num_rows == len(rows)
    other = method.plan(classes, load_config(None, [f"generate.images_per_class={PER_CLASS}", "generate.seed=1"])
                        .generate, dataset=dataset, finetune=None)
    assert {r[schema.ID] for r in other}.isdisjoint(r[schema.ID] for r in rows)  # seeds follow generate.seed


@pytest.mark.parametrize("name", NAMES)
def test_registered_name_module_and_docs(name):
    check_method(GENERATORS, name)


@pytest.mark.parametrize("name", NAMES)
def test_own_keys_are_generate_keys(name):
    check_settings(GENERATORS.get(name), GenerateConfig)


@pytest.mark.parametrize("name", NAMES)
def test_plan_contract(name, dataset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the default hub id is planned, never loaded: no cache check
    method = generate.check_config(load_config(None, [f"generate.method={name}"]))
    assert type(method) is GENERATORS.get(name)
    check_plan(method, generate.read_classes(dataset), dataset)


@pytest.mark.parametrize("name", [n for n in NAMES if issubclass(GENERATORS.get(n), PromptMethod)])
def test_prompt_methods_check_their_input(name):
    method = GENERATORS.get(name)()
    assert method.make_prompts(TIGER_SHARK, 0, rng()) == []
    assert method.make_prompts(TIGER_SHARK, 5, rng(2)) == method.make_prompts(TIGER_SHARK, 5, rng(2))
    with pytest.raises(ValueError, match="class_name"):
        method.make_prompts({"class_id": "x"}, 1, rng())
    with pytest.raises(ValueError, match=">= 0"):
        method.make_prompts(TIGER_SHARK, -1, rng())


def test_the_built_in_methods_are_registered():
    assert {"simple", "simple_nows", "clip_templates", "sariyildiz", "boomerang"} <= set(NAMES)
    with pytest.raises(ValueError, match=r"known: .*clip_templates"):
        GENERATORS.get("nope")


SHOUTING = '''"""A prompt method written by a test: the simple prompt, shouted."""

from dataclasses import dataclass

from raugment.core.config import ConfigError, PluginSettings
from raugment.stages.generate.methods import PromptMethod, record_name

from . import REG


@dataclass
class Settings(PluginSettings):
    shout_marks: int = 1

    def validate(self, key):
        if self.shout_marks < 0:
            raise ConfigError(f"{key}.shout_marks must be >= 0")


@REG.register("shouting")
class Shouting(PromptMethod):
    """The simple prompt in capitals."""

    name = "shouting"
    settings = Settings

    def prompts(self, record, n, rng):
        return [f"A PHOTO OF {record_name(record).upper()}!"] * n
'''


def test_a_method_dropped_into_the_folder_is_found_and_keeps_the_contract(tmp_path, monkeypatch, dataset):
    """One new module is all a new method takes: the folder's registry finds it (private modules
    are not imported), a section composed with the registry carries its keys, and it passes the
    same contract checks as the built-in methods."""
    registry = plugin_folder(tmp_path, monkeypatch, "generation method",
                             {"shouting.py": SHOUTING, "_notes.py": "raise RuntimeError('not a plug-in')\n"})
    assert registry.names() == ["shouting"] and registry.module_of("shouting").endswith(".shouting")

    @with_plugins(registry)
    @dataclasses.dataclass
    class Section:
        method: str = "shouting"

    assert [f.name for f in dataclasses.fields(Section)] == ["method", "shout_marks"]
    assert from_dict({"shout_marks": 3}, Section).shout_marks == 3
    with pytest.raises(ConfigError, match="shout_marks must be >= 0"):
        from_dict({"shout_marks": -1}, Section)
    cls = check_method(registry, "shouting")
    check_settings(cls, Section)
    check_plan(cls(), generate.read_classes(dataset), dataset)
    assert cls().plan(generate.read_classes(dataset)[:1], load_config().generate, dataset=dataset,
                      finetune=None)[0][schema.PROMPT] == "A PHOTO OF TIGER SHARK, GALEOCERDO CUVIERI!"


def test_every_generate_key_a_method_declares_is_carried_once():
    declared = [f.name for s in GENERATORS.settings() for f in dataclasses.fields(s)]
    assert len(declared) == len(set(declared))
    assert set(declared) <= {f.name for f in dataclasses.fields(GenerateConfig)}
    assert "boomerang_strength" in declared and np.isclose(GenerateConfig().boomerang_strength, 0.2)
