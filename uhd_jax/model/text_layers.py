"""Building blocks of the LLMs: RMSNorm (two scalings), rotary position embedding (partial), SwiGLU MLP."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.model.layers import Dense
from uhd_jax.parallel.axes import with_axes

Dtype = Any


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis, statistics in float32.

    zero_centered=True is Qwen3.5's: `(x_hat * (1 + w)).astype(x.dtype)`, w initialised to 0.
    zero_centered=False is Qwen3's: `w * x_hat.astype(x.dtype)`, w initialised to 1.
    """

    eps: float = 1e-6
    zero_centered: bool = True
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.zero_centered else nn.initializers.ones
        w = self.param("scale", with_axes(init, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        if self.zero_centered:
            return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
        return w.astype(self.dtype) * y.astype(self.dtype)


def rope_frequencies(rotary_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2], float32 as in the reference."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_cos_sin(positions, rotary_dim: int, theta: float):
    """positions [B, S] int -> (cos, sin) each [B, S, rotary_dim / 2] float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(rotary_dim, theta))
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x, cos, sin):
    """Rotates the first 2 * cos.shape[-1] dims of x [B, S, N, H] (rotate-half convention); the rest pass through.

    cos, sin: [B, S, R/2] float32. The rotation is done in x's dtype after casting cos/sin, as the reference does.
    """
    half = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return Dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)
