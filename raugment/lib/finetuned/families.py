"""How a learned table becomes the UNet's conditioning: the two families of fine-tuned methods.

Every fine-tuning method (paper 3.1, methods 5-9; the plug-ins in
``raugment/stages/finetune/methods/``) learns a **table indexed by conditioning row** (one row per
class, or per class and cluster), so all classes train in one job. What a row is, and how rows
become ``encoder_hidden_states``, depends only on the table's family:

* :class:`ConditioningFamily` (safetensors key ``conditioning``): a ``[n, 77, d]`` conditioning per
  row, initialised with the text encoding of the no-whitespace simple prompt ② and used as the
  UNet's conditioning as it is (ft_conditioning, ft_cluster_conditioning, imagic);
* :class:`PseudowordFamily` (key ``embeddings``): a ``[n, d]`` token embedding per row, initialised
  with the mean embedding of the class's last word and encoded inside prompts in place of the
  placeholder ``*`` (textual_inversion, pseudoword_dm).

A method may also fine-tune the UNet (``trains_unet``: imagic, pseudoword_dm); its snapshot then
holds the UNet beside the table. The generator needs nothing else: it picks the family from the
snapshot's table key (:func:`family_of`), whatever the method's name.

A family object is stateless: it knows how to initialise its table and how to turn table rows into
the UNet's ``encoder_hidden_states``. The trainable :func:`build_trainable` module holds the
table (and the UNet when it is trained); the frozen parts stay outside it, so DDP synchronises
only what learns.

Pseudo-words: prompts are written with ``*`` in place of the class word (as in Gal et al.); ``*`` is
one token in CLIP's vocabulary, and a forward hook on the text encoder's token embedding replaces
its embedding by the class's learned row. The tokenizer and the text encoder stay untouched, so
the same path serves training and generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

PLACEHOLDER = "*"

# Gal et al.'s (2022) ImageNet-style prompt templates for textual inversion. Pseudo-word methods
# train and generate with them (paper 3.1, method 8, Figure 12: one template per sample, drawn
# with replacement).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)


@dataclass(frozen=True)
class CondRow:
    """One row of the learned table: a class, or one cluster of a class.

    Attributes:
        row: index into the table.
        label: class index.
        class_name: the dataset's class name ("tiger shark, Galeocerdo cuvieri").
        cluster: cluster within the class (0 when the method does not cluster).
        n_images: training images behind the row (generation draws clusters by this).
        token: the pseudo-word's name for pseudo-word methods, else "".
    """

    row: int
    label: int
    class_name: str
    cluster: int = 0
    n_images: int = 0
    token: str = ""


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def init_word(class_name: str) -> str:
    """The word a pseudo-word starts from: the last word of the first lemma.

    ``"tiger shark, Galeocerdo cuvieri"`` -> ``"shark"``; ``"Granny_Smith"`` -> ``"Smith"``.
    """
    first = class_name.split(",")[0].replace("_", " ").strip()
    words = first.split()
    if not words:
        raise ValueError(f"class name {class_name!r} has no word to initialise a pseudo-word from")
    return words[-1]


def init_token_ids(tokenizer: Any, class_name: str) -> list[int]:
    """Token ids of :func:`init_word` (several when BPE splits it; their mean initialises)."""
    ids = tokenizer(init_word(class_name), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"the tokenizer gives no token for {init_word(class_name)!r} ({class_name!r})")
    return list(ids)


def pseudo_token(label: int) -> str:
    """Name of a class's pseudo-word in saved embeddings (``<raug-12>``)."""
    return f"<raug-{label}>"


def sample_templates(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` training prompts with the placeholder, templates drawn with replacement."""
    return [TEMPLATES[i].format(PLACEHOLDER) for i in rng.integers(0, len(TEMPLATES), size=n)]


# --------------------------------------------------------------------------------------------
# Torch helpers
# --------------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> ``[n, 77]`` token ids, padded and truncated like Stable Diffusion does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states ``[n, 77, d]`` of plain prompts (no gradient)."""
    import torch

    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


@contextlib.contextmanager
def replaced_token_embeddings(text_encoder: Any, mask: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """Within the block, the token embedding outputs at ``mask`` positions become ``vectors``.

    Args:
        text_encoder: a ``CLIPTextModel``.
        mask: ``[n, 77]`` bool, True at placeholder positions.
        vectors: ``[n, d]`` one learned embedding per prompt.
    """
    import torch

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        learned = vectors[:, None, :].to(output.dtype).expand_as(output)
        return torch.where(mask[..., None], learned, output)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_with_pseudowords(text_encoder: Any, ids: torch.Tensor, placeholder_id: int,
                            vectors: torch.Tensor) -> torch.Tensor:
    """Hidden states of prompts whose placeholder token carries each prompt's learned vector."""
    mask = ids == placeholder_id
    with replaced_token_embeddings(text_encoder, mask, vectors):
        return text_encoder(ids).last_hidden_state


def placeholder_id(tokenizer: Any) -> int:
    """The single token id of :data:`PLACEHOLDER`."""
    ids = tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"placeholder {PLACEHOLDER!r} is not a single token for this tokenizer: {ids}")
    return ids[0]


def denoising_loss(unet: Any, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Stable Diffusion's training objective: MSE between the UNet's prediction and its target.

    The target is the noise (``epsilon`` models such as SD 1.x) or the velocity (``v_prediction``).
    """
    import torch.nn.functional as F

    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=cond.to(unet.dtype)).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


class Method:
    """A fine-tuned method as the code that trains or samples from it sees it (see the module docstring).

    Subclassed by the two families below; a fine-tuning plug-in subclasses one family and names
    itself (``name``) and whether it also trains the UNet (``trains_unet``).
    """

    name = ""
    trains_unet = False
    pseudowords = False
    table_key = "conditioning"  # safetensors key of the learned table in a checkpoint

    def init_table(self, comps: dict[str, Any], rows: Sequence[CondRow]) -> torch.Tensor:
        """The table before training: one row per :class:`CondRow`."""
        raise NotImplementedError

    def prompt_ids(self, comps: dict[str, Any], n: int, rng: np.random.Generator) -> torch.Tensor | None:
        """Token ids of the prompts of a batch, for methods that encode prompts while training."""
        return None

    def encode(self, comps: dict[str, Any], table: torch.Tensor, rows: torch.Tensor,
               ids: torch.Tensor | None) -> torch.Tensor:
        """``encoder_hidden_states`` ``[b, 77, d]`` for table ``rows`` (and prompt ``ids``)."""
        raise NotImplementedError

    def generation_ids(self, comps: dict[str, Any], templates: Sequence[int]) -> torch.Tensor | None:
        """Token ids the generator encodes with :meth:`encode` (pseudo-word methods only): one
        prompt per image, :data:`TEMPLATES` ``[t]`` with the placeholder, for each ``t`` of ``templates``."""
        return None


class ConditioningFamily(Method):
    """A learned conditioning ``[77, d]`` per row, initialised by encoding the no-whitespace simple prompt."""

    def init_table(self, comps: dict[str, Any], rows: Sequence[CondRow]) -> torch.Tensor:
        from raugment.lib.prompts import simple_nows_prompt

        prompts = [simple_nows_prompt(r.class_name) for r in rows]
        return encode_prompts(comps["text_encoder"], comps["tokenizer"], prompts).float().cpu().clone()

    def encode(self, comps: dict[str, Any], table: torch.Tensor, rows: torch.Tensor,
               ids: torch.Tensor | None) -> torch.Tensor:
        return table[rows]


class PseudowordFamily(Method):
    """A learned token embedding ``[d]`` per row (a pseudo-word), trained inside template prompts."""

    pseudowords = True
    table_key = "embeddings"

    def init_table(self, comps: dict[str, Any], rows: Sequence[CondRow]) -> torch.Tensor:
        import torch

        weight = comps["text_encoder"].get_input_embeddings().weight
        out = []
        for r in rows:
            ids = torch.tensor(init_token_ids(comps["tokenizer"], r.class_name), device=weight.device)
            out.append(weight[ids].detach().float().mean(dim=0).cpu())
        return torch.stack(out)

    def prompt_ids(self, comps: dict[str, Any], n: int, rng: np.random.Generator) -> torch.Tensor:
        return tokenize(comps["tokenizer"], sample_templates(n, rng))

    def generation_ids(self, comps: dict[str, Any], templates: Sequence[int]) -> torch.Tensor:
        return tokenize(comps["tokenizer"], [TEMPLATES[t].format(PLACEHOLDER) for t in templates])

    def encode(self, comps: dict[str, Any], table: torch.Tensor, rows: torch.Tensor,
               ids: torch.Tensor | None) -> torch.Tensor:
        if ids is None:
            raise ValueError("pseudo-word methods need prompt token ids")
        return encode_with_pseudowords(comps["text_encoder"], ids.to(table.device),
                                       placeholder_id(comps["tokenizer"]), table[rows])


# table key -> its family
FAMILIES: dict[str, type[Method]] = {f.table_key: f for f in (ConditioningFamily, PseudowordFamily)}


def family_of(table_key: str) -> Method:
    """The family whose snapshots store their table under ``table_key``; a ValueError naming the known keys."""
    try:
        return FAMILIES[table_key]()
    except KeyError:
        raise ValueError(f"a learned table under {table_key!r} belongs to no fine-tuned family; "
                         f"known: {', '.join(sorted(FAMILIES))}") from None


# --------------------------------------------------------------------------------------------
# The trainable module
# --------------------------------------------------------------------------------------------


def build_trainable(method: Method, comps: dict[str, Any], table: torch.Tensor):
    """The module DDP wraps: the learned table, plus the UNet when the method trains it.

    Frozen parts (text encoder, VAE, and the UNet when not trained) are kept out of the module's
    parameters, so DDP neither broadcasts nor all-reduces them.
    """
    import torch

    class Trainable(torch.nn.Module):
        comps: dict[str, Any]  # set with object.__setattr__ below (a plain attribute, not a submodule)

        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(table.clone().float())
            self.unet = comps["unet"] if method.trains_unet else None
            object.__setattr__(self, "comps", comps)  # not a submodule: frozen, not synchronised
            for name in ("text_encoder", "vae"):
                comps[name].requires_grad_(False)
            comps["unet"].requires_grad_(method.trains_unet)

        def forward(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
            cond = method.encode(self.comps, self.table, rows, ids)
            return denoising_loss(self.comps["unet"], self.comps["noise_scheduler"], latents, noise,
                                  timesteps, cond)

    return Trainable()


def trainable_state(module: Any, method: Method) -> dict[str, torch.Tensor]:
    """The learned tensors of a (possibly DDP-wrapped) trainable module, CPU, contiguous."""
    inner = getattr(module, "module", module)
    state = {method.table_key: inner.table.detach().cpu().contiguous()}
    if method.trains_unet:
        state.update({f"unet.{k}": v.detach().cpu().contiguous() for k, v in inner.unet.state_dict().items()})
    return state


def load_trainable_state(module: Any, method: Method, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state`."""
    import torch

    inner = getattr(module, "module", module)
    with torch.no_grad():
        inner.table.copy_(state[method.table_key])
    if method.trains_unet:
        inner.unet.load_state_dict({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
