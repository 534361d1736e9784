"""The LLM decoder: Qwen3.5 hybrid (Gated DeltaNet + gated full attention) or Qwen3 dense, one stack.

`TextConfig.layer_types` repeats with a period (Qwen3.5: 3 linear + 1 full; Qwen3: 1 full); one period is a
`DecoderBlock` and the stack is `nn.scan` over the blocks, so parameters carry a leading `layers` axis of
num_layers / period. Full attention goes through `uhd_jax.model.attention.dot_product_attention`.

Modes (all return `(logits, out)`, `out` a dict of named intermediates):
  - plain forward (training, scoring): no cache.
  - prefill: `cache=init_cache(...)`; fills the KV cache and the DeltaNet states; `out["cache"]` is the new cache.
  - decode: `decode=True`, one token per row, `cache` from prefill or the previous step.
Padding: `attention_mask` [B, S] bool with real tokens left-aligned (padding at the end of each row).
Packed rows: `segment_ids` [B, S] (plain forward only) puts several samples in a row; attention stays inside each
sample and the DeltaNet conv and state reset at every sample start (`uhd_jax.model.segments`), so each sample's
outputs are what it gives alone (with positions restarting at 0 per sample, which the packer writes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uhd_jax.config import TextConfig
from uhd_jax.model.attention import dot_product_attention
from uhd_jax.model.gated_deltanet import ChunkOptions, GatedDeltaNet, init_deltanet_cache
from uhd_jax.model.layers import REMAT_POLICIES, Dense, default_kernel_init
from uhd_jax.model.segments import same_segment_mask, segment_positions, segment_runs
from uhd_jax.model.text_layers import MLP, RMSNorm, apply_rope, rope_cos_sin
from uhd_jax.parallel.axes import TOKEN_ACTIVATIONS, constrain, with_axes

Dtype = Any


def mask_padded_vocab(logits, vocab_size: int):
    """logits [..., Vp] with the padded vocab columns (index >= vocab_size) set to the dtype's most negative finite
    value: they never win an argmax and softmax / logsumexp give them exactly 0 weight, while staying finite (so
    p * log p of them is 0, not NaN). A no-op when nothing is padded."""
    if logits.shape[-1] == vocab_size:
        return logits
    real = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(real, logits, jnp.finfo(logits.dtype).min)


def _zero_padded_vocab(init, vocab_size: int, axis: int):
    """`init` with the padded vocab entries (index >= vocab_size along `axis`) zero: they are never used."""
    def f(key, shape, dtype=jnp.float32):
        real = (jnp.arange(shape[axis]) < vocab_size).reshape([-1 if i == axis else 1 for i in range(len(shape))])
        return jnp.where(real, init(key, shape, dtype), 0).astype(dtype)
    return f


def layer_period(layer_types: tuple[str, ...]) -> int:
    """Smallest p dividing the layer count such that layer_types repeats every p layers."""
    n = len(layer_types)
    for p in range(1, n + 1):
        if n % p == 0 and all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return p
    return n


class FullAttention(nn.Module):
    """Causal GQA with q/k RMSNorm and (partial) rotary; Qwen3.5 adds a sigmoid output gate from q_proj."""

    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    decode: bool = False

    @nn.compact
    def __call__(self, x, ctx, cache=None):
        """x [B, S, D]; ctx: cos/sin [B, S, R/2], lengths [B] or None (prefill), index [B] (decode: tokens
        already in the cache), segments [B, S] run index or None (packed rows: keys of the query's own sample
        only). cache: {"k", "v": [B, T, K, H]} or None. Returns (y, new cache or None)."""
        cfg = self.config
        bsz, s, d = x.shape
        n, kh, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        gated = cfg.attn_output_gate
        kw = dict(use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, zero_centered=cfg.is_hybrid, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=name)

        q = Dense(n * h * (2 if gated else 1), ("embed", "heads"), name="q_proj", **kw)(x)
        if gated:  # per head: [query (h), gate (h)]
            q = q.reshape(bsz, s, n, 2 * h)
            q, gate = q[..., :h], q[..., h:].reshape(bsz, s, n * h)
        else:
            q = q.reshape(bsz, s, n, h)
        k = Dense(kh * h, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(bsz, s, kh, h)
        v = Dense(kh * h, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(bsz, s, kh, h)
        q = apply_rope(norm("q_norm")(q), ctx["cos"], ctx["sin"])
        k = apply_rope(norm("k_norm")(k), ctx["cos"], ctx["sin"])

        new_cache = None
        if self.decode:
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, axis=0))
            kc = write(cache["k"], k.astype(cache["k"].dtype), ctx["index"])
            vc = write(cache["v"], v.astype(cache["v"].dtype), ctx["index"])
            new_cache = {"k": kc, "v": vc}
            o = dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), kv_lengths=ctx["index"] + 1,
                                      implementation=self.attention_impl)
        else:
            if cache is not None:
                kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, 0, 0))
                vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, 0, 0))
                new_cache = {"k": kc, "v": vc}
            # packed rows: keys of the query's own sample only. On cudnn, jax.nn.dot_product_attention turns this bool
            # mask into an additive [B, 1, S, S] bias next to its causal + length masks (checked on an H100 with jax
            # 0.11.2: forward and gradients match the float32 reference, GQA, bf16); it costs O(S^2) memory per row
            segments = ctx.get("segments")
            o = dot_product_attention(q, k, v, kv_lengths=ctx["lengths"], causal=True,
                                      mask=None if segments is None else same_segment_mask(segments),
                                      implementation=self.attention_impl)
        o = o.reshape(bsz, s, n * h)
        if gated:
            o = o * nn.sigmoid(gate)
        return Dense(d, ("heads", "embed"), name="o_proj", **kw)(o), new_cache


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: token mixer (DeltaNet or full attention), then SwiGLU MLP."""

    config: TextConfig
    layer_type: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    chunk: ChunkOptions = ChunkOptions()
    decode: bool = False

    @nn.compact
    def __call__(self, x, ctx, cache=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, zero_centered=cfg.is_hybrid, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=name)
        h = norm("input_layernorm")(x)
        if self.layer_type == "linear_attention":
            h, cache = GatedDeltaNet(cfg, self.dtype, self.param_dtype, chunk=self.chunk,
                                     decode=self.decode, name="linear_attn")(
                h, ctx["mask"], cache, ctx.get("segments"))
        else:
            h, cache = FullAttention(cfg, self.dtype, self.param_dtype, self.attention_impl, self.decode,
                                     name="self_attn")(h, ctx, cache)
        x = x + h
        x = x + MLP(cfg.intermediate_size, self.dtype, self.param_dtype, name="mlp")(
            norm("post_attention_layernorm")(x))
        x = constrain(x, TOKEN_ACTIVATIONS)
        return x, cache


class DecoderBlock(nn.Module):
    """One period of `layer_types`; scanned. Returns (x, (new cache, hidden states [period, B, S, D]))."""

    config: TextConfig
    layer_types: tuple[str, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    chunk: ChunkOptions = ChunkOptions()
    decode: bool = False

    @nn.compact
    def __call__(self, x, cache, ctx):
        hidden, new_cache = [], {}
        for i, t in enumerate(self.layer_types):
            name = f"layer_{i}"
            x, c = DecoderLayer(self.config, t, self.dtype, self.param_dtype, self.attention_impl, self.chunk,
                                self.decode, name=name)(
                x, ctx, None if cache is None else cache[name])
            new_cache[name] = c
            hidden.append(x)
        return x, (None if cache is None else new_cache, jnp.stack(hidden))


def init_cache(config: TextConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """Zero cache for `max_len` tokens: per scanned block, per layer of the period, KV [B, T, K, H] for full
    attention and conv/recurrent states for DeltaNet (recurrent state float32); `lengths` [B] tokens held."""
    period = layer_period(config.layer_types)
    groups = config.num_hidden_layers // period
    block = {}
    for i, t in enumerate(config.layer_types[:period]):
        if t == "linear_attention":
            c = init_deltanet_cache(config, batch, dtype)
        else:
            shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
            c = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        block[f"layer_{i}"] = c
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (groups,) + a.shape), block)
    return {"layers": stacked, "lengths": jnp.zeros((batch,), jnp.int32)}


class TextModel(nn.Module):
    """Embedding -> decoder stack -> final norm -> lm_head (tied to the embedding or not)."""

    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str = "auto"
    chunk: ChunkOptions = ChunkOptions()  # how the DeltaNet chunked form runs; same function whatever it is
    scan_unroll: int | bool = 1  # blocks per iteration of the layer scan; True: straight-line code (same function)

    @nn.compact
    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
                 decode: bool = False, last_logits_only: bool = False, placed_embeds=None, placed_mask=None,
                 compute_logits: bool = True, segment_ids=None):
        """input_ids [B, S] int or inputs_embeds [B, S, D]; attention_mask [B, S] bool; positions [B, S] int32
        (default: 0.. in prefill, the cache length in decode). placed_embeds [B, S, D] replace the token
        embeddings where placed_mask [B, S] is True (visual tokens). last_logits_only: logits of each row's last
        real token only, [B, 1, V]. compute_logits=False skips lm_head and returns logits None (training with a
        chunked loss on out["norm"], the final hidden states, and `lm_head_table`). segment_ids [B, S] int or None:
        packed samples, a new one wherever the id changes (plain forward only; positions default to 0.. per sample).
        Returns (logits [B, S or 1, V] or None, out); V is config.padded_vocab_size, the padded columns masked
        (`mask_padded_vocab`)."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if decode and cache is None:
            raise ValueError("decode needs the cache from prefill")
        if segment_ids is not None and (decode or cache is not None):
            raise ValueError("segment_ids (packed rows) are for the plain forward (training, scoring); a cache holds "
                             "one sequence per row")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {tuple(REMAT_POLICIES)}")
        vocab, padded = cfg.vocab_size, cfg.padded_vocab_size  # parameters hold `padded` rows (tensor sharding)
        table = self.param("embed_tokens", with_axes(_zero_padded_vocab(nn.initializers.normal(0.02), vocab, 0),
                                                     ("vocab", "embed")), (padded, cfg.hidden_size), self.param_dtype)
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype) if inputs_embeds is None \
            else inputs_embeds.astype(self.dtype)
        if placed_embeds is not None:
            x = jnp.where(placed_mask[..., None], placed_embeds.astype(self.dtype), x)
        x = constrain(x, TOKEN_ACTIVATIONS)
        bsz, s, _ = x.shape

        if decode:
            index = cache["lengths"]
            lengths, new_lengths = None, index + 1
            if positions is None:
                positions = index[:, None]
        else:
            index = None
            lengths = None if attention_mask is None else attention_mask.sum(-1).astype(jnp.int32)
            new_lengths = jnp.full((bsz,), s, jnp.int32) if lengths is None else lengths
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (bsz, s)) if segment_ids is None \
                    else segment_positions(segment_ids)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta)
        ctx = {"cos": cos, "sin": sin, "mask": attention_mask, "lengths": lengths, "index": index}
        if segment_ids is not None:  # only then: the unpacked program is unchanged
            ctx["segments"] = segment_runs(segment_ids)

        period = layer_period(cfg.layer_types)
        block = DecoderBlock
        if self.remat_policy != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                        length=cfg.num_hidden_layers // period, unroll=self.scan_unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        h, (new_layers, hidden) = stack(cfg, cfg.layer_types[:period], self.dtype, self.param_dtype,
                                        self.attention_impl, self.chunk, decode,
                                        name="layers")(x, None if cache is None else cache["layers"], ctx)

        out = {"embeds": x}
        hidden = hidden.reshape((cfg.num_hidden_layers,) + hidden.shape[2:])
        for i in range(cfg.num_hidden_layers):
            out[f"layer_{i:02d}"] = hidden[i]
        h = RMSNorm(cfg.rms_norm_eps, zero_centered=cfg.is_hybrid, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="norm")(h)
        out["norm"] = h
        if cache is not None:
            out["cache"] = {"layers": new_layers, "lengths": new_lengths}
        if not compute_logits:
            return None, out
        if last_logits_only and not decode:
            last = (new_lengths - 1)[:, None, None]
            h = jnp.take_along_axis(h, last, axis=1)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("bsd,vd->bsv", h, table.astype(self.dtype))
        else:
            logits = Dense(padded, ("embed", "vocab"), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=_zero_padded_vocab(default_kernel_init, vocab, 1), name="lm_head")(h)
        return mask_padded_vocab(logits, vocab), out


def lm_head_table(text_params: dict, config: TextConfig):
    """The output projection as a [Vp, D] table (Vp = config.padded_vocab_size): the tied embedding, or the untied
    lm_head kernel transposed. Rows from config.vocab_size on are padding: give the loss
    `valid_vocab=config.vocab_size`."""
    if config.tie_word_embeddings:
        return text_params["embed_tokens"]
    return text_params["lm_head"]["kernel"].T
