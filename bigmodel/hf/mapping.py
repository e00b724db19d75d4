"""What every Hugging Face family module shares: the Family record and the tensor-mapping helpers.

A family module (gpt2.py, bert.py, …) converts one HF architecture to one of our model
families and back, and describes itself with a `Family`; conversion.py lists the families.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

# HF activation names -> layers.ACTIVATIONS (both tanh forms compute the same function).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture and how it maps onto one of our model families."""

    model_type: str  # config.json's model_type, e.g. 'gpt2'
    name: str  # our config.model.name it imports as, e.g. 'gpt'
    task: str  # the training task of the imported model ('lm', 'mlm')
    hf_name: str  # for messages, e.g. 'Hugging Face GPT-2'
    # Structural switches of config.model at the only value(s) the HF architecture can express;
    # a tuple lists several. Export picks the first family of a model name whose layout fits.
    layout: Mapping[str, Any]
    config_from_hf: Callable[[dict], ml_collections.ConfigDict]  # HF config.json -> our config.model
    config_to_hf: Callable[[ml_collections.ConfigDict], dict[str, Any]]  # and back
    params_from_hf: Callable[[StateDict, ml_collections.ConfigDict, int], Params]  # int: seed for missing parts
    params_to_hf: Callable[[Params, ml_collections.ConfigDict], StateDict]

    def check_layout(self, cfg: ml_collections.ConfigDict) -> None:
        """Refuse a model whose structure this HF architecture cannot hold."""
        for key, allowed in self.layout.items():
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if key in cfg and cfg[key] not in allowed and not (key == "num_kv_heads" and cfg[key] == cfg.num_heads):
                raise ValueError(
                    f"model.{key}={cfg[key]!r} has no {self.hf_name} equivalent (it needs {allowed[0]!r}); "
                    "export only GPT-2, Llama or BERT-layout models"
                )


def require(hf: dict, key: str, ok: Callable[[Any], bool], why: str) -> None:
    """Refuse a config.json value our model cannot reproduce (absent or null values pass)."""
    if key in hf and hf[key] is not None and not ok(hf[key]):
        raise ValueError(f"config.json has {key}={hf[key]!r}, which bigmodel cannot reproduce: {why}")


class Tensors:
    """A state dict that hands out tensors by name and remembers which were used."""

    def __init__(self, state: StateDict) -> None:
        self.state, self.used = state, set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise KeyError(f"the checkpoint has no tensor {key!r}; is config.json the one these weights belong to?")
        self.used.add(key)
        return self.state[key]

    def refuse_leftovers(self, droppable: Callable[[str], bool], model: str, accepted: str) -> None:
        """Raise if a tensor was neither used nor known to be safe to drop (a different architecture)."""
        left = sorted(k for k in self.state if k not in self.used and not droppable(k))
        if left:
            more = " …" if len(left) > 8 else ""
            raise ValueError(f"the checkpoint has tensors {model} has no place for: {left[:8]}{more}; "
                             f"{accepted} import")


def layer_norm(scale: np.ndarray, bias: np.ndarray) -> Params:
    """Our LayerNorm subtree (layers.LayerNorm wraps nn.LayerNorm as LayerNorm_0)."""
    return {"LayerNorm_0": {"scale": scale, "bias": bias}}


def hf_layer_norm(t: Tensors, name: str) -> Params:
    """Our LayerNorm subtree from the HF LayerNorm `name`."""
    # Old TF-converted checkpoints call the LayerNorm parameters gamma/beta.
    if f"{name}.weight" in t:
        return layer_norm(t(f"{name}.weight"), t(f"{name}.bias"))
    return layer_norm(t(f"{name}.gamma"), t(f"{name}.beta"))


def tree_map(fn: Callable[..., Any], *trees: Any) -> Any:
    """Map over the leaves of nested dicts (parameter trees) in lockstep."""
    if isinstance(trees[0], Mapping):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} for every leaf of a parameter tree."""
    if isinstance(tree, Mapping):
        return {k: v for name, sub in tree.items() for k, v in shapes(sub, f"{prefix}{name}/").items()}
    return {prefix.rstrip("/"): tuple(tree.shape)}


def stack_layers(params: Params, num_layers: int, prefix: str, name: str) -> Params:
    """block_0..block_{L-1} -> one subtree with a leading layer axis (nn.scan's layout)."""
    blocks = [params.pop(f"{prefix}{i}") for i in range(num_layers)]
    params[name] = tree_map(lambda *xs: np.stack(xs), *blocks)
    return params


def unstack_layers(params: Params, num_layers: int, prefix: str, name: str) -> Params:
    """The inverse of stack_layers, on a copy."""
    params = dict(params)
    stacked = params.pop(name)
    for i in range(num_layers):
        params[f"{prefix}{i}"] = tree_map(lambda x, i=i: x[i], stacked)
    return params


def gpt_blocks_in(params: Params, cfg: ml_collections.ConfigDict) -> Params:
    """GPT params with per-layer block_i subtrees, stacked into `blocks` where the model scans its layers."""
    return stack_layers(params, cfg.num_layers, "block_", "blocks") if cfg.scan_layers else params


def gpt_blocks_out(params: Params, cfg: ml_collections.ConfigDict) -> Params:
    """GPT params as host arrays with one block_i subtree per layer (unstacked where the model scans)."""
    params = tree_map(np.asarray, params)
    return unstack_layers(params, cfg.num_layers, "block_", "blocks") if cfg.scan_layers else params
