"""Hugging Face weight interop: GPT-2 and BERT checkpoints to and from our modules.

  module, params = from_pretrained("path/to/hf_dir")   # config.json + model.safetensors
  logits = module.apply({"params": params}, input_ids)  # [B, T, V]
  save_pretrained(module, params, "path/to/out")       # transformers can load it

Einsum letters: B batch, T query length, D model width, N heads, H head dim, F MLP
hidden, V vocab.

Weight layouts. HF GPT-2 uses Conv1D, whose weight is [in, out] (y = x @ W + b); its
c_attn packs query, key and value as [D, 3D], each third laid out (N, H). HF BERT uses
nn.Linear, whose weight is [out, in]. Our attention kernels are [D, N, H] (query, key,
value) and [N, H, D] (output); our Dense kernels are [in, out].

What maps:
- GPT2LMHeadModel / GPT2Model -> `models.gpt.GPT`. Dropped: the attention-mask buffers of
  old checkpoints (`attn.bias`, `attn.masked_bias`), a stored `lm_head.weight` when the
  embeddings are tied (it is the token table) and GPT2DoubleHeadsModel's
  `multiple_choice_head`. Settings GPT cannot reproduce (another activation or LayerNorm
  epsilon, per-layer attention scaling, cross-attention) are refused.
- BertForMaskedLM / BertForPreTraining / BertModel -> `models.bert.BertMLM`. Dropped: the
  pooler and the next-sentence head (`cls.seq_relationship`), which BertMLM does not have.
  A BertModel checkpoint has no MLM head: `mlm_transform`, `mlm_transform_ln` and
  `mlm_bias` are then freshly initialised (and a warning says so), so its logits are
  meaningless until fine-tuned. The MLM output matrix is always tied to the word table.
- Our BERT masks keys whose token id is 0 ([PAD]); pass HF the same
  `attention_mask=(ids != 0)` to compare. hidden_act 'gelu' (exact), 'gelu_new' /
  'gelu_pytorch_tanh' (tanh form) and 'relu' import; others are refused.
- Dropout: GPT takes `resid_pdrop` and BERT `hidden_dropout_prob` as model.dropout; our
  attention has no dropout on its probabilities, so attn_pdrop /
  attention_probs_dropout_prob are not used (exports write 0).

`bigmodel import-hf --from DIR --workdir W` turns a checkpoint into a workdir whose
step-0 checkpoint holds the imported weights and a fresh optimizer state; fine-tune it
with `bigmodel train --config W/config.json --workdir W`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import struct
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import ml_collections
import numpy as np

from bigmodel import config as config_lib
from bigmodel.config import ConfigError

if TYPE_CHECKING:
    import flax.linen as nn

# JAX, Flax and the models are imported inside the functions that need them: the `bigmodel`
# command registers import-hf for every subcommand and should not pay for them each time.

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

# HF activation names -> layers.ACTIVATIONS (both tanh forms compute the same function).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# Keys that fix the function the imported weights compute: overrides may not change them.
ARCHITECTURE_KEYS = ("name", "vocab_size", "max_len", "num_layers", "d_model", "num_heads", "d_ff",
                     "tie_embeddings", "type_vocab_size", "layer_norm_eps", "activation", "mup")
DEFAULT_EXPERIMENT = "experiments/gpt_tiny.py"


# --------------------------------------------------------------------------- reading


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The HF config.json of a checkpoint directory."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    return json.loads(file.read_text())


# safetensors dtype codes; BF16 (which numpy lacks) comes from ml_dtypes, a JAX dependency.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(file: pathlib.Path) -> StateDict:
    """Parse a .safetensors file directly (for dtypes the numpy API cannot express)."""
    import ml_dtypes

    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        out[name] = np.asarray(data[start:end]).view(dtype).reshape(info["shape"])
    return out


def _read_safetensors(file: pathlib.Path) -> StateDict:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except TypeError:  # bfloat16 checkpoints
        return _read_safetensors_raw(file)


def _read_torch(file: pathlib.Path) -> StateDict:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {file} needs PyTorch (pip install torch); safetensors files do not") from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_state_dict(path: str | pathlib.Path) -> StateDict:
    """All tensors of a checkpoint directory as float32 numpy arrays (safetensors preferred)."""
    path = pathlib.Path(path)
    candidates = (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_torch))
    for name, reader in candidates:
        if (path / name).is_file():
            files = [path / name]
        elif (path / f"{name}.index.json").is_file():  # sharded checkpoints
            weight_map = json.loads((path / f"{name}.index.json").read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
        else:
            continue
        state: StateDict = {}
        for file in files:
            state.update(reader(file))
        # Our parameters are float32 whatever the checkpoint stores (float16, bfloat16 …).
        return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else np.asarray(v)
                for k, v in state.items()}
    raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin (nor a sharded index)")


# --------------------------------------------------------------------------- configs


def _require(hf: dict, key: str, ok: Callable[[Any], bool], why: str) -> None:
    if key in hf and hf[key] is not None and not ok(hf[key]):
        raise ValueError(f"config.json has {key}={hf[key]!r}, which bigmodel cannot reproduce: {why}")


def gpt_model_config(hf: dict) -> ml_collections.ConfigDict:
    """Our GPT `config.model` for a HF GPT2Config (refuses settings GPT cannot reproduce)."""
    _require(hf, "activation_function", lambda a: HF_ACTIVATIONS.get(a) == "gelu_tanh",
             "GPT's MLP uses tanh-approximated GELU ('gelu_new')")
    _require(hf, "layer_norm_epsilon", lambda e: math.isclose(e, 1e-5, rel_tol=1e-6),
             "GPT's LayerNorm epsilon is 1e-5")
    _require(hf, "scale_attn_weights", lambda s: s is True, "GPT scales attention scores by 1/sqrt(head_dim)")
    _require(hf, "scale_attn_by_inverse_layer_idx", lambda s: s is False, "GPT has no per-layer attention scaling")
    _require(hf, "add_cross_attention", lambda s: s is False, "GPT is decoder-only without cross-attention")
    from bigmodel.models import gpt

    cfg = gpt.model_config("nano")  # the full field set; every size field is overwritten below
    cfg.size = "hf"
    cfg.vocab_size = int(hf["vocab_size"])
    cfg.max_len = int(hf["n_positions"])
    cfg.num_layers = int(hf["n_layer"])
    cfg.d_model = int(hf["n_embd"])
    cfg.num_heads = int(hf["n_head"])
    cfg.d_ff = int(hf.get("n_inner") or 0)  # None means 4·n_embd, as our 0
    cfg.dropout = float(hf.get("resid_pdrop", 0.1))
    cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"config.json has n_embd={cfg.d_model} not divisible by n_head={cfg.num_heads}")
    return cfg


def bert_model_config(hf: dict) -> ml_collections.ConfigDict:
    """Our BERT `config.model` (MLM head) for a HF BertConfig."""
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"config.json has hidden_act={act!r}; bigmodel's BERT supports {sorted(HF_ACTIVATIONS)} "
                         "('gelu' is the exact erf GELU of the original BERT)")
    _require(hf, "position_embedding_type", lambda p: p == "absolute", "BERT here uses absolute positions")
    _require(hf, "is_decoder", lambda s: s is False, "BERT here is an encoder")
    _require(hf, "tie_word_embeddings", lambda s: s is True, "BertMLM ties its output matrix to the word table")
    if hf.get("pad_token_id", 0) != 0:
        warnings.warn(f"config.json has pad_token_id={hf['pad_token_id']}, but bigmodel's BERT masks id 0 as padding",
                      stacklevel=2)
    from bigmodel.models import bert

    cfg = bert.model_config("tiny")
    cfg.size = "hf"
    cfg.head = "mlm"
    cfg.vocab_size = int(hf["vocab_size"])
    cfg.max_len = int(hf["max_position_embeddings"])
    cfg.type_vocab_size = int(hf.get("type_vocab_size", 2))
    cfg.num_layers = int(hf["num_hidden_layers"])
    cfg.d_model = int(hf["hidden_size"])
    cfg.num_heads = int(hf["num_attention_heads"])
    cfg.d_ff = int(hf["intermediate_size"])
    cfg.dropout = float(hf.get("hidden_dropout_prob", 0.1))
    cfg.layer_norm_eps = float(hf.get("layer_norm_eps", 1e-12))
    cfg.activation = HF_ACTIVATIONS[act]
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"config.json has hidden_size={cfg.d_model} not divisible by "
                         f"num_attention_heads={cfg.num_heads}")
    return cfg


def model_config(hf: dict) -> ml_collections.ConfigDict:
    """Our `config.model` for a HF config dict (GPT-2 or BERT)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return gpt_model_config(hf)
    if kind == "bert":
        return bert_model_config(hf)
    raise ValueError(f"config.json has model_type={kind!r}; bigmodel imports 'gpt2' and 'bert' checkpoints")


# Structural switches a Hugging Face GPT-2 / BERT checkpoint can express, at their only value.
GPT2_LAYOUT = {"position": "learned", "norm": "layernorm", "activation": "gelu_tanh", "num_kv_heads": (0, None),
               "use_bias": True, "mup": False, "num_experts": 0}
BERT_LAYOUT = {"position": "learned"}


def _require_layout(cfg: ml_collections.ConfigDict, layout: dict[str, Any], hf_name: str) -> None:
    """Refuse to export a model whose structure the target architecture cannot hold."""
    for key, allowed in layout.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if key in cfg and cfg[key] not in allowed and not (key == "num_kv_heads" and cfg[key] == cfg.num_heads):
            raise ValueError(
                f"model.{key}={cfg[key]!r} has no {hf_name} equivalent (it needs {allowed[0]!r}); "
                "export only GPT-2/BERT-layout models"
            )


def hf_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The HF config.json contents for our `config.model` (GPT or BERT MLM)."""
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
    if cfg.name == "gpt":
        _require_layout(cfg, GPT2_LAYOUT, "Hugging Face GPT-2")
        # GPT2Config defaults its special ids to GPT-2's <|endoftext|>; outside that vocabulary none is known.
        eot = 50256 if cfg.vocab_size > 50256 else None
        return dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.max_len,
            n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff or None,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings, scale_attn_weights=True,
            bos_token_id=eot, eos_token_id=eot, dtype="float32",
        )
    if cfg.name == "bert":
        _require_layout(cfg, BERT_LAYOUT, "Hugging Face BERT")
        if cfg.head != "mlm":
            raise ValueError(f"save_pretrained writes BERT with the MLM head; model.head={cfg.head!r} is not supported")
        return dict(
            architectures=["BertForMaskedLM"], model_type="bert", vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
            num_hidden_layers=cfg.num_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.d_ff or 4 * cfg.d_model, hidden_act=act[cfg.activation],
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.layer_norm_eps,
            pad_token_id=0, tie_word_embeddings=True, position_embedding_type="absolute", dtype="float32",
        )
    raise ValueError(f"save_pretrained supports model.name 'gpt' and 'bert', not {cfg.name!r}")


# --------------------------------------------------------------------------- weights


class _Tensors:
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


def _ln(w: np.ndarray, b: np.ndarray) -> Params:
    return {"LayerNorm_0": {"scale": w, "bias": b}}


def _hf_ln(t: _Tensors, name: str) -> Params:
    # Old TF-converted checkpoints call the LayerNorm parameters gamma/beta.
    if f"{name}.weight" in t:
        return _ln(t(f"{name}.weight"), t(f"{name}.bias"))
    return _ln(t(f"{name}.gamma"), t(f"{name}.beta"))


def _tree_map(fn: Callable[..., Any], *trees: Any) -> Any:
    """Map over the leaves of nested dicts (parameter trees) in lockstep."""
    if isinstance(trees[0], Mapping):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def _shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} for every leaf of a parameter tree."""
    if isinstance(tree, Mapping):
        return {k: v for name, sub in tree.items() for k, v in _shapes(sub, f"{prefix}{name}/").items()}
    return {prefix.rstrip("/"): tuple(tree.shape)}


def _stack_layers(params: Params, num_layers: int, prefix: str, name: str) -> Params:
    """block_0..block_{L-1} -> one subtree with a leading layer axis (nn.scan's layout)."""
    blocks = [params.pop(f"{prefix}{i}") for i in range(num_layers)]
    params[name] = _tree_map(lambda *xs: np.stack(xs), *blocks)
    return params


def _unstack_layers(params: Params, num_layers: int, prefix: str, name: str) -> Params:
    params = dict(params)
    stacked = params.pop(name)
    for i in range(num_layers):
        params[f"{prefix}{i}"] = _tree_map(lambda x, i=i: x[i], stacked)
    return params


def gpt_params_from_hf(state: StateDict, cfg: ml_collections.ConfigDict) -> Params:
    """GPT params from a GPT2LMHeadModel/GPT2Model state dict."""
    t = _Tensors(state)
    pre = "transformer." if "transformer.wte.weight" in state else ""
    d, n = cfg.d_model, cfg.num_heads
    h = d // n
    params: Params = {"wte": {"embedding": t(pre + "wte.weight")}, "wpe": t(pre + "wpe.weight"),
                      "ln_f": _hf_ln(t, pre + "ln_f")}
    for i in range(cfg.num_layers):
        p = f"{pre}h.{i}."
        qkv_w, qkv_b = t(p + "attn.c_attn.weight"), t(p + "attn.c_attn.bias")  # [D, 3D], [3D]
        attn = {}
        for j, name in enumerate(("query", "key", "value")):
            attn[f"{name}_kernel"] = qkv_w[:, j * d:(j + 1) * d].reshape(d, n, h)
            attn[f"{name}_bias"] = qkv_b[j * d:(j + 1) * d].reshape(n, h)
        attn["out_kernel"] = t(p + "attn.c_proj.weight").reshape(n, h, d)  # rows are the merged heads
        attn["out_bias"] = t(p + "attn.c_proj.bias")
        params[f"block_{i}"] = {
            "ln_1": _hf_ln(t, p + "ln_1"),
            "attn": attn,
            "ln_2": _hf_ln(t, p + "ln_2"),
            "mlp": {
                "fc_in": {"kernel": t(p + "mlp.c_fc.weight"), "bias": t(p + "mlp.c_fc.bias")},
                "fc_out": {"kernel": t(p + "mlp.c_proj.weight"), "bias": t(p + "mlp.c_proj.bias")},
            },
        }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": t("lm_head.weight").T}  # [V, D] -> [D, V]
    # Old checkpoints store the causal-mask buffers; tied ones may store the head as a copy of wte.
    t.refuse_leftovers(
        lambda k: (k.endswith((".attn.bias", ".attn.masked_bias")) or k.startswith("multiple_choice_head.")
                   or (cfg.tie_embeddings and k == "lm_head.weight")),
        "GPT", "GPT2LMHeadModel, GPT2DoubleHeadsModel and GPT2Model weights")
    if cfg.scan_layers:
        params = _stack_layers(params, cfg.num_layers, "block_", "blocks")
    return params


def gpt_params_to_hf(params: Params, cfg: ml_collections.ConfigDict) -> StateDict:
    """A GPT2LMHeadModel state dict from GPT params."""
    params = _tree_map(np.asarray, params)
    if cfg.scan_layers:
        params = _unstack_layers(params, cfg.num_layers, "block_", "blocks")
    d = cfg.d_model
    out = {"transformer.wte.weight": params["wte"]["embedding"], "transformer.wpe.weight": params["wpe"],
           "transformer.ln_f.weight": params["ln_f"]["LayerNorm_0"]["scale"],
           "transformer.ln_f.bias": params["ln_f"]["LayerNorm_0"]["bias"]}
    for i in range(cfg.num_layers):
        blk, p = params[f"block_{i}"], f"transformer.h.{i}."
        attn = blk["attn"]
        qkv = ("query", "key", "value")
        out[p + "attn.c_attn.weight"] = np.concatenate([attn[f"{n}_kernel"].reshape(d, d) for n in qkv], axis=1)
        out[p + "attn.c_attn.bias"] = np.concatenate([attn[f"{n}_bias"].reshape(d) for n in qkv])
        out[p + "attn.c_proj.weight"] = attn["out_kernel"].reshape(d, d)
        out[p + "attn.c_proj.bias"] = attn["out_bias"]
        for ln in ("ln_1", "ln_2"):
            out[p + f"{ln}.weight"] = blk[ln]["LayerNorm_0"]["scale"]
            out[p + f"{ln}.bias"] = blk[ln]["LayerNorm_0"]["bias"]
        out[p + "mlp.c_fc.weight"] = blk["mlp"]["fc_in"]["kernel"]
        out[p + "mlp.c_fc.bias"] = blk["mlp"]["fc_in"]["bias"]
        out[p + "mlp.c_proj.weight"] = blk["mlp"]["fc_out"]["kernel"]
        out[p + "mlp.c_proj.bias"] = blk["mlp"]["fc_out"]["bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out


def _linear_heads(t: _Tensors, name: str, n: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """nn.Linear [D_out, D_in] -> our [D, N, H] kernel and [N, H] bias."""
    w = t(f"{name}.weight")
    return w.T.reshape(w.shape[1], n, h), t(f"{name}.bias").reshape(n, h)


def bert_params_from_hf(state: StateDict, cfg: ml_collections.ConfigDict) -> tuple[Params, list[str]]:
    """(BertMLM params, names of MLM-head parameters the checkpoint lacks) from a HF BERT state dict."""
    t = _Tensors(state)
    pre = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    d, n = cfg.d_model, cfg.num_heads
    h = d // n
    word = t(pre + "embeddings.word_embeddings.weight")
    encoder: Params = {
        "embeddings": {
            "word": {"embedding": word},
            "position": t(pre + "embeddings.position_embeddings.weight"),
            "token_type": t(pre + "embeddings.token_type_embeddings.weight"),
            "layer_norm": _hf_ln(t, pre + "embeddings.LayerNorm"),
        }
    }
    for i in range(cfg.num_layers):
        p = f"{pre}encoder.layer.{i}."
        attn = {}
        for name in ("query", "key", "value"):
            attn[f"{name}_kernel"], attn[f"{name}_bias"] = _linear_heads(t, p + f"attention.self.{name}", n, h)
        attn["out_kernel"] = t(p + "attention.output.dense.weight").T.reshape(n, h, d)
        attn["out_bias"] = t(p + "attention.output.dense.bias")
        encoder[f"layer_{i}"] = {
            "attention": attn,
            "attention_ln": _hf_ln(t, p + "attention.output.LayerNorm"),
            "mlp": {
                "fc_in": {"kernel": t(p + "intermediate.dense.weight").T, "bias": t(p + "intermediate.dense.bias")},
                "fc_out": {"kernel": t(p + "output.dense.weight").T, "bias": t(p + "output.dense.bias")},
            },
            "output_ln": _hf_ln(t, p + "output.LayerNorm"),
        }
    params: Params = {"bert": encoder}
    missing = []
    cls = "cls.predictions."
    if cls + "transform.dense.weight" in t:
        params["mlm_transform"] = {"kernel": t(cls + "transform.dense.weight").T,
                                   "bias": t(cls + "transform.dense.bias")}
        params["mlm_transform_ln"] = _hf_ln(t, cls + "transform.LayerNorm")
        params["mlm_bias"] = t(cls + "bias") if cls + "bias" in t else t(cls + "decoder.bias")
        if cls + "decoder.weight" in t and not np.array_equal(t(cls + "decoder.weight"), word):
            raise ValueError("the checkpoint's MLM decoder differs from the word embeddings; BertMLM always ties them")
    else:
        missing = ["mlm_transform", "mlm_transform_ln", "mlm_bias"]
    # Not part of BertMLM: the pooler and the next-sentence head; position_ids is a buffer of
    # old checkpoints; the decoder bias is the same tensor as cls.predictions.bias.
    t.refuse_leftovers(
        lambda k: (k.startswith((pre + "pooler.", "cls.seq_relationship.")) or k.endswith("embeddings.position_ids")
                   or k == cls + "decoder.bias"),
        "BertMLM", "BertForMaskedLM, BertForPreTraining and BertModel weights")
    return params, missing


def bert_params_to_hf(params: Params, cfg: ml_collections.ConfigDict) -> StateDict:
    """A BertForMaskedLM state dict from BertMLM params."""
    params = _tree_map(np.asarray, params)
    enc, d = params["bert"], cfg.d_model
    emb = enc["embeddings"]
    out = {"bert.embeddings.word_embeddings.weight": emb["word"]["embedding"],
           "bert.embeddings.position_embeddings.weight": emb["position"],
           "bert.embeddings.token_type_embeddings.weight": emb["token_type"]}

    def ln(name: str, tree: Params) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = tree["LayerNorm_0"]["scale"], tree["LayerNorm_0"]["bias"]

    ln("bert.embeddings.LayerNorm", emb["layer_norm"])
    for i in range(cfg.num_layers):
        layer, p = enc[f"layer_{i}"], f"bert.encoder.layer.{i}."
        attn = layer["attention"]
        for name in ("query", "key", "value"):
            out[p + f"attention.self.{name}.weight"] = attn[f"{name}_kernel"].reshape(d, d).T
            out[p + f"attention.self.{name}.bias"] = attn[f"{name}_bias"].reshape(d)
        out[p + "attention.output.dense.weight"] = attn["out_kernel"].reshape(d, d).T
        out[p + "attention.output.dense.bias"] = attn["out_bias"]
        ln(p + "attention.output.LayerNorm", layer["attention_ln"])
        out[p + "intermediate.dense.weight"] = layer["mlp"]["fc_in"]["kernel"].T
        out[p + "intermediate.dense.bias"] = layer["mlp"]["fc_in"]["bias"]
        out[p + "output.dense.weight"] = layer["mlp"]["fc_out"]["kernel"].T
        out[p + "output.dense.bias"] = layer["mlp"]["fc_out"]["bias"]
        ln(p + "output.LayerNorm", layer["output_ln"])
    out["cls.predictions.transform.dense.weight"] = params["mlm_transform"]["kernel"].T
    out["cls.predictions.transform.dense.bias"] = params["mlm_transform"]["bias"]
    ln("cls.predictions.transform.LayerNorm", params["mlm_transform_ln"])
    out["cls.predictions.bias"] = params["mlm_bias"]
    return out


# --------------------------------------------------------------------------- public API


def _check_shapes(params: Params, module: nn.Module, cfg: ml_collections.ConfigDict) -> None:
    """Refuse params whose names or shapes differ from what `module` creates."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    dummy = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    want = _shapes(nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), dummy))["params"]))
    got = _shapes(params)
    if want != got:
        wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError("converted parameters do not fit the model: " + ", ".join(
            f"{k} expected {want.get(k)} got {got.get(k)}" for k in wrong[:4]))


def fresh_mlm_head(cfg: ml_collections.ConfigDict, seed: int = 0) -> Params:
    """A new BertMLM head, initialised as BertMLM does: dense N(0, 0.02), LayerNorm 1/0, output bias 0."""
    d = cfg.d_model
    kernel = np.random.default_rng(seed).normal(0.0, 0.02, (d, d))  # numpy: no compile for a few arrays
    return {"mlm_transform": {"kernel": kernel, "bias": np.zeros(d)}, "mlm_transform_ln": _ln(np.ones(d), np.zeros(d)),
            "mlm_bias": np.zeros(cfg.vocab_size)}


def convert(state: StateDict, cfg: ml_collections.ConfigDict, seed: int = 0) -> Params:
    """Our params (float32 numpy) for `config.model` from a HF state dict; a missing MLM head is initialised."""
    from bigmodel import models

    if cfg.name == "gpt":
        params = gpt_params_from_hf(state, cfg)
    elif cfg.name == "bert":
        params, missing = bert_params_from_hf(state, cfg)
        if missing:
            warnings.warn(f"the checkpoint has no MLM head (a BertModel); {', '.join(missing)} are freshly "
                          "initialised, so the MLM logits are untrained", stacklevel=2)
            params.update(fresh_mlm_head(cfg, seed))
    else:
        raise ValueError(f"model.name={cfg.name!r}; Hugging Face import supports 'gpt' and 'bert'")
    params = _tree_map(lambda x: np.asarray(x, np.float32), params)
    _check_shapes(params, models.build(cfg), cfg)
    return params


def from_pretrained(path: str | pathlib.Path) -> tuple[nn.Module, Params]:
    """(module, params) from a HF GPT-2 or BERT checkpoint directory; apply gives logits [B, T, V]."""
    import jax.numpy as jnp

    from bigmodel import models

    cfg = model_config(read_config(path))
    params = convert(read_state_dict(path), cfg)
    return models.build(cfg), _tree_map(jnp.asarray, params)


def save_pretrained(module: nn.Module, params: Params, path: str | pathlib.Path) -> None:
    """Write config.json + model.safetensors that `transformers` loads (GPT2LMHeadModel / BertForMaskedLM)."""
    import flax.linen as nn
    from safetensors.numpy import save_file

    cfg = ml_collections.ConfigDict(module_config(module))
    params = nn.meta.unbox(params)
    state = gpt_params_to_hf(params, cfg) if cfg.name == "gpt" else bert_params_to_hf(params, cfg)
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})  # transformers checks 'format'
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2, sort_keys=True) + "\n")


def module_config(module: nn.Module) -> dict[str, Any]:
    """The `config.model` fields of a GPT or BertMLM module (from its static config)."""
    import dataclasses

    from bigmodel.models import bert, gpt

    if isinstance(module, gpt.GPT):
        if getattr(module.cfg, "mup", False):
            raise ValueError("a muP GPT computes other logits than GPT-2 from the same weights; "
                             "save_pretrained writes standard-parameterisation GPTs only")
        return {"name": "gpt", **dataclasses.asdict(module.cfg)}
    if isinstance(module, bert.BertMLM):
        return {"name": "bert", "head": "mlm", **dataclasses.asdict(module.cfg)}
    raise TypeError(f"save_pretrained supports models.gpt.GPT and models.bert.BertMLM, not {type(module).__name__}")


# --------------------------------------------------------------------------- import-hf


def default_experiment() -> str:
    """experiments/gpt_tiny.py of the current directory, else of the source checkout."""
    here = pathlib.Path(DEFAULT_EXPERIMENT)
    return str(here if here.is_file() else pathlib.Path(__file__).resolve().parents[1] / DEFAULT_EXPERIMENT)


def _step0_state(config: ml_collections.ConfigDict, params: Params) -> Any:
    """A host-side (numpy) TrainState at step 0 holding `params` and a fresh optimizer state.

    Host arrays keep device memory free and make the save cheap; the trainer restores them
    straight onto its own shardings.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bigmodel import sharding, train

    module, task, tx = train.setup_model(config, sharding.axis_sizes())[2:5]
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without 'cpu': the default device will do
        host = None
    with jax.default_device(host):
        opt_state = jax.device_get(jax.jit(tx.init)(params))
    zero = np.zeros((), np.int32)
    state = train.TrainState(step=zero, params=params, opt_state=opt_state, model_state={}, skipped_steps=zero)
    # The trainer's own initial state, abstractly: a mismatch here would otherwise surface as a
    # checkpoint that fails to restore.
    dummy = {"inputs": jnp.zeros((1, min(config.data.seq_len, config.model.max_len)), jnp.int32)}
    expected = nn.meta.unbox(jax.eval_shape(train.init_fn(module, task, tx, dummy), jax.random.key(0)))
    same = jax.tree.structure(expected) == jax.tree.structure(state) and all(
        a.shape == np.shape(b) and a.dtype == np.asarray(b).dtype
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state)))
    if not same:
        raise ValueError(f"the imported state does not match what the trainer builds for model {config.model.name!r}")
    return state


def import_hf(src: str | pathlib.Path, workdir: str | pathlib.Path, config_spec: str | None = None,
              overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Write a workdir (config.json, step-0 checkpoint, tokenizer) from a HF checkpoint; returns its config.

    The config is the experiment's (default experiments/gpt_tiny.py) with `model` replaced by
    the imported model, `data.tokenizer` set to 'hf:WORKDIR/tokenizer.json' when the
    checkpoint ships one, then the 'KEY=VALUE' overrides (which may not change the
    architecture).
    """
    import jax

    from bigmodel import checkpoint, train

    src, workdir = pathlib.Path(src), pathlib.Path(workdir)
    config_spec = config_spec or default_experiment()
    model_cfg = model_config(read_config(src))
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ConfigError(f"{workdir} already holds checkpoints; import into a new --workdir")
    config = config_lib.load(config_spec)
    task = {"gpt": "lm", "bert": "mlm"}[model_cfg.name]
    if config.task != task:
        raise ConfigError(f"{src} is a {model_cfg.name} checkpoint, which trains on task {task!r}, but {config_spec} "
                          f"sets config.task={config.task!r}; pass --config with a {task!r} experiment")
    has_tokenizer = (src / "tokenizer.json").is_file()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model_cfg.to_dict())  # a copy: overrides must not touch model_cfg
        if has_tokenizer:
            config.data.tokenizer = f"hf:{(workdir / 'tokenizer.json').resolve()}"
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} has no value; write --config.{key}=VALUE")
        config_lib.apply_override(config, key, value)
    for key in ARCHITECTURE_KEYS:
        if key in model_cfg and config.model[key] != model_cfg[key]:
            raise ConfigError(f"config.model.{key} is fixed by the checkpoint ({model_cfg[key]!r}); drop that override")
    if has_tokenizer:
        from bigmodel.data import tokenizers

        ids = tokenizers.HFTokenizer(src / "tokenizer.json").vocab_size
        if ids > model_cfg.vocab_size:
            raise ConfigError(f"{src}/tokenizer.json has {ids} ids but the model only {model_cfg.vocab_size}; "
                              "is it the tokenizer of this checkpoint?")
    if config.data.tokenizer == "byte" and model_cfg.vocab_size < 257:
        raise ConfigError(
            f"{src} has no tokenizer.json and the model's vocabulary ({model_cfg.vocab_size}) is smaller than the "
            "byte tokenizer's 257 ids; put the checkpoint's tokenizer.json (a Hugging Face fast tokenizer) beside it"
        )
    config_lib.validate(config, jax.device_count())

    params = convert(read_state_dict(src), config.model, config.seed)
    state = _step0_state(config, params)
    workdir.mkdir(parents=True, exist_ok=True)
    if has_tokenizer:
        shutil.copyfile(src / "tokenizer.json", workdir / "tokenizer.json")
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    ckpt.save(0, state, None, config.to_dict())  # no data iterator: training starts a fresh one
    ckpt.close()
    train.write_json(workdir / "config.json", config.to_dict())
    count = sum(math.prod(shape) for shape in _shapes(params).values())
    print(f"imported {src} ({model_cfg.name}, {count:,} params) into {workdir} as step 0; "
          f"tokenizer {config.data.tokenizer!r}", flush=True)
    return config


def cmd_import_hf(args: argparse.Namespace) -> int:
    """Import a HF checkpoint into a new workdir and say how to use it."""
    config = import_hf(getattr(args, "from"), args.workdir, args.config, args.overrides)
    print(f"fine-tune: bigmodel train --config {args.workdir}/config.json --workdir {args.workdir}", flush=True)
    if config.task == "lm":
        print(f"sample:    bigmodel generate --workdir {args.workdir}", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bigmodel import-hf`."""
    p = subparsers.add_parser(
        "import-hf", help="turn a Hugging Face GPT-2/BERT checkpoint into a workdir to fine-tune or sample from",
        description="Writes WORKDIR/config.json (the experiment's groups with the imported model) and a step-0 "
                    "checkpoint; --config.KEY=VALUE overrides apply to that config. Then: bigmodel train "
                    "--config WORKDIR/config.json --workdir WORKDIR",
    )
    p.add_argument("--from", required=True, metavar="DIR", help="HF checkpoint directory (config.json + weights)")
    p.add_argument("--workdir", required=True, help="new run directory")
    p.add_argument("--config", default=None,
                   help="experiments/NAME.py[:ARG] whose data/optim/train/… groups to use "
                        f"(default {DEFAULT_EXPERIMENT})")
    p.set_defaults(func=cmd_import_hf, takes_overrides=True)
