"""The Hugging Face families and the conversions that dispatch on them: configs, params, whole checkpoints."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from bigmodel.hf import bert, gpt2, llama
from bigmodel.hf.io import read_config, read_state_dict, write_checkpoint
from bigmodel.hf.mapping import Family, Params, StateDict, shapes, tree_map

if TYPE_CHECKING:
    import flax.linen as nn

# Every supported HF architecture; a new one is a module like gpt2.py plus its FAMILY here.
FAMILIES: tuple[Family, ...] = (gpt2.FAMILY, llama.FAMILY, bert.FAMILY)


def _names(values: list[str]) -> str:
    """'a', 'a' and 'b', or 'a', 'b' and 'c'."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def family_for_hf(hf: dict) -> Family:
    """The family of a HF config.json (by its model_type)."""
    kind = hf.get("model_type")
    for family in FAMILIES:
        if family.model_type == kind:
            return family
    raise ValueError(f"config.json has model_type={kind!r}; bigmodel imports "
                     f"{_names([f.model_type for f in FAMILIES])} checkpoints")


def family_for_model(cfg: ml_collections.ConfigDict) -> Family:
    """The first family of `config.model`'s name whose layout holds the model (else the first one's refusal)."""
    candidates = [f for f in FAMILIES if f.name == cfg.name]
    if not candidates:
        names = list(dict.fromkeys(f.name for f in FAMILIES))
        raise ValueError(f"model.name={cfg.name!r}; Hugging Face conversion supports model.name {_names(names)}")
    errors = []
    for family in candidates:
        try:
            family.check_layout(cfg)
            return family
        except ValueError as e:
            errors.append(e)
    raise errors[0]


def model_config(hf: dict) -> ml_collections.ConfigDict:
    """Our `config.model` for a HF config dict."""
    return family_for_hf(hf).config_from_hf(hf)


def hf_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The HF config.json contents for our `config.model`."""
    return family_for_model(cfg).config_to_hf(cfg)


def module_config(module: nn.Module) -> dict[str, Any]:
    """The `config.model` fields of a GPT or BertMLM module (from its static config)."""
    from bigmodel.models import bert as bert_model, gpt

    if isinstance(module, gpt.GPT):
        if getattr(module.cfg, "mup", False):
            raise ValueError("a muP GPT computes other logits than GPT-2 from the same weights; "
                             "save_pretrained writes standard-parameterisation GPTs only")
        return {"name": "gpt", **dataclasses.asdict(module.cfg)}
    if isinstance(module, bert_model.BertMLM):
        return {"name": "bert", "head": "mlm", **dataclasses.asdict(module.cfg)}
    raise TypeError(f"save_pretrained supports models.gpt.GPT and models.bert.BertMLM, not {type(module).__name__}")


def check_shapes(params: Params, module: nn.Module, cfg: ml_collections.ConfigDict) -> None:
    """Refuse params whose names or shapes differ from what `module` creates."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    dummy = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    want = shapes(nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), dummy))["params"]))
    got = shapes(params)
    if want != got:
        wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError("converted parameters do not fit the model: " + ", ".join(
            f"{k} expected {want.get(k)} got {got.get(k)}" for k in wrong[:4]))


def convert(state: StateDict, cfg: ml_collections.ConfigDict, seed: int = 0, family: Family | None = None) -> Params:
    """Our params (float32 numpy) for `config.model` from a HF state dict; parts it lacks are initialised from seed.

    `family` is the checkpoint's (family_for_hf); by default the one `config.model` exports to.
    """
    from bigmodel import models

    family = family or family_for_model(cfg)
    params = family.params_from_hf(state, cfg, seed)
    params = tree_map(lambda x: np.asarray(x, np.float32), params)
    check_shapes(params, models.build(cfg), cfg)
    return params


def from_pretrained(path: str | pathlib.Path) -> tuple[nn.Module, Params]:
    """(module, params) from a HF checkpoint directory; apply gives logits [B, T, V]."""
    import jax.numpy as jnp

    from bigmodel import models

    hf = read_config(path)
    family = family_for_hf(hf)
    cfg = family.config_from_hf(hf)
    params = convert(read_state_dict(path), cfg, family=family)
    return models.build(cfg), tree_map(jnp.asarray, params)


def save_pretrained(module: nn.Module, params: Params, path: str | pathlib.Path) -> None:
    """Write config.json + model.safetensors that `transformers` loads (GPT2LMHeadModel / BertForMaskedLM)."""
    import flax.linen as nn

    cfg = ml_collections.ConfigDict(module_config(module))
    family = family_for_model(cfg)
    state = family.params_to_hf(nn.meta.unbox(params), cfg)
    write_checkpoint(path, state, family.config_to_hf(cfg))
