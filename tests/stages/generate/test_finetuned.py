"""Generation from a fine-tuning artifact (:class:`FinetunedGeneration`): any fine-tuned method, by its family.

The fine-tuning stage's own end-to-end runs (train, then generate from the artifact) are in
``tests/stages/finetune/test_finetune.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raugment.config import load_config
from raugment.core import schema
from raugment.core.config import ConfigError
from raugment.core.storage import Artifact
from raugment.lib.finetuned.families import TEMPLATES, family_of
from raugment.models.diffusion import load_components, load_pipeline
from raugment.stages.generate.finetuned import TEMPLATE_PARAM, FinetunedGeneration, draw_rows
from tests.helpers.finetuned import hand_made_artifact, sample

CLASSES = [{schema.LABEL: 0, schema.CLASS_ID: "n01491361", schema.CLASS_NAME: "tiger shark, Galeocerdo cuvieri"}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return load_pipeline(str(tiny_sd), safety_checker=False)


def _generate_cfg(name: str, **extra):
    sets = {"generate.method": name, "generate.images_per_class": 2, "generate.height": 64, "generate.width": 64,
            **extra}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()]).generate


@pytest.mark.parametrize("name", ["textual_inversion", "pseudoword_dm"])
def test_pseudoword_generation_matches_the_init_word_then_follows_training(tiny_sd, tmp_path, pipe, name):
    g = _generate_cfg(name)
    outs = {}
    for perturb in (0.0, 0.3):
        art = tmp_path / f"{name}-{perturb}"
        hand_made_artifact(art, load_components(str(tiny_sd)), name, perturb)
        fresh = load_pipeline(str(tiny_sd), safety_checker=False)
        method = FinetunedGeneration(name)
        rows = method.plan(CLASSES, g, dataset=None, finetune=Artifact("finetune", "x", art))
        template = TEMPLATES[rows[0][schema.PARAMS][TEMPLATE_PARAM]]
        assert rows[0][schema.PROMPT] == template.format("<raug-0>")
        method.setup(fresh, g, str(art))
        outs[perturb] = sample(fresh, **method.call_kwargs(rows[:1], g))
    # at its initialisation the pseudo-word is the word "shark": same image as the plain prompt
    base = sample(pipe, prompt=[template.format("shark")], guidance_scale=g.guidance_scale, height=64, width=64)
    np.testing.assert_allclose(outs[0.0], base, atol=1e-5)
    assert np.abs(outs[0.3] - base).mean() > 1e-3


def test_a_method_it_has_never_heard_of_is_served_by_its_family(tiny_sd, tmp_path, pipe):
    """Nothing depends on the method's name: an artifact of a new conditioning-family method
    ("my_method") gives prompt embeddings that are its learned rows, and slots named after it."""
    art = tmp_path / "mine"
    hand_made_artifact(art, load_components(str(tiny_sd)), "ft_conditioning", 0.3, meta_method="my_method")
    g = _generate_cfg("my_method", **{"generate.conditioning": art})
    method = FinetunedGeneration("my_method")
    rows = method.plan(CLASSES, g, dataset=None, finetune=None)
    assert [r[schema.METHOD] for r in rows] == ["my_method"] * 2 and all(r[schema.PROMPT] == "" for r in rows)
    assert rows != FinetunedGeneration("other").slot_rows([dict(r) for r in rows], g)  # ids and seeds use the name
    method.setup(pipe, g, None)
    kwargs = method.call_kwargs(rows, g)
    assert kwargs["prompt_embeds"].shape == (2, 77, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(kwargs["prompt_embeds"][0], method.table[0])


def test_the_artifact_must_be_of_the_same_method(tiny_sd, tmp_path):
    art = tmp_path / "ti"
    hand_made_artifact(art, load_components(str(tiny_sd)), "textual_inversion", 0.0)
    with pytest.raises(ConfigError, match=r"points to a 'textual_inversion' artifact but generate\.method is "
                                          r"'pseudoword_dm'"):
        FinetunedGeneration("pseudoword_dm").plan(CLASSES, _generate_cfg("pseudoword_dm"), dataset=None,
                                           finetune=Artifact("finetune", "x", art))


def test_no_artifact_is_a_config_error_saying_where_to_give_one():
    with pytest.raises(ConfigError, match=r"generate\.method=imagic needs a fine-tuning artifact.*"
                                          r"generate\.conditioning"):
        FinetunedGeneration("imagic").plan([], load_config().generate, dataset=None, finetune=None)


def test_clusters_are_drawn_in_proportion_to_their_size():
    cands = [{schema.COND_ROW: 0, schema.N_IMAGES: 30}, {schema.COND_ROW: 1, schema.N_IMAGES: 10},
             {schema.COND_ROW: 2, schema.N_IMAGES: 0}]
    drawn = [r[schema.COND_ROW] for r in draw_rows(cands, 4000, np.random.default_rng(0))]
    assert drawn.count(2) == 0
    assert drawn.count(0) / len(drawn) == pytest.approx(0.75, abs=0.03)


def test_pseudoword_generation_draws_the_papers_templates_per_image(tiny_sd, tmp_path):
    """Textual inversion / pseudo-word + DM sample Gal et al.'s templates (paper 3.1, Figure 12), one
    drawn per image with replacement and seeded per class, not one fixed prompt; the prompt that
    is encoded is the slot's template."""
    art = tmp_path / "ti"
    comps = load_components(str(tiny_sd))
    hand_made_artifact(art, comps, "textual_inversion", 0.0)
    g = _generate_cfg("textual_inversion", **{"generate.images_per_class": 60})
    method = FinetunedGeneration("textual_inversion")
    rows = method.plan(CLASSES, g, dataset=None, finetune=Artifact("finetune", "x", art))
    prompts = [r[schema.PROMPT] for r in rows]
    assert set(prompts) <= {t.format("<raug-0>") for t in TEMPLATES}
    assert len(set(prompts)) >= 15  # 60 draws from 27 templates
    assert prompts == [r[schema.PROMPT] for r in method.plan(CLASSES, g, dataset=None,
                                                            finetune=Artifact("finetune", "x", art))]
    ids = family_of("embeddings").generation_ids(comps, [r[schema.PARAMS][TEMPLATE_PARAM] for r in rows[:3]])
    want = comps["tokenizer"]([TEMPLATES[r[schema.PARAMS][TEMPLATE_PARAM]].format("*") for r in rows[:3]],
                              padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, want)
