"""The queries and keys of one full-attention layer, as the model computes them, from that layer's input.

The layer's `input_layernorm` (RMSNorm), then the model's own `FullAttention.qkv` (q_proj, Qwen3.5's gate split,
k_proj, the q/k RMSNorms and rope: the method `FullAttention.__call__` uses) applied on one layer's sliced
parameters, with the model's `rope_cos_sin`. The values and the gate it also returns are unused: under `jax.jit`
they are dead code and XLA removes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uhd_jax.config import TextConfig
from uhd_jax.model.text_layers import RMSNorm, rope_cos_sin
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
    own tree (`layer_params`); positions [B, S] int (the model's rope positions); lengths: unused (kept for
    callers; q and k do not depend on the row lengths). Returns (q [B, S, N, H], k [B, S, K, H]) after the q/k
    norms and rope."""
    del lengths
    h = RMSNorm(config.rms_norm_eps, zero_centered=config.is_hybrid, dtype=dtype, param_dtype=jnp.float32).apply(
        {"params": params["input_layernorm"]}, hidden)
    cos, sin = rope_cos_sin(positions, config.rotary_dim, config.rope_theta)
    q, k, _, _ = FullAttention(config, dtype, jnp.float32).apply({"params": params["self_attn"]}, h, cos, sin,
                                                                 method="qkv")
    return q, k
