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
    """SwiGLU: down(silu(gate(x)) * up(x)).

    visual_width (visual FFN slicing, cut 4; None: off): visual tokens use only the first `visual_width` neurons
    (gate/up columns, down rows), text tokens all of them. Called with `text` = (text_index [B, T], text_valid
    [B, T], slot [B, S], is_text [B, S]) (`uhd_jax.model.visual_cuts.text_plan`). The work really shrinks: the first
    neurons run on every token, the remaining ones only on the text tokens gathered into [B, T, D], whose
    contribution is gathered back to [B, S, D] and added on the text rows (the sum over neurons is split in two,
    so a text row differs from the unsliced FFN only by float rounding)."""

    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    visual_width: int | None = None

    @nn.compact
    def __call__(self, x, text=None):
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate_proj = Dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)
        up_proj = Dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)
        down_proj = Dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)
        if self.visual_width is None or self.is_initializing():
            return down_proj(nn.silu(gate_proj(x)) * up_proj(x))
        if text is None:
            raise ValueError("MLP.visual_width (visual FFN slicing) needs the text-token plan `text`")
        k = self.visual_width
        p = nn.meta.unbox(self.variables["params"])
        wg, wu, wd = (p[n]["kernel"].astype(self.dtype) for n in ("gate_proj", "up_proj", "down_proj"))
        ffn = lambda h, a, b: jnp.dot(nn.silu(jnp.dot(h, wg[:, a:b])) * jnp.dot(h, wu[:, a:b]), wd[a:b])
        x = x.astype(self.dtype)
        y = ffn(x, 0, k)  # every token: the first k neurons
        text_index, text_valid, slot, is_text = text
        xt = jnp.take_along_axis(x, text_index[..., None], axis=1)  # [B, T, D] text tokens (padding slots after)
        yt = ffn(xt, k, self.intermediate_size)  # the remaining neurons, text tokens only
        back = jnp.take_along_axis(yt, slot[..., None], axis=1)  # [B, S, D]: each text row's own slot
        return y + jnp.where(is_text[..., None], back, 0).astype(y.dtype)
