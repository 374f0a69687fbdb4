"""The contract every fine-tuning method keeps, checked for each registered name (and a new one).

A new module in ``raugment/stages/finetune/methods/`` gets these tests for free: its name and
docstrings, a family of :mod:`raugment.lib.finetuned.families` (so the generator can sample from
it), a cost for the study planner, checkpoints it keeps within bounds, its config keys (in the
``finetune`` section), its initial table on the tiny SD bundle in its family's shape, a loss that
falls on a repeated tiny batch with only the learned parts training, and the study plans it as
fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from raugment.config import load_config
from raugment.core.config import ConfigError, from_dict, with_plugins
from raugment.core.registry import Registry
from raugment.lib.finetuned.families import (
    FAMILIES,
    CondRow,
    build_trainable,
    load_trainable_state,
    trainable_state,
)
from raugment.stages.finetune.config import FinetuneConfig
from raugment.stages.finetune.methods import FINETUNERS, FinetuneMethod
from raugment.study.planner import method_pipeline, plugin_costs
from tests.helpers.plugins import check_registration, check_settings, plugin_folder

NAMES = FINETUNERS.names()
ROWS = [CondRow(0, 0, "tiger shark, Galeocerdo cuvieri", 0, 3, "<raug-0>"),
        CondRow(1, 1, "axolotl, mud puppy", 0, 2, "<raug-1>")]


def check_method(registry: Registry, name: str, section: object) -> FinetuneMethod:
    """The shared checks, then: a lib family, a positive cost, kept epochs >= 1 (``section``: the
    method's finetune section)."""
    cls = check_registration(registry, name, FinetuneMethod)
    method = cls()
    assert method.table_key in FAMILIES and isinstance(method, FAMILIES[method.table_key])
    assert isinstance(method.gpu_s_per_image, float) and 0 < method.gpu_s_per_image < math.inf
    kept = method.keep_epochs(section)
    assert kept and all(isinstance(e, int) and e >= 1 for e in kept)
    return method


def expected_shape(method: FinetuneMethod, comps: dict, n: int) -> tuple[int, ...]:
    """The learned table's shape by family: ``[n, 77, d]`` conditionings or ``[n, d]`` embeddings."""
    d = comps["text_encoder"].config.hidden_size
    return {"conditioning": (n, comps["tokenizer"].model_max_length, d), "embeddings": (n, d)}[method.table_key]


@pytest.mark.parametrize("name", NAMES)
def test_registered_name_module_docs_family_cost_and_kept_epochs(name):
    check_method(FINETUNERS, name, load_config().finetune)


@pytest.mark.parametrize("name", NAMES)
def test_own_keys_are_finetune_keys(name):
    check_settings(FINETUNERS.get(name), FinetuneConfig)


@pytest.mark.parametrize("name", NAMES)
def test_the_study_plans_it_as_fine_tuning_at_its_cost(name):
    assert method_pipeline(name) == "finetune"
    assert plugin_costs()[f"finetune.{name}.gpu_s_per_image"] == FINETUNERS.get(name).gpu_s_per_image


@pytest.mark.parametrize("name", NAMES)
def test_initial_table_has_its_familys_shape(name, comps, one_thread):
    method = FINETUNERS.get(name)()
    table = method.init_table(comps, ROWS)
    assert tuple(table.shape) == expected_shape(method, comps, len(ROWS))
    assert table.dtype == torch.float32 and not torch.allclose(table[0], table[1])


@pytest.mark.parametrize("name", NAMES)
def test_each_method_loss_falls_on_a_repeated_tiny_batch(comps, name, one_thread):
    method = FINETUNERS.get(name)()
    net = build_trainable(method, comps, method.init_table(comps, ROWS))
    trainable = [p for p in net.parameters() if p.requires_grad]
    expected = 1 if not method.trains_unet else 1 + len(list(comps["unet"].parameters()))
    assert len(trainable) == expected  # only the table (and the UNet when the method trains it)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    rows = torch.tensor([0, 1, 0, 1])
    ids = method.prompt_ids(comps, 4, np.random.default_rng(0))
    frozen_te = comps["text_encoder"].get_input_embeddings().weight.clone()
    opt = torch.optim.Adam(trainable, lr=1e-3 if method.trains_unet else 2e-2)
    losses = []
    for _ in range(8):
        loss = net(latents, noise, t, rows, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(comps["text_encoder"].get_input_embeddings().weight, frozen_te)
    # the saved state round-trips into a fresh module
    state = trainable_state(net, method)
    fresh = build_trainable(method, comps, torch.zeros_like(net.table))
    load_trainable_state(fresh, method, state)
    torch.testing.assert_close(fresh.table, net.table)


def test_the_built_in_methods_are_registered():
    assert set(NAMES) >= {"ft_conditioning", "ft_cluster_conditioning", "imagic", "textual_inversion",
                          "pseudoword_dm"}


SPARSE = '''"""A fine-tuning method written by a test: textual inversion keeping every n-th epoch."""

from dataclasses import dataclass

from raugment.core.config import PluginSettings, positive
from raugment.lib.finetuned.families import PseudowordFamily
from raugment.stages.finetune.methods import FinetuneMethod, paper_gpu_s_per_image

from . import REG


@dataclass
class Settings(PluginSettings):
    keep_every: int = 2

    def validate(self, key):
        positive(self.keep_every, f"{key}.keep_every")


@REG.register("sparse_inversion")
class SparseInversion(FinetuneMethod, PseudowordFamily):
    """Textual inversion that keeps a checkpoint of every ``keep_every``-th epoch up to max_epochs."""

    name = "sparse_inversion"
    settings = Settings
    gpu_s_per_image = paper_gpu_s_per_image(100)

    def keep_epochs(self, section):
        return list(range(Settings.of(section).keep_every, section.max_epochs + 1, Settings.of(section).keep_every))
'''


def test_a_method_dropped_into_the_folder_is_found_and_keeps_the_contract(tmp_path, monkeypatch, comps, one_thread):
    """One new module is all a new fine-tuning method takes: the folder's registry finds it, a
    section composed with the registry carries its keys, and it passes the contract checks."""
    registry = plugin_folder(tmp_path, monkeypatch, "fine-tuning method", {"sparse_inversion.py": SPARSE})
    assert registry.names() == ["sparse_inversion"]

    @with_plugins(registry)
    @dataclasses.dataclass
    class Section:
        max_epochs: int = 6
        keep_epochs: list[int] = dataclasses.field(default_factory=list)

    assert [f.name for f in dataclasses.fields(Section)] == ["max_epochs", "keep_epochs", "keep_every"]
    with pytest.raises(ConfigError, match="keep_every must be > 0"):
        from_dict({"keep_every": 0}, Section)
    method = check_method(registry, "sparse_inversion", from_dict({"keep_every": 3}, Section))
    assert method.keep_epochs(from_dict({"keep_every": 3}, Section)) == [3, 6]
    check_settings(type(method), Section)
    assert tuple(method.init_table(comps, ROWS).shape) == expected_shape(method, comps, len(ROWS))
