"""Mixture of experts: a top-k routed feed-forward block (Shazeer et al. 2017; GShard; Switch).

Einsum letters: B batch (one routing group per row), T tokens, D width, E experts,
C capacity (slots per expert and group), F expert hidden width, K choices per token.

Two ways to run the experts, by `capacity_factor`:
  > 0   capacity routing. Each expert takes at most C = ceil(K·T·capacity_factor / E)
        tokens of a row; choices beyond that are dropped (the token keeps its residual
        path). Tokens reach the experts through dispatch/combine einsums; the dispatched
        [B, E, C, D] tensor is pinned first to the batch layout, then with E split over the
        'expert' mesh axis (where the expert weights live), so the compiler moves tokens
        with an all-to-all each way (expert parallelism from sharding annotations alone).
  <= 0  dropless. The K·B·T token copies are sorted by expert and multiplied by
        `jax.lax.ragged_dot` over groups of ragged size: no token is ever dropped.

The router runs in float32. Two auxiliary losses are added to the training loss: the
load-balancing loss E·Σ_e f_e·p_e (f_e: share of routed choices that went to expert e,
p_e: its mean router probability; 1 when perfectly balanced) times `balance_weight`, and
the router z-loss mean(logsumexp(logits)²) times `z_weight` (Zoph et al. 2022). They and
the router statistics are sown into the 'aux' collection; `aux_loss_and_metrics` reads them.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models import layers

AUX = "aux"  # the collection the train step makes mutable to collect losses and statistics


class MoeMlp(nn.Module):
    """Top-k routed experts, each a (gated) MLP D -> F -> D."""

    num_experts: int  # E
    experts_per_token: int  # K (1 = Switch, 2 = GShard/Mixtral)
    d_ff: int  # F of every expert
    capacity_factor: float = 1.25  # <= 0: dropless through ragged_dot
    activation: str = "gelu_tanh"  # a key of layers.ACTIVATIONS or layers.GATED
    balance_weight: float = 0.01
    z_weight: float = 1e-3
    dtype: Any = jnp.float32
    in_init_scale: float = 1.0
    out_init_scale: float = 1.0

    def _weights(self, d_model: int) -> dict[str, jax.Array]:
        e, f = self.num_experts, self.d_ff
        init_in = layers.partitioned(layers.dense_init(self.in_init_scale), ("expert", "embed", "mlp"))
        w = {"fc_in": self.param("fc_in", init_in, (e, d_model, f))}
        if self.activation in layers.GATED:
            w["fc_gate"] = self.param("fc_gate", init_in, (e, d_model, f))
        init_out = layers.partitioned(layers.dense_init(self.out_init_scale), ("expert", "mlp", "embed"))
        w["fc_out"] = self.param("fc_out", init_out, (e, f, d_model))
        return {k: v.astype(self.dtype) for k, v in w.items()}

    def _hidden(self, pre_in: jax.Array, pre_gate: jax.Array | None) -> jax.Array:
        if self.activation in layers.GATED:
            return layers.GATED[self.activation](pre_gate) * pre_in
        return layers.ACTIVATIONS[self.activation](pre_in)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        if self.activation not in layers.ACTIVATIONS and self.activation not in layers.GATED:
            raise ValueError(f"unknown expert activation {self.activation!r}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be in [1, "
                             f"num_experts={self.num_experts}]")
        b, t, d = x.shape
        e, k = self.num_experts, self.experts_per_token
        router = self.param("router", layers.partitioned(layers.dense_init(), ("embed", None)), (d, e))
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router)
        probs = jax.nn.softmax(logits, axis=-1)
        gates, choice = jax.lax.top_k(probs, k)  # [B, T, K]
        if k > 1:
            gates = gates / gates.sum(-1, keepdims=True)
        onehot = jax.nn.one_hot(choice, e, dtype=jnp.float32)  # [B, T, K, E]
        w = self._weights(d)

        if self.capacity_factor > 0:
            y, kept = self._capacity(x, gates, onehot, w)
        else:
            y, kept = self._dropless(x, gates, choice, w), jnp.ones((b, t, k), jnp.float32)

        if not self.is_initializing():
            load = onehot.sum(2).mean((0, 1)) / k  # [E], sums to 1
            balance = e * jnp.sum(load * probs.mean((0, 1)))
            z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
            self.sow(AUX, "loss", self.balance_weight * balance + self.z_weight * z)
            self.sow(AUX, "balance", balance)
            self.sow(AUX, "router_z", z)
            self.sow(AUX, "dropped", 1.0 - kept.mean())
            self.sow(AUX, "load", load)
        return y.astype(self.dtype)

    def _capacity(self, x: jax.Array, gates: jax.Array, onehot: jax.Array,
                  w: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        b, t, k, e = onehot.shape
        capacity = max(1, math.ceil(k * t * self.capacity_factor / e))
        # Slot of each choice in its expert's queue: every first choice of the row comes
        # before any second choice (GShard's priority), in token order within a rank.
        ranked = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, e)
        position = (jnp.cumsum(ranked, axis=1) - 1.0) * ranked
        position = position.reshape(b, k, t, e).transpose(0, 2, 1, 3).sum(-1)  # [B, T, K]
        kept = (position < capacity).astype(jnp.float32)
        slot = jax.nn.one_hot(position.astype(jnp.int32), capacity, dtype=jnp.float32) * kept[..., None]  # [B,T,K,C]
        dispatch = jnp.einsum("btke,btkc->btec", onehot, slot)
        combine = jnp.einsum("btke,btkc,btk->btec", onehot, slot, gates)
        # Expert parallelism: the dispatched tokens are first laid out like the batch (rows
        # split over every batch axis, 'expert' included), then re-laid out with the experts
        # split over 'expert'. Pinning both layouts makes the move between them one
        # all-to-all; with only the second, the compiler gathers the whole batch instead.
        by_row = ("act_batch", None, None, "act_embed")
        names = ("act_batch", "act_expert", None, "act_embed")
        expert_in = jnp.einsum("btec,btd->becd", dispatch.astype(self.dtype), x.astype(self.dtype))
        expert_in = layers.constrain(layers.constrain(expert_in, by_row), names)
        pre_gate = jnp.einsum("becd,edf->becf", expert_in, w["fc_gate"]) if "fc_gate" in w else None
        h = self._hidden(jnp.einsum("becd,edf->becf", expert_in, w["fc_in"]), pre_gate)
        h = layers.constrain(h, ("act_batch", "act_expert", None, "act_mlp"))
        out = layers.constrain(jnp.einsum("becf,efd->becd", h, w["fc_out"]), names)
        out = layers.constrain(out, by_row)  # and back: the second all-to-all
        y = jnp.einsum("btec,becd->btd", combine.astype(self.dtype), out)
        return layers.constrain(y, ("act_batch", "act_seq", "act_embed")), kept

    def _dropless(self, x: jax.Array, gates: jax.Array, choice: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
        b, t, d = x.shape
        k, e = choice.shape[-1], self.num_experts
        flat_x = x.reshape(b * t, d).astype(self.dtype)
        expert = choice.reshape(-1)  # [B·T·K], token-major
        order = jnp.argsort(expert, stable=True)
        rows = flat_x[order // k]  # token copies grouped by expert
        sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
        pre_gate = jax.lax.ragged_dot(rows, w["fc_gate"], sizes) if "fc_gate" in w else None
        h = self._hidden(jax.lax.ragged_dot(rows, w["fc_in"], sizes), pre_gate)
        out = jax.lax.ragged_dot(h, w["fc_out"], sizes)  # [B·T·K, D] in expert order
        unsorted = jnp.zeros_like(out).at[order].set(out).reshape(b, t, k, d)
        return jnp.einsum("btkd,btk->btd", unsorted, gates.astype(self.dtype))


def aux_loss_and_metrics(aux: Any) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """Total auxiliary loss and averaged router statistics from the sown 'aux' collection.

    Statistics are means over MoE layers, as (value, 1) pairs that add across microbatches.
    """
    found: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        stat = keys[-1]
        # With nn.scan a layer axis leads each leaf; fold it into the list of layers.
        per_layer = leaf.shape[leaf.ndim - 1:] if stat == "load" else ()
        found.setdefault(stat, []).extend(leaf.reshape((-1,) + per_layer))
    if not found:
        return jnp.zeros(()), {}
    one = jnp.ones(())
    mean = lambda name: jnp.mean(jnp.stack(found[name]), axis=0)
    mets = {f"moe_{name}": (mean(name), one) for name in ("balance", "router_z", "dropped")}
    load = mean("load")  # [E]
    mets["moe_load_max"] = (jnp.max(load) * load.shape[0], one)  # 1 = perfectly balanced
    for i in range(load.shape[0]):
        mets[f"moe_load/{i}"] = (load[i], one)
    return jnp.sum(jnp.stack(found["loss"])), mets
