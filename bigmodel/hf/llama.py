"""Hugging Face Llama (LlamaForCausalLM / LlamaModel) <-> `models.gpt.GPT` with the Llama switches.

Llama 2 and 3 layouts: rotary positions with the checkpoint's theta and scaling ('linear' and
'llama3'; 'dynamic', 'yarn' and the others are refused), RMSNorm, SwiGLU, grouped-query
attention and an untied (or tied) output head, no biases. HF Llama uses nn.Linear, whose weight
is [out, in]; our attention kernels are [D, N, H] / [D, K, H] (query; key, value) and
[N, H, D] (output), our Dense kernels [in, out].

Both config.json spellings of the rotary settings import: `rope_theta` with `rope_scaling`
(transformers 4) and `rope_parameters` (transformers 5); exports write both. Dropped on import:
the `rotary_emb.inv_freq` buffers of old checkpoints (recomputed from theta). A LlamaModel
checkpoint has no head: an untied `lm_head` is then freshly initialised (and a warning says so).

Einsum letters: D model width, N query heads, K kv heads, H head dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import ml_collections
import numpy as np

from bigmodel.hf.mapping import Family, Params, StateDict, Tensors, gpt_blocks_in, gpt_blocks_out, require

# config.json rope_type -> our model.rope_scaling
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}


def rope_settings(hf: dict) -> tuple[float, dict]:
    """(theta, scaling dict with 'rope_type') from either config.json spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5
        return float(params["rope_theta"]), params
    scaling = dict(hf.get("rope_scaling") or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    return float(hf.get("rope_theta", 10000.0)), scaling


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Our GPT `config.model` (Llama switches) for a HF LlamaConfig."""
    require(hf, "hidden_act", lambda a: a == "silu", "Llama's MLP here is SwiGLU (silu gate)")
    require(hf, "attention_bias", lambda b: b is False, "bigmodel's Llama layout has no attention biases")
    require(hf, "mlp_bias", lambda b: b is False, "bigmodel's Llama layout has no MLP biases")
    d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if d % n:
        raise ValueError(f"config.json has hidden_size={d} not divisible by num_attention_heads={n}")
    require(hf, "head_dim", lambda h: h == d // n, f"the head size here is hidden_size/num_attention_heads={d // n}")
    theta, scaling = rope_settings(hf)
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.json has rope scaling type {kind!r}; bigmodel reproduces {sorted(ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json rotates part of each head (partial_rotary_factor); bigmodel rotates all of it")
    from bigmodel.models import gpt

    cfg = gpt.model_config("llama_nano")
    cfg.size = "hf"
    cfg.vocab_size = int(hf["vocab_size"])
    cfg.max_len = int(hf["max_position_embeddings"])
    cfg.num_layers = int(hf["num_hidden_layers"])
    cfg.scan_layers = cfg.num_layers >= gpt.SCAN_FROM_LAYERS
    cfg.d_model, cfg.num_heads = d, n
    kv = int(hf.get("num_key_value_heads") or n)
    cfg.num_kv_heads = 0 if kv == n else kv
    cfg.d_ff = int(hf["intermediate_size"])
    cfg.dropout = float(hf.get("attention_dropout", 0.0) or 0.0)
    cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    cfg.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    cfg.rope_base = theta
    cfg.rope_scaling = ROPE_TYPES[kind]
    if kind != "default":
        cfg.rope_factor = float(scaling["factor"])
    if kind == "llama3":
        cfg.rope_low_freq_factor = float(scaling["low_freq_factor"])
        cfg.rope_high_freq_factor = float(scaling["high_freq_factor"])
        cfg.rope_original_max_len = int(scaling.get("original_max_position_embeddings") or cfg.max_len)
    return cfg


def config_to_hf(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The LlamaConfig (config.json contents) of our Llama-layout GPT `config.model`."""
    hidden = cfg.d_ff or 16 * math.ceil(8 * cfg.d_model / 3 / 16)  # GPTConfig.hidden for a gated MLP
    rope: dict[str, Any] = {"rope_type": {v: k for k, v in ROPE_TYPES.items()}[cfg.rope_scaling]}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len, hidden_size=cfg.d_model, intermediate_size=hidden,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads,
        hidden_act="silu", rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        # transformers 5 reads rope_parameters; 4 reads rope_theta and rope_scaling.
        rope_parameters={"rope_theta": cfg.rope_base, **rope}, rope_theta=cfg.rope_base,
        rope_scaling=rope if cfg.rope_scaling != "none" else None,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype="float32",
    )


def params_from_hf(state: StateDict, cfg: ml_collections.ConfigDict, seed: int = 0) -> Params:
    """GPT params from a LlamaForCausalLM/LlamaModel state dict; a missing untied head is initialised from seed."""
    t = Tensors(state)
    pre = "model." if "model.embed_tokens.weight" in state else ""
    d, n = cfg.d_model, cfg.num_heads
    h, k = d // n, cfg.num_kv_heads or n
    params: Params = {"wte": {"embedding": t(pre + "embed_tokens.weight")},
                      "ln_f": {"RMSNorm_0": {"scale": t(pre + "norm.weight")}}}
    for i in range(cfg.num_layers):
        p = f"{pre}layers.{i}."
        # [heads·H, D] -> [D, heads, H]
        attn = {f"{name}_kernel": t(f"{p}self_attn.{proj}.weight").T.reshape(d, heads, h)
                for name, proj, heads in (("query", "q_proj", n), ("key", "k_proj", k), ("value", "v_proj", k))}
        attn["out_kernel"] = t(p + "self_attn.o_proj.weight").T.reshape(n, h, d)
        params[f"block_{i}"] = {
            "ln_1": {"RMSNorm_0": {"scale": t(p + "input_layernorm.weight")}},
            "attn": attn,
            "ln_2": {"RMSNorm_0": {"scale": t(p + "post_attention_layernorm.weight")}},
            "mlp": {name: {"kernel": t(f"{p}mlp.{proj}.weight").T}
                    for name, proj in (("fc_gate", "gate_proj"), ("fc_in", "up_proj"), ("fc_out", "down_proj"))},
        }
    if not cfg.tie_embeddings:
        if "lm_head.weight" in t:
            params["lm_head"] = {"kernel": t("lm_head.weight").T}  # [V, D] -> [D, V]
        else:
            warnings.warn("the checkpoint has no lm_head (a LlamaModel): the output layer is freshly initialised, "
                          "so its logits mean nothing until fine-tuned", stacklevel=3)
            rng = np.random.default_rng(seed)
            params["lm_head"] = {"kernel": rng.normal(0, d**-0.5, (d, cfg.vocab_size)).astype(np.float32)}
    t.refuse_leftovers(
        lambda key: key.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and key == "lm_head.weight"),
        "Llama", "LlamaForCausalLM and LlamaModel weights")
    return gpt_blocks_in(params, cfg)


def params_to_hf(params: Params, cfg: ml_collections.ConfigDict) -> StateDict:
    """A LlamaForCausalLM state dict from Llama-layout GPT params."""
    params = gpt_blocks_out(params, cfg)
    d = cfg.d_model
    out = {"model.embed_tokens.weight": params["wte"]["embedding"],
           "model.norm.weight": params["ln_f"]["RMSNorm_0"]["scale"]}
    for i in range(cfg.num_layers):
        blk, p = params[f"block_{i}"], f"model.layers.{i}."
        attn = blk["attn"]
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{p}self_attn.{proj}.weight"] = attn[f"{name}_kernel"].reshape(d, -1).T
        out[p + "self_attn.o_proj.weight"] = attn["out_kernel"].reshape(-1, d).T
        out[p + "input_layernorm.weight"] = blk["ln_1"]["RMSNorm_0"]["scale"]
        out[p + "post_attention_layernorm.weight"] = blk["ln_2"]["RMSNorm_0"]["scale"]
        for name, proj in (("fc_gate", "gate_proj"), ("fc_in", "up_proj"), ("fc_out", "down_proj")):
            out[f"{p}mlp.{proj}.weight"] = blk["mlp"][name]["kernel"].T
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out


FAMILY = Family(
    model_type="llama", name="gpt", task="lm", hf_name="Hugging Face Llama",
    layout={"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "use_bias": False, "mup": False,
            "num_experts": 0},
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
)
