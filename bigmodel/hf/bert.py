"""Hugging Face BERT (BertForMaskedLM / BertForPreTraining / BertModel) <-> `models.bert.BertMLM`.

HF BERT uses nn.Linear, whose weight is [out, in]; our attention kernels are [D, N, H]
(query, key, value) and [N, H, D] (output), our Dense kernels [in, out].

Dropped on import: the pooler and the next-sentence head (`cls.seq_relationship`), which
BertMLM does not have. A BertModel checkpoint has no MLM head: `mlm_transform`,
`mlm_transform_ln` and `mlm_bias` are then freshly initialised (and a warning says so), so
its logits are meaningless until fine-tuned. The MLM output matrix is always tied to the
word table. Our BERT masks keys whose token id is 0 ([PAD]); pass HF the same
`attention_mask=(ids != 0)` to compare. hidden_act 'gelu' (exact), 'gelu_new' /
'gelu_pytorch_tanh' (tanh form) and 'relu' import; others are refused.
`hidden_dropout_prob` becomes model.dropout; attention_probs_dropout_prob is not used
(exports write 0).

Einsum letters: D model width, N heads, H head dim, V vocab.
"""

from __future__ import annotations

import warnings
from typing import Any

import ml_collections
import numpy as np

from bigmodel.hf.mapping import (
    HF_ACTIVATIONS,
    Family,
    Params,
    StateDict,
    Tensors,
    hf_layer_norm,
    layer_norm,
    require,
    tree_map,
)


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Our BERT `config.model` (MLM head) for a HF BertConfig."""
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"config.json has hidden_act={act!r}; bigmodel's BERT supports {sorted(HF_ACTIVATIONS)} "
                         "('gelu' is the exact erf GELU of the original BERT)")
    require(hf, "position_embedding_type", lambda p: p == "absolute", "BERT here uses absolute positions")
    require(hf, "is_decoder", lambda s: s is False, "BERT here is an encoder")
    require(hf, "tie_word_embeddings", lambda s: s is True, "BertMLM ties its output matrix to the word table")
    if hf.get("pad_token_id", 0) != 0:
        warnings.warn(f"config.json has pad_token_id={hf['pad_token_id']}, but bigmodel's BERT masks id 0 as padding",
                      stacklevel=3)
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


def config_to_hf(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The BertConfig (config.json contents) of our BERT `config.model` with the MLM head."""
    if cfg.head != "mlm":
        raise ValueError(f"save_pretrained writes BERT with the MLM head; model.head={cfg.head!r} is not supported")
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
    return dict(
        architectures=["BertForMaskedLM"], model_type="bert", vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
        num_hidden_layers=cfg.num_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.d_ff or 4 * cfg.d_model, hidden_act=act[cfg.activation],
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=0, tie_word_embeddings=True, position_embedding_type="absolute", dtype="float32",
    )


def _linear_heads(t: Tensors, name: str, n: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """nn.Linear [D_out, D_in] -> our [D, N, H] kernel and [N, H] bias."""
    w = t(f"{name}.weight")
    return w.T.reshape(w.shape[1], n, h), t(f"{name}.bias").reshape(n, h)


def encoder_params_from_hf(state: StateDict, cfg: ml_collections.ConfigDict) -> tuple[Params, list[str]]:
    """(BertMLM params, names of MLM-head parameters the checkpoint lacks) from a HF BERT state dict."""
    t = Tensors(state)
    pre = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    d, n = cfg.d_model, cfg.num_heads
    h = d // n
    word = t(pre + "embeddings.word_embeddings.weight")
    encoder: Params = {
        "embeddings": {
            "word": {"embedding": word},
            "position": t(pre + "embeddings.position_embeddings.weight"),
            "token_type": t(pre + "embeddings.token_type_embeddings.weight"),
            "layer_norm": hf_layer_norm(t, pre + "embeddings.LayerNorm"),
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
            "attention_ln": hf_layer_norm(t, p + "attention.output.LayerNorm"),
            "mlp": {
                "fc_in": {"kernel": t(p + "intermediate.dense.weight").T, "bias": t(p + "intermediate.dense.bias")},
                "fc_out": {"kernel": t(p + "output.dense.weight").T, "bias": t(p + "output.dense.bias")},
            },
            "output_ln": hf_layer_norm(t, p + "output.LayerNorm"),
        }
    params: Params = {"bert": encoder}
    missing = []
    cls = "cls.predictions."
    if cls + "transform.dense.weight" in t:
        params["mlm_transform"] = {"kernel": t(cls + "transform.dense.weight").T,
                                   "bias": t(cls + "transform.dense.bias")}
        params["mlm_transform_ln"] = hf_layer_norm(t, cls + "transform.LayerNorm")
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


def fresh_mlm_head(cfg: ml_collections.ConfigDict, seed: int = 0) -> Params:
    """A new BertMLM head, initialised as BertMLM does: dense N(0, 0.02), LayerNorm 1/0, output bias 0."""
    d = cfg.d_model
    kernel = np.random.default_rng(seed).normal(0.0, 0.02, (d, d))  # numpy: no compile for a few arrays
    return {"mlm_transform": {"kernel": kernel, "bias": np.zeros(d)},
            "mlm_transform_ln": layer_norm(np.ones(d), np.zeros(d)), "mlm_bias": np.zeros(cfg.vocab_size)}


def params_from_hf(state: StateDict, cfg: ml_collections.ConfigDict, seed: int = 0) -> Params:
    """BertMLM params from a HF BERT state dict; a missing MLM head is initialised from `seed`, with a warning."""
    params, missing = encoder_params_from_hf(state, cfg)
    if missing:
        warnings.warn(f"the checkpoint has no MLM head (a BertModel); {', '.join(missing)} are freshly "
                      "initialised, so the MLM logits are untrained", stacklevel=3)
        params.update(fresh_mlm_head(cfg, seed))
    return params


def params_to_hf(params: Params, cfg: ml_collections.ConfigDict) -> StateDict:
    """A BertForMaskedLM state dict from BertMLM params."""
    params = tree_map(np.asarray, params)
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


FAMILY = Family(
    model_type="bert", name="bert", task="mlm", hf_name="Hugging Face BERT",
    layout={"position": "learned"},
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
)
