"""Small building blocks whose parameters carry logical axis names."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uhd_jax.parallel.axes import with_axes

Dtype = Any

# Rematerialisation policies by name, for every scanned stack (vision and text).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}

# Matches torch.nn.Linear's default init closely enough for fresh weights; real weights come from checkpoints.
default_kernel_init = nn.initializers.lecun_normal()


# Fewer rows than this (decoding a few sequences) are zero-padded up to it before a matrix product. XLA lowers a
# product with fewer rows as a reduction fusion, which on an H100 read the weights at 0.5-1 TB/s (and, fused
# into a consumer such as the DeltaNet conv window's concatenate, at 0.1 TB/s) where an 8-row GEMM reads them at
# 1.7 TB/s (experiments/decode_floor.py: 1.56 -> 0.90 ms per decode step of the LLM's weights). Rows are
# independent, so the padding changes no real row's result.
MIN_DOT_ROWS = 8


def _dot_min_rows(x, kernel, out_dtype):
    rows = math.prod(x.shape[:-1])
    if rows >= MIN_DOT_ROWS:
        return jnp.dot(x, kernel, preferred_element_type=out_dtype)
    flat = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, MIN_DOT_ROWS - rows), (0, 0)))
    y = jnp.dot(flat, kernel, preferred_element_type=out_dtype)
    return y[:rows].reshape(x.shape[:-1] + (kernel.shape[-1],))


class Dense(nn.Module):
    """`y = x @ kernel + bias` with kernel `[in, out]` named by `axes` = (in_axis, out_axis)."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init
    out_dtype: Dtype | None = None  # accumulate and emit this dtype (e.g. float32 logits from bf16); None: dtype

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", with_axes(self.kernel_init, self.axes), (x.shape[-1], self.features),
                            self.param_dtype)
        y = _dot_min_rows(x.astype(self.dtype), kernel.astype(self.dtype), self.out_dtype)
        if self.use_bias:
            bias = self.param("bias", with_axes(nn.initializers.zeros, (self.axes[1],)), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _layer_norm(x, scale, bias, eps: float, dtype):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


# The backward pass recomputes the float32 statistics from the saved input instead of keeping float32 copies
# of every normalized activation (for the full ViT that is ~12 GiB of residuals per 40 views).
_layer_norm_remat = jax.checkpoint(_layer_norm, static_argnums=(3, 4))


class LayerNorm(nn.Module):
    """LayerNorm with statistics in float32 whatever the compute dtype; output in `dtype`."""

    eps: float = 1e-6
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, (self.axis_name,)), (d,), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, (self.axis_name,)), (d,), self.param_dtype)
        return _layer_norm_remat(x, scale, bias, self.eps, jnp.dtype(self.dtype))


UNSTACKED = "layers_unstacked"  # a layer stack's per-layer parameters (`unstack`), in place of the scanned "layers"


def unstack(stacked) -> tuple:
    """A scanned stack's parameters {...: [L, ...]} -> a tuple of L per-layer trees (one copy). Inference keeps its
    weights in this form (`infer.engine.serving_params`): scanning the stacked form slices every weight out of the
    stack at every layer, which XLA on the GPU materialises as a device-to-device copy before each matrix product
    (H100, MiniCPM-V 4.6, one 1344px image: 913 copies, 3.2 ms of kernel time and their launches in a 40 ms
    prefill). The stack modules run the per-layer form as a Python loop over the layers: the same function."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))


def unstacked_params(module: nn.Module):
    """The per-layer parameter tuple of `module`'s stack (`unstack`) when its variables hold one, else None."""
    params = module.variables.get("params", {}) if module.scope is not None else {}
    return nn.meta.unbox(params[UNSTACKED]) if UNSTACKED in params else None
