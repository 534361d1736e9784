"""Post-ViT merger: `merger_times` rounds of (2x2 fold + MLP), the last one into the LLM width.

With block-ordered tokens the 2x2 fold is a reshape `[V, T, D] -> [V, T/4, 4D]`, concatenating the
window's four tokens row-major, as the reference's view/permute does. GELU here is exact (erf).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from uhd_jax.model.layers import Dense, Dtype, LayerNorm


class DownsampleMLP(nn.Module):
    """LayerNorm(4D) -> Linear(4D, 4D) -> GELU(erf) -> Linear(4D, out). Input [V, T, 4D]."""

    out_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(eps=1e-6, name="pre_norm", **kw)(x)
        x = Dense(x.shape[-1], ("embed", "mlp"), name="linear_1", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense(self.out_features, ("mlp", "embed"), name="linear_2", **kw)(x)


def fold_2x2(x):
    """[V, T, D] block-ordered -> [V, T/4, 4D] (each group of 4 consecutive tokens is one 2x2 window)."""
    v, t, d = x.shape
    return x.reshape(v, t // 4, 4 * d)


class Merger(nn.Module):
    """[V, T, D_vit] -> [V, T / 4^merger_times, D_llm]."""

    merger_times: int
    llm_width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        for i in range(self.merger_times):
            out = self.llm_width if i == self.merger_times - 1 else width
            x = DownsampleMLP(out, dtype=self.dtype, param_dtype=self.param_dtype, name=f"mlp_{i}")(fold_2x2(x))
        return x
