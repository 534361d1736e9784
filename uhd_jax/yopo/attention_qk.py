"""The queries and keys of one full-attention layer, as the model computes them, from that layer's input.

`FullAttention` computes q and k inside its `__call__` and does not return them, so this helper runs the model's
own modules on one layer's sliced parameters: the layer's `input_layernorm` (RMSNorm), then `FullAttention` with
Flax's `capture_intermediates` keeping the outputs of its `q_norm` and `k_norm` submodules (q_proj, the gate split
of Qwen3.5's gated q_proj, the reshapes and the q/k RMSNorms are the model's code), and finally the model's
`apply_rope` with the model's `rope_cos_sin`, which is what `FullAttention` applies next. The attention output that
the call also computes is unused: under `jax.jit` it is dead code and XLA removes it.

(With a `FullAttention.qk(x, ctx)` method in text_model.py returning the roped q and k, used by `__call__`, this
file would be one `apply(..., method="qk")` call.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uhd_jax.config import TextConfig
from uhd_jax.model.text_layers import RMSNorm, apply_rope, rope_cos_sin
from uhd_jax.model.text_model import FullAttention, layer_period


def full_attention_layers(config: TextConfig) -> list[int]:
    """Indices of the full-attention layers."""
    return [i for i, t in enumerate(config.layer_types) if t != "linear_attention"]


def layer_params(text_params: dict, config: TextConfig, layer: int) -> dict:
    """Layer `layer`'s parameters, sliced from the scanned stack (params["text"]["layers"]["layer_i"] with a
    leading [groups] axis, i = layer % period)."""
    period = layer_period(config.layer_types)
    stacked = text_params["layers"][f"layer_{layer % period}"]
    return jax.tree.map(lambda a: a[layer // period], stacked)


def full_attention_qk(config: TextConfig, params: dict, hidden, positions, lengths=None, dtype=jnp.float32):
    """hidden [B, S, D]: the layer's input (the residual stream before its input_layernorm); params: the layer's
    own tree (`layer_params`); positions [B, S] int (the model's rope positions); lengths [B] real tokens (only
    passed on to the unused attention). Returns (q [B, S, N, H], k [B, S, K, H]) after the q/k norms and rope."""
    h = RMSNorm(config.rms_norm_eps, zero_centered=config.is_hybrid, dtype=dtype, param_dtype=jnp.float32).apply(
        {"params": params["input_layernorm"]}, hidden)
    cos, sin = rope_cos_sin(positions, config.rotary_dim, config.rope_theta)
    ctx = {"cos": cos, "sin": sin, "lengths": lengths, "mask": None, "index": None, "write": None, "offset": None}
    _, state = FullAttention(config, dtype, jnp.float32, attention_impl="xla").apply(
        {"params": params["self_attn"]}, h, ctx, mutable=["intermediates"],
        capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in ("q_norm", "k_norm"))
    inter = state["intermediates"]
    q, k = inter["q_norm"]["__call__"][0], inter["k_norm"]["__call__"][0]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
