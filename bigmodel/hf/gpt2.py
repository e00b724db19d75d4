"""Hugging Face GPT-2 (GPT2LMHeadModel / GPT2Model / GPT2DoubleHeadsModel) <-> `models.gpt.GPT`.

HF GPT-2 uses Conv1D, whose weight is [in, out] (y = x @ W + b); its c_attn packs query,
key and value as [D, 3D], each third laid out (N, H). Our attention kernels are [D, N, H]
(query, key, value) and [N, H, D] (output); our Dense kernels are [in, out].

Dropped on import: the attention-mask buffers of old checkpoints (`attn.bias`,
`attn.masked_bias`), a stored `lm_head.weight` when the embeddings are tied (it is the token
table) and GPT2DoubleHeadsModel's `multiple_choice_head`. Settings GPT cannot reproduce
(another activation or LayerNorm epsilon, per-layer attention scaling, cross-attention) are
refused. `resid_pdrop` becomes model.dropout; attn_pdrop is not used (exports write 0).

Einsum letters: D model width, N heads, H head dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from bigmodel.hf.mapping import (
    HF_ACTIVATIONS,
    Family,
    Params,
    StateDict,
    Tensors,
    gpt_blocks_in,
    gpt_blocks_out,
    hf_layer_norm,
    require,
)


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Our GPT `config.model` for a HF GPT2Config (refuses settings GPT cannot reproduce)."""
    require(hf, "activation_function", lambda a: HF_ACTIVATIONS.get(a) == "gelu_tanh",
            "GPT's MLP uses tanh-approximated GELU ('gelu_new')")
    require(hf, "layer_norm_epsilon", lambda e: math.isclose(e, 1e-5, rel_tol=1e-6),
            "GPT's LayerNorm epsilon is 1e-5")
    require(hf, "scale_attn_weights", lambda s: s is True, "GPT scales attention scores by 1/sqrt(head_dim)")
    require(hf, "scale_attn_by_inverse_layer_idx", lambda s: s is False, "GPT has no per-layer attention scaling")
    require(hf, "add_cross_attention", lambda s: s is False, "GPT is decoder-only without cross-attention")
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


def config_to_hf(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The GPT2Config (config.json contents) of our GPT `config.model`."""
    # GPT2Config defaults its special ids to GPT-2's <|endoftext|>; outside that vocabulary none is known.
    eot = 50256 if cfg.vocab_size > 50256 else None
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.max_len,
        n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff or None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings, scale_attn_weights=True,
        bos_token_id=eot, eos_token_id=eot, dtype="float32",
    )


def params_from_hf(state: StateDict, cfg: ml_collections.ConfigDict, seed: int = 0) -> Params:
    """GPT params from a GPT2LMHeadModel/GPT2Model state dict (seed unused: nothing is initialised)."""
    t = Tensors(state)
    pre = "transformer." if "transformer.wte.weight" in state else ""
    d, n = cfg.d_model, cfg.num_heads
    h = d // n
    params: Params = {"wte": {"embedding": t(pre + "wte.weight")}, "wpe": t(pre + "wpe.weight"),
                      "ln_f": hf_layer_norm(t, pre + "ln_f")}
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
            "ln_1": hf_layer_norm(t, p + "ln_1"),
            "attn": attn,
            "ln_2": hf_layer_norm(t, p + "ln_2"),
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
    return gpt_blocks_in(params, cfg)


def params_to_hf(params: Params, cfg: ml_collections.ConfigDict) -> StateDict:
    """A GPT2LMHeadModel state dict from GPT params."""
    params = gpt_blocks_out(params, cfg)
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


FAMILY = Family(
    model_type="gpt2", name="gpt", task="lm", hf_name="Hugging Face GPT-2",
    # The structural switches GPT-2 can express, at their only value (num_kv_heads: multi-head).
    layout={"position": "learned", "norm": "layernorm", "activation": "gelu_tanh", "num_kv_heads": (0, None),
            "use_bias": True, "mup": False, "num_experts": 0},
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
)
