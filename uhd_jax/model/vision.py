"""The vision path: SigLIP2 ViT with the intra-ViT window-attention merger, then the post-ViT merger.

Input is a `VisionBatch` ([V, T, C*P*P] block-ordered patches, padded). Layers 0..insert_layer_id run
on all T tokens; in 16x mode the window merger then folds each 2x2 window into one token and the
remaining layers run on T/4 tokens. In 4x mode all layers run on T tokens and the window merger is
skipped. Same weights for both modes.

Each view attends only to itself (the view is the batch axis); padding keys are masked through
per-view lengths, and padded token rows never reach the output (they are zeroed and flagged invalid).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from uhd_jax.config import ModelConfig, VisionConfig
from uhd_jax.data.layout import VisionBatch
from uhd_jax.model.attention import dot_product_attention
from uhd_jax.model.layers import REMAT_POLICIES, Dense, Dtype, LayerNorm, unstacked_params
from uhd_jax.model.merger import Merger, fold_2x2
from uhd_jax.parallel.axes import VIEW_ACTIVATIONS, constrain, with_axes

class VisionAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections. x: [V, T, D].

    window=4 attends within consecutive groups of 4 tokens (the 2x2 windows of block order) with a
    plain einsum; otherwise attention spans the view, keys past `lengths` masked.
    """

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, lengths=None, window: int | None = None):
        cfg = self.config
        v, t, d = x.shape
        n, hd = cfg.num_attention_heads, cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Dense(d, ("embed", "heads"), name="q_proj", **kw)(x)
        k = Dense(d, ("embed", "heads"), name="k_proj", **kw)(x)
        val = Dense(d, ("embed", "heads"), name="v_proj", **kw)(x)
        if window:
            shape = (v * t // window, window, n, hd)
            o = dot_product_attention(q.reshape(shape), k.reshape(shape), val.reshape(shape), implementation="xla")
        else:
            shape = (v, t, n, hd)
            o = dot_product_attention(q.reshape(shape), k.reshape(shape), val.reshape(shape), kv_lengths=lengths,
                                      implementation=self.attn_impl)
        return Dense(d, ("heads", "embed"), name="out_proj", **kw)(o.reshape(v, t, d))


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.config.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        x = jax.nn.gelu(x, approximate=True)
        return Dense(self.config.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer; `(x, lengths) -> (x, x or None)` so it can be scanned."""

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "auto"
    collect: bool = False

    @nn.compact
    def __call__(self, x, lengths):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + VisionAttention(cfg, attn_impl=self.attn_impl, name="self_attn", **kw)(h, lengths)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        x = x + VisionMLP(cfg, name="mlp", **kw)(h)
        x = constrain(x, VIEW_ACTIVATIONS)
        return x, (x if self.collect else None)


class LayerStack(nn.Module):
    """`num_layers` EncoderLayers under nn.scan (parameters stacked on a leading `layers` axis), or, when the
    parameters are split per layer (`layers.unstack`, the serving layout), a Python loop over the layers."""

    config: VisionConfig
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "auto"
    remat: str = "none"
    collect: bool = False
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, x, lengths):
        layer = EncoderLayer
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
        per_layer = unstacked_params(self)
        if per_layer is not None:
            if len(per_layer) != self.num_layers:
                raise ValueError(f"{len(per_layer)} per-layer parameter trees for a stack of {self.num_layers}")
            ys = []
            for p in per_layer:
                x, y = EncoderLayer(self.config, self.dtype, self.param_dtype, self.attn_impl, self.collect,
                                    parent=None).apply({"params": p}, x, lengths)
                ys.append(y)
            return x, (jnp.stack(ys) if self.collect else None)
        if self.remat != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=self.num_layers, unroll=self.unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(self.config, dtype=self.dtype, param_dtype=self.param_dtype, attn_impl=self.attn_impl,
                     collect=self.collect, name="layers")(x, lengths)


class WindowMerger(nn.Module):
    """Intra-ViT merger: 2x2-window attention, fold 4 tokens -> 1, MLP, plus the window mean.

    [V, T, D] -> [V, T/4, D]. GELU is the tanh approximation here.
    """

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        v, t, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + VisionAttention(cfg, name="self_attn", **kw)(h, window=4)
        mean = x.reshape(v, t // 4, 4, d).astype(jnp.float32).mean(axis=2).astype(x.dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="pre_norm", **kw)(fold_2x2(x))
        h = Dense(4 * cfg.intermediate_size, ("embed", "mlp"), name="linear_1", **kw)(h)
        h = jax.nn.gelu(h, approximate=True)
        h = Dense(d, ("mlp", "embed"), name="linear_2", **kw)(h)
        return h + mean


class VisionTower(nn.Module):
    """Patch + position embedding, encoder with the window merger, post layernorm.

    Returns `(hidden [V, T', D], out)` with T' = T/4 in 16x mode, T in 4x mode.
    """

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "auto"
    remat: str = "none"
    collect_layers: bool = False
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, patches, pos_ids, num_tokens, mode: str):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = {}
        x = Dense(cfg.hidden_size, ("patch", "embed"), name="patch_embedding", **kw)(patches)
        # std 1/sqrt(width) as the reference's SigLIP init: a std-1 table buries a from-scratch ViT's patch content
        # (std ~0.4) under position noise, and the LLM learns to ignore the visual tokens
        table = self.param("position_embedding",
                           with_axes(nn.initializers.normal(cfg.hidden_size ** -0.5), ("positions", "embed")),
                           (cfg.positions_per_side ** 2, cfg.hidden_size), self.param_dtype)
        x = x + jnp.take(table, pos_ids, axis=0).astype(self.dtype)
        out["embeddings"] = x

        stack_kw = dict(attn_impl=self.attn_impl, remat=self.remat, collect=self.collect_layers, unroll=self.unroll,
                        **kw)
        n_pre = cfg.insert_layer_id + 1
        n_post = cfg.num_hidden_layers - n_pre
        lengths = num_tokens
        x, pre_layers = LayerStack(cfg, n_pre, name="layers_pre", **stack_kw)(x, lengths)
        layers = [pre_layers]
        if mode == "16x":
            x = WindowMerger(cfg, name="vit_merger", **kw)(x)
            lengths = num_tokens // 4
            out["after_window_merger"] = x
        if n_post:
            x, post_layers = LayerStack(cfg, n_post, name="layers_post", **stack_kw)(x, lengths)
            layers.append(post_layers)
        out["last_hidden"] = x
        if self.collect_layers:
            out["layers"] = layers  # per-layer outputs; the post stack's are downsampled in 16x mode
        x = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x)
        out["post_layernorm"] = x
        return x, out


class VisionEncoder(nn.Module):
    """VisionBatch -> visual tokens for the LLM.

    Returns `(tokens [..., T_out, D_llm], valid [..., T_out] bool, out)`, T_out = T / 4^levels, `...` the
    batch's view-slot dims ([V], or [B, Vr] for a ModelBatch); all slots run as one batch of views. Invalid
    (padding) rows of `tokens` are zero. `out` holds named intermediates (per view, [n_views, ...]) for
    layer-by-layer checks.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "auto"
    remat: str = "none"
    collect_layers: bool = False
    unroll: int | bool = 1  # layers per scan iteration; True unrolls fully (exact XLA cost analysis)

    @nn.compact
    def __call__(self, batch: VisionBatch):
        cfg = self.config
        if batch.merger_times != cfg.merger.merger_times:
            raise ValueError(f"VisionBatch was laid out for merger_times={batch.merger_times}, "
                             f"the model has merger_times={cfg.merger.merger_times}")
        unit = batch.patches_per_token
        if batch.tokens_per_view % unit:
            raise ValueError(f"tokens_per_view={batch.tokens_per_view} is not a multiple of {unit} "
                             f"({batch.mode} mode)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        slots = batch.num_tokens.shape  # the view-slot dims
        t = batch.tokens_per_view
        patches = batch.patches.reshape((-1, t, batch.patches.shape[-1])).astype(self.dtype)
        num_tokens = batch.num_tokens.reshape(-1).astype(jnp.int32)
        patches = constrain(patches, VIEW_ACTIVATIONS)
        x, out = VisionTower(cfg.vision, attn_impl=self.attn_impl, remat=self.remat,
                             collect_layers=self.collect_layers, unroll=self.unroll, name="vision_tower", **kw)(
            patches, batch.pos_ids.reshape(-1, t), num_tokens, batch.mode)
        tokens = Merger(cfg.merger.merger_times, cfg.text.hidden_size, name="merger", **kw)(x)
        valid = jnp.arange(tokens.shape[1])[None, :] < (num_tokens // unit)[:, None]
        tokens = jnp.where(valid[..., None], tokens, 0)
        tokens = constrain(tokens, VIEW_ACTIVATIONS)
        tokens = tokens.reshape(slots + tokens.shape[1:])
        valid = valid.reshape(slots + valid.shape[1:])
        out["tokens"] = tokens
        return tokens, valid, out
