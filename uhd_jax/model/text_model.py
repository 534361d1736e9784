"""The LLM decoder: Qwen3.5 hybrid (Gated DeltaNet + gated full attention) or Qwen3 dense, one stack.

`TextConfig.layer_types` repeats with a period (Qwen3.5: 3 linear + 1 full; Qwen3: 1 full); one period is a
`DecoderBlock` and the stack is `nn.scan` over the blocks, so parameters carry a leading `layers` axis of
num_layers / period. Full attention goes through `uhd_jax.model.attention.dot_product_attention`.

Modes (all return `(logits, out)`, `out` a dict of named intermediates):
  - plain forward (training, scoring): no cache.
  - prefill: `cache` = {"layers", "lengths"} (`init_cache`); each row's tokens are appended after the
    `lengths[b]` tokens the row already holds: KV written from slot lengths[b] on, queries attend to the cached
    keys too, the DeltaNet starts from the cached conv window and recurrent state, positions continue from
    lengths[b]. `cache_empty=True` (static) promises every row holds 0 tokens: then attention stays inside the
    chunk (cheaper) and the cache buffers are only written. `out["cache"]` is the new cache. A write past the
    capacity T is dropped (never clamped onto the last slot) and the row's new length exceeds T, which marks it
    overflowed; callers refuse such requests beforehand (`uhd_jax.infer`).
  - decode: `decode=True`, one token per row, `cache` from prefill or the previous step; rows where `active`
    is False keep their cache unchanged.
  With visual cuts (`cuts`): prefill into an empty cache only; the cache dict then also carries "visual" [B, T]
  (head cut) and "text_lengths" [B] (layer drop: layers >= drop_layer hold the text tokens only, compacted), see
  `uhd_jax.infer.cache.DecodeCache`; decode continues it with the logits of the no-cache cut forward.
Padding layouts accepted (`attention_mask` [B, S] bool): each row's real tokens contiguous, either first (right
padding: the packer's) or last (left padding: `Processor.pad(padding_side="left")`, transformers' batched
generation), or anywhere in between with padding on both sides. The model rotates each row so that its real
tokens come first before the first layer (positions, placed visual tokens and the mask travel with them) and
rotates the outputs back, so results do not depend on the layout and the cache always holds each row's tokens
from slot 0. Rows whose real tokens are not contiguous are not supported (`check_padding` rejects them on the
host).
Packed rows: `segment_ids` [B, S] (plain forward only) puts several samples in a row; attention stays inside each
sample and the DeltaNet conv and state reset at every sample start (`uhd_jax.model.segments`), so each sample's
outputs are what it gives alone (with positions restarting at 0 per sample, which the packer writes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.config import TextConfig
from uhd_jax.model.attention import dot_product_attention
from uhd_jax.model.gated_deltanet import ChunkOptions, GatedDeltaNet, init_deltanet_cache
from uhd_jax.model.layers import REMAT_POLICIES, UNSTACKED, Dense, default_kernel_init, unstack, unstacked_params
from uhd_jax.model.segments import same_segment_mask, segment_positions, segment_runs
from uhd_jax.model.text_layers import MLP, RMSNorm, apply_rope, rope_cos_sin
from uhd_jax.model.visual_attention import (active_kv_groups, build_visual_index, head_cut_fused, kv_proj_columns,
                                            merge_tokens,
                                            normalize_heads, o_proj_rows, q_proj_columns, split_tokens,
                                            visual_attention_core)
from uhd_jax.model.visual_cuts import (Cuts, LayerCuts, VisualLayout, gather_rows, layer_cuts, scatter_back,
                                       segments, text_plan)
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
    """Causal GQA with q/k RMSNorm and (partial) rotary; Qwen3.5 adds a sigmoid output gate from q_proj.

    Submodules in `setup` (not compact) so that `qkv`, the one q/k/v projection of the layer, can be applied on its
    own (`apply(..., method="qkv")`, uhd_jax/yopo/attention_qk.py) as well as from `__call__` and the cut path."""

    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    decode: bool = False
    cut: LayerCuts | None = None  # visual cuts of this layer; (1) window / (2) heads act here (ctx["vindex"])

    def setup(self):
        cfg = self.config
        n, kh, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda: RMSNorm(cfg.rms_norm_eps, zero_centered=cfg.is_hybrid, dtype=self.dtype,  # noqa: E731
                               param_dtype=self.param_dtype)
        self.q_proj = Dense(n * h * (2 if cfg.attn_output_gate else 1), ("embed", "heads"), **kw)
        self.k_proj = Dense(kh * h, ("embed", "kv_heads"), **kw)
        self.v_proj = Dense(kh * h, ("embed", "kv_heads"), **kw)
        self.o_proj = Dense(cfg.hidden_size, ("heads", "embed"), **kw)
        self.q_norm, self.k_norm = norm(), norm()

    def qkv(self, x, cos, sin, active_heads=None, from_params: bool = False):
        """The layer's queries, keys and values of x [B, S, D] (its input after input_layernorm): q_proj (and
        Qwen3.5's per-head [query (H), gate (H)] split), k_proj, v_proj, the q/k RMSNorms and rope (cos/sin
        [B, S, R/2]). Returns (q [B, S, N', H], k [B, S, K', H], v [B, S, K', H], gate [B, S, N' x H] or None).

        active_heads (the cut path's visual rows, `LayerCuts.active_heads`): only the q (and gate) columns of these
        heads (N' of them, in order) and the k/v columns of the KV groups holding one (K'); None: all heads.
        from_params: the projections as matmuls on the layer's kernels read from its params (column-sliced for
        active_heads; what the cut path does for all its rows) instead of the Dense modules."""
        cfg = self.config
        bsz, s = x.shape[:2]
        n, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        gated = cfg.attn_output_gate
        heads, groups, qcols, kvcols = n, kh, None, None
        if active_heads is not None:
            act = normalize_heads(active_heads, n)
            if len(act) < n:
                qcols, kvcols = q_proj_columns(n, hd, act, gated), kv_proj_columns(n, kh, hd, act)
                heads, groups = len(act), len(kvcols) // hd
        if from_params or qcols is not None:
            proj = lambda name, cols: self._linear(x, name, cols)  # noqa: E731
        else:
            proj = lambda name, cols: getattr(self, name)(x)  # noqa: E731
        q = proj("q_proj", qcols)
        gate = None
        if gated:  # per head: [query (H), gate (H)]
            q = q.reshape(bsz, s, heads, 2 * hd)
            q, gate = q[..., :hd], q[..., hd:].reshape(bsz, s, heads * hd)
        else:
            q = q.reshape(bsz, s, heads, hd)
        k = proj("k_proj", kvcols).reshape(bsz, s, groups, hd)
        v = proj("v_proj", kvcols).reshape(bsz, s, groups, hd)
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin), v, gate

    def _linear(self, x, name: str, cols=None, rows=None):
        """x @ the kernel (+ bias) of projection `name` read from the params, optionally only the kernel columns
        `cols` (bias entries too) or rows `rows` (static index arrays)."""
        p = nn.meta.unbox(self.variables["params"])[name]
        w, b = p["kernel"], p.get("bias")
        if cols is not None:
            w, b = _take(w, cols, 1), None if b is None else _take(b, cols, 0)
        if rows is not None:
            w = _take(w, rows, 0)
        y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
        return y if b is None else y + b.astype(self.dtype)

    def __call__(self, x, ctx, cache=None):
        """x [B, S, D]; ctx: cos/sin [B, S, R/2], lengths [B] or None (prefill), index [B] (decode: tokens
        already in the cache), segments [B, S] run index or None (packed rows: keys of the query's own sample
        only); vindex (`visual_attention.VisualIndex`) when the visual window / head cuts are on. cache: {"k",
        "v": [B, T, K, H]} or None. Returns (y, new cache or None)."""
        cfg = self.config
        bsz, s, d = x.shape
        n, h = cfg.num_attention_heads, cfg.head_dim
        c = self.cut
        if (c is not None and (c.window is not None or c.active_heads is not None) and not self.decode
                and (cache is None or ctx["offset"] is None) and ctx.get("vindex") is not None
                and not self.is_initializing()):
            if cache is None:
                return self._visual_cut_attention(x, ctx), None
            # prefill into an empty cache: every token's K/V written from slot 0 (visual K/V of KV groups without an
            # active head are never computed: zeros there, masked at decode)
            y, k, v = self._visual_cut_attention(x, ctx, want_kv=True)
            t = cache["k"].shape[1]
            write = lambda c, new: jax.lax.dynamic_update_slice(c, new[:, :t].astype(c.dtype), (0, 0, 0, 0))
            return y, {"k": write(cache["k"], k), "v": write(cache["v"], v)}

        q, k, v, gate = self.qkv(x, ctx["cos"], ctx["sin"])

        new_cache = None
        if self.decode:  # slot ctx["write"][b]; out of range (inactive row, full cache): dropped, never clamped
            write = lambda c, new: c.at[jnp.arange(bsz), ctx["write"]].set(new[:, 0].astype(c.dtype), mode="drop")
            kc, vc = write(cache["k"], k), write(cache["v"], v)
            new_cache = {"k": kc, "v": vc}
            head_mask = None
            if c is not None and c.active_heads is not None:  # cut (2): inactive heads see no visual key
                inactive = np.ones(n, bool)
                inactive[list(normalize_heads(c.active_heads, n))] = False
                head_mask = ~(ctx["visual"][:, None, None, :] & jnp.asarray(inactive)[None, :, None, None])
            o = dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), kv_lengths=ctx["index"] + 1,
                                      mask=head_mask, implementation=self.attention_impl)
        elif cache is not None and ctx["offset"] is not None:  # continued prefill: after each row's cached tokens
            slots = ctx["offset"][:, None] + jnp.arange(s)  # [B, S]; slots >= T are dropped
            write = lambda c, new: c.at[jnp.arange(bsz)[:, None], slots].set(new.astype(c.dtype), mode="drop")
            kc, vc = write(cache["k"], k), write(cache["v"], v)
            new_cache = {"k": kc, "v": vc}
            visible = jnp.arange(kc.shape[1])[None, None, :] <= slots[:, :, None]  # [B, S, T]
            o = dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=visible[:, None],
                                      implementation=self.attention_impl)
        else:
            if cache is not None:  # empty cache: written from slot 0 (tokens past the capacity dropped)
                t = cache["k"].shape[1]
                write = lambda c, new: jax.lax.dynamic_update_slice(c, new[:, :t].astype(c.dtype), (0, 0, 0, 0))
                kc, vc = write(cache["k"], k), write(cache["v"], v)
                new_cache = {"k": kc, "v": vc}
            # packed rows: keys of the query's own sample only. On cudnn, jax.nn.dot_product_attention turns this bool
            # mask into an additive [B, 1, S, S] bias next to its causal + length masks (checked on an H100 with jax
            # 0.11.2: forward and gradients match the float32 reference, GQA, bf16); it costs O(S^2) memory per row
            segments = ctx.get("segments")
            o = dot_product_attention(q, k, v, kv_lengths=ctx["lengths"], causal=True,
                                      mask=None if segments is None else same_segment_mask(segments),
                                      implementation=self.attention_impl)
        o = o.reshape(bsz, s, n * h)
        if gate is not None:
            o = o * nn.sigmoid(gate)
        return self.o_proj(o), new_cache

    def _visual_cut_attention(self, x, ctx, want_kv: bool = False):
        """Cuts (1) window and (2) heads, skipping the work (prefill without a cache; semantics and layout in
        `uhd_jax.model.visual_attention`): the tokens are split into the text slots [B, Tc] and the visual slots
        [B, Vc] of ctx["vindex"]; text rows go through the whole q/k/v/o projections, visual rows only through the
        q (and gate) columns of the layer's active heads, the k/v columns of the KV groups holding an active head and
        the o_proj rows of the active heads (`qkv` with active_heads, kernels sliced from the params); attention on
        the compacted sets (`visual_attention_core`: no [S, S] scores for visual queries); merged back to [B, S, D]
        (padding positions 0; rows with too many text tokens NaN). want_kv: also return every token's K and V
        [B, S, K, H] (for a cache; visual tokens' K/V are zero in the KV groups without an active head)."""
        cfg = self.config
        s = x.shape[1]
        n, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        gated = cfg.attn_output_gate
        ix = ctx["vindex"]
        if (ix.nbr is None) != (self.cut.window is None):
            raise ValueError(f"layer cut window {self.cut.window} but the visual index was built with window "
                             f"{ix.window}")
        act = normalize_heads(self.cut.active_heads, n)
        all_heads = len(act) == n

        xt, xv = split_tokens(x, ix)
        (ct, cv), (st, sv) = split_tokens(ctx["cos"], ix), split_tokens(ctx["sin"], ix)
        qt, kt, vt, gt = self.qkv(xt, ct, st, from_params=True)
        qv, kv, vv, gv = self.qkv(xv, cv, sv, active_heads=act, from_params=True)
        if ix.nbr is None and ctx.get("segments") is None:  # heads alone: two causal sets, the fused kernel
            ot, ov = head_cut_fused(qt, kt, vt, qv, kv, vv, ix, active_heads=act, seq_len=s, lengths=ctx["lengths"],
                                    implementation=self.attention_impl)
        else:
            ot, ov = visual_attention_core(qt, kt, vt, qv, kv, vv, ix, active_heads=act)
        ot, ov = ot.reshape(ot.shape[:2] + (n * hd,)), ov.reshape(ov.shape[:2] + (len(act) * hd,))
        if gated:
            ot, ov = ot * nn.sigmoid(gt), ov * nn.sigmoid(gv)
        yt = self._linear(ot, "o_proj")
        yv = self._linear(ov, "o_proj", rows=None if all_heads else o_proj_rows(n, hd, act))
        y = merge_tokens(yt, yv, ix, s).astype(self.dtype)
        if not want_kv:
            return y
        if not all_heads:  # the visual K/V of the active KV groups into the full [K] layout, zeros elsewhere
            grp = jnp.asarray(active_kv_groups(n, kh, act), jnp.int32)
            full = lambda a: jnp.zeros(a.shape[:2] + (kh, hd), a.dtype).at[:, :, grp].set(a)
            kv, vv = full(kv), full(vv)
        return y, merge_tokens(kt, kv, ix, s), merge_tokens(vt, vv, ix, s)


def _take(a, index: np.ndarray, axis: int):
    """a's entries at static `index` along `axis`: a slice when the index is one contiguous run, else a gather."""
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return jax.lax.slice_in_dim(a, int(index[0]), int(index[0]) + len(index), axis=axis)
    return jnp.take(a, jnp.asarray(index), axis=axis)


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: token mixer (DeltaNet or full attention), then SwiGLU MLP."""

    config: TextConfig
    layer_type: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    chunk: ChunkOptions = ChunkOptions()
    decode: bool = False
    cut: LayerCuts | None = None  # the visual cuts on this layer (None: off); ctx then holds the text plan

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
                                     cut=self.cut, name="self_attn")(h, ctx, cache)
        x = x + h
        sliced = (self.cut is not None and not self.cut.dropped and self.cut.ffn_width < cfg.intermediate_size
                  and not self.decode)  # decode tokens are text: the whole FFN
        x = x + MLP(cfg.intermediate_size, self.dtype, self.param_dtype,
                    visual_width=self.cut.ffn_width if sliced else None, name="mlp")(
            norm("post_attention_layernorm")(x), *((ctx["text"],) if sliced else ()))
        x = constrain(x, TOKEN_ACTIVATIONS)
        return x, cache


class DecoderBlock(nn.Module):
    """One period of `layer_types`; scanned. Returns (x, (new cache, hidden states [period, B, S, D])).

    With the visual cuts (`cuts`, one LayerCuts per layer of the period; prefill without a cache or into an empty
    one; at decode (`decode=True`) the token is text: no compaction, whole FFN, dropped layers read
    ctx["compact"], their text-only cache length, and full-attention layers mask visual keys (ctx["visual"]) in
    inactive heads): ctx["text"] holds
    the text plan (`visual_cuts.text_plan`), ctx["compact"] the context of the text-only sequence [B, T] used by
    dropped layers, whose input x is then [B, T, D]. enter_drop: the layer of this period where the visual tokens
    leave: its input is compacted to the text tokens here. Hidden states stay [B, S, D]: on dropped layers the
    visual rows hold the state they left with (layer drop_layer - 1's output: the local one when leaving inside
    this block, else ctx["base"])."""

    config: TextConfig
    layer_types: tuple[str, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    chunk: ChunkOptions = ChunkOptions()
    decode: bool = False
    cuts: tuple[LayerCuts, ...] | None = None
    enter_drop: int | None = None

    @nn.compact
    def __call__(self, x, cache, ctx):
        hidden, new_cache = [], {}
        base = ctx.get("base")
        for i, t in enumerate(self.layer_types):
            name = f"layer_{i}"
            cut = None if self.cuts is None else self.cuts[i]
            if i == self.enter_drop and not self.decode:  # visual tokens leave: keep the text tokens only, in order
                base = x
                x = constrain(gather_rows(x, ctx["text"][0]), TOKEN_ACTIVATIONS)
            dropped = cut is not None and cut.dropped
            x, c = DecoderLayer(self.config, t, self.dtype, self.param_dtype, self.attention_impl, self.chunk,
                                self.decode, cut, name=name)(
                x, ctx["compact"] if dropped else ctx, None if cache is None else cache[name])
            new_cache[name] = c
            hidden.append(scatter_back(x, base, ctx["text"][2], ctx["text"][3]) if dropped and not self.decode else x)
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
    cuts: Cuts = Cuts()  # the visual-token cuts (uhd_jax.model.visual_cuts); all off: the program is unchanged

    @nn.compact
    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
                 decode: bool = False, last_logits_only: bool = False, placed_embeds=None, placed_mask=None,
                 compute_logits: bool = True, cache_empty: bool = False, active=None, logits_dtype=None,
                 segment_ids=None, text_slots: int | None = None, visual_layout: VisualLayout | None = None):
        """input_ids [B, S] int or inputs_embeds [B, S, D]; attention_mask [B, S] bool; positions [B, S] int32
        (default: 0.. on each row's real tokens in prefill, continuing from the cache length; the cache length in
        decode; 0.. per sample with segment_ids). placed_embeds [B, S, D] replace the token embeddings where
        placed_mask [B, S] is True (visual tokens). last_logits_only: logits of each row's last real token only,
        [B, 1, V]. compute_logits=False skips lm_head and returns logits None (training with a chunked loss on
        out["norm"], the final hidden states, and `lm_head_table`). cache_empty (static, with a cache): every row of
        the cache holds 0 tokens. active [B] bool (decode): rows that take this token; the others keep their cache.
        logits_dtype: the lm_head accumulates and emits this dtype (float32 for decoding: no rounding of bf16
        logits); default `dtype`. segment_ids [B, S] int or None: packed samples, a new one wherever the id changes
        (plain forward only). text_slots (static) and visual_layout (`visual_cuts.VisualLayout`): what the visual
        cuts need (text_slots: any cut; visual_layout: cuts (1) window and (2) heads when visual tokens are placed).
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
        cuts_on = self.cuts.any
        if cuts_on and not self.is_initializing():  # init runs the plain stack: the parameters are the same
            self._check_cuts(cache, decode, segment_ids, text_slots, visual_layout, placed_mask, cache_empty)
        vocab, padded = cfg.vocab_size, cfg.padded_vocab_size  # parameters hold `padded` rows (tensor sharding)
        table = self.param("embed_tokens", with_axes(_zero_padded_vocab(nn.initializers.normal(0.02), vocab, 0),
                                                     ("vocab", "embed")), (padded, cfg.hidden_size), self.param_dtype)
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype) if inputs_embeds is None \
            else inputs_embeds.astype(self.dtype)
        if placed_embeds is not None:
            x = jnp.where(placed_mask[..., None], placed_embeds.astype(self.dtype), x)
        bsz, s, _ = x.shape

        shift = None  # rows rotated so that their real tokens come first (left padding); rotated back at the end
        if attention_mask is not None and not decode:
            attention_mask = attention_mask.astype(bool)
            shift = first_real_token(attention_mask)
            x, attention_mask = rotate_rows(x, shift), rotate_rows(attention_mask, shift)
            if cuts_on and placed_mask is not None:
                placed_mask = rotate_rows(placed_mask, shift)
            if cuts_on and visual_layout is not None:
                visual_layout = visual_layout._replace(
                    visual_index=rotate_rows(jnp.asarray(visual_layout.visual_index), shift))
            positions = None if positions is None else rotate_rows(positions, shift)
            segment_ids = None if segment_ids is None else rotate_rows(segment_ids, shift)
        x = constrain(x, TOKEN_ACTIVATIONS)

        layers = None if cache is None else cache["layers"]
        offset = index = write = lengths = None
        if decode:
            index = cache["lengths"]
            write = index if active is None else jnp.where(active, index, jnp.iinfo(jnp.int32).max)
            new_lengths = index + 1 if active is None else index + active.astype(index.dtype)
            if positions is None:
                positions = index[:, None]
            if active is not None:  # an inactive row keeps its DeltaNet conv window and state (GatedDeltaNet's mask)
                attention_mask = active[:, None] if attention_mask is None else attention_mask & active[:, None]
        else:
            lengths = None if attention_mask is None else attention_mask.sum(-1).astype(jnp.int32)
            chunk = jnp.full((bsz,), s, jnp.int32) if lengths is None else lengths
            if cache is not None and not cache_empty:
                offset = cache["lengths"].astype(jnp.int32)
            elif cache is not None:  # nothing cached: the DeltaNet starts from zeros
                layers = {name: jax.tree.map(jnp.zeros_like, c) if "state" in c else c for name, c in layers.items()}
            new_lengths = chunk if offset is None else offset + chunk
            if positions is None:
                if segment_ids is not None:
                    positions = segment_positions(segment_ids)
                else:
                    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (bsz, s))
                    if offset is not None:
                        positions = positions + offset[:, None]
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta)
        ctx = {"cos": cos, "sin": sin, "mask": attention_mask, "lengths": lengths, "index": index, "write": write,
               "offset": offset}
        if segment_ids is not None:  # only then: the unpacked program is unchanged
            ctx["segments"] = segment_runs(segment_ids)
        cut_cache = {}  # a cut model's extra cache entries ("visual", "text_lengths"), see DecodeCache
        if cuts_on and decode and not self.is_initializing():
            if cache.get("visual") is not None:  # cut (2): which slots hold visual keys
                ctx["visual"] = cache["visual"].astype(bool)
                cut_cache["visual"] = cache["visual"]
            if cache.get("text_lengths") is not None:  # cut (3): layers >= drop_layer hold the text tokens only
                tl = cache["text_lengths"]
                cut_overflow = tl < 0  # the prompt had more text tokens than text_slots: its cache is incomplete
                take = ~cut_overflow if active is None else active & ~cut_overflow
                ctx["compact"] = dict(ctx, index=jnp.maximum(tl, 0),
                                      write=jnp.where(take, tl, jnp.iinfo(jnp.int32).max))
                cut_cache["text_lengths"] = tl + take.astype(tl.dtype)

        period = layer_period(cfg.layer_types)
        overflow = None
        per_block = None if self.is_initializing() else unstacked_params(self)
        if per_block is not None and cuts_on and not decode:
            raise ValueError("a model with visual cuts prefills over the stacked layer parameters (its cut stack "
                             "scans segments of them); per-block parameters (layers_unstacked) serve decoding only: "
                             "infer.engine.serving_params leaves a cut model's text layers stacked")
        if per_block is not None:
            h, new_layers, hidden = self._run_unstacked(x, layers, ctx, period, per_block, decode)
        elif cuts_on and decode and not self.is_initializing():
            h, new_layers, hidden = self._run_cut_decode(x, layers, ctx, period)
        elif cuts_on and not self.is_initializing():
            h, hidden, overflow, new_layers = self._run_cut_stack(x, ctx, attention_mask, placed_mask, text_slots,
                                                                  period, visual_layout, layers)
            if cache is not None:  # prefill into an empty cache (_check_cuts): the cut entries of the new cache
                mask = jnp.ones((bsz, s), bool) if attention_mask is None else attention_mask
                vis = jnp.zeros_like(mask) if placed_mask is None else mask & placed_mask.astype(bool)
                if self.cuts.heads is not None:
                    t = _cache_capacity(layers)
                    cut_cache["visual"] = vis[:, :t] if s >= t else jnp.pad(vis, ((0, 0), (0, t - s)))
                if self.cuts.drop_layer is not None:  # -1: more text tokens than text_slots (overflow; NaN logits)
                    cut_cache["text_lengths"] = jnp.where(overflow, -1, (mask & ~vis).sum(-1).astype(jnp.int32))
        else:
            block = DecoderBlock
            if self.remat_policy != "none":
                block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast), length=cfg.num_hidden_layers // period, unroll=self.scan_unroll,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            h, (new_layers, hidden) = stack(cfg, cfg.layer_types[:period], self.dtype, self.param_dtype,
                                            self.attention_impl, self.chunk, decode,
                                            name="layers")(x, layers, ctx)

        back = (lambda a: a) if shift is None else (lambda a: rotate_rows(a, (s - shift) % s))
        out = {"embeds": back(x)}
        hidden = hidden.reshape((cfg.num_hidden_layers,) + hidden.shape[2:])
        for i in range(cfg.num_hidden_layers):
            out[f"layer_{i:02d}"] = back(hidden[i])
        if decode and "text_lengths" in cut_cache:
            overflow = cut_overflow  # decoding a row whose prompt overflowed its text slots: NaN, never garbage
        if overflow is not None:  # more text tokens than text_slots: never a silently truncated answer
            h = jnp.where(overflow[:, None, None], jnp.nan, h).astype(h.dtype)
        h = RMSNorm(cfg.rms_norm_eps, zero_centered=cfg.is_hybrid, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="norm")(h)
        if cache is not None:
            out["cache"] = {"layers": new_layers, "lengths": new_lengths, **cut_cache}
        if last_logits_only and not decode:
            last = jnp.maximum(chunk - 1, 0)[:, None, None]
            h_last = jnp.take_along_axis(h, last, axis=1)
        h = back(h)
        out["norm"] = h
        if not compute_logits:
            return None, out
        if last_logits_only and not decode:
            h = h_last
        out_dtype = self.dtype if logits_dtype is None else logits_dtype
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("bsd,vd->bsv", h, table.astype(self.dtype), preferred_element_type=out_dtype)
        else:
            logits = Dense(padded, ("embed", "vocab"), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=_zero_padded_vocab(default_kernel_init, vocab, 1), out_dtype=logits_dtype,
                           name="lm_head")(h)
        return mask_padded_vocab(logits.astype(out_dtype), vocab), out


    def _run_unstacked(self, x, layers, ctx, period, params, decode):
        """The layer stack over parameters split per block (`layers.unstack`, the serving layout): a Python loop
        over the blocks, each applying `DecoderBlock` to its own parameter arrays; prefill, decode or the plain
        forward. Scanning the stacked parameters instead slices each weight out of the stack at every block, which
        XLA materialises as a copy before every matrix product (H100, full-size model, decoding: 181 copies, 2.3 ms
        of a 5.8 ms step at batch 32). Same function as the scan.
        Cache layers: None (no cache), per block (`unstack_cache`, what the engines' decode loops carry: slicing a
        block's DeltaNet states out of a stacked cache and writing them back (`.at[g].set`) cost 60 copies per
        step, 1.0 ms of a 3.8 ms step at batch 32 on an H100) or stacked [blocks, ...]; the new cache comes back
        in the same form. Returns (h, new cache layers, hidden [blocks, period, B, S, D])."""
        cfg = self.config
        if len(params) * period != cfg.num_hidden_layers:
            raise ValueError(f"{len(params)} per-block parameter trees of {period} layers for a model of "
                             f"{cfg.num_hidden_layers} layers")
        per_block = isinstance(layers, tuple)  # `unstack_cache`: each block's own arrays, nothing sliced or copied
        hidden, blocks = [], []
        for g, p in enumerate(params):
            # decode with cuts: this block's (head mask on visual keys, dropped layers' text-only cache)
            cuts = tuple(layer_cuts(cfg, self.cuts, g * period + j) for j in range(period)) if self.cuts.any else None
            block = DecoderBlock(cfg, cfg.layer_types[:period], self.dtype, self.param_dtype, self.attention_impl,
                                 self.chunk, decode, cuts=cuts, parent=None)
            c = None if layers is None else layers[g] if per_block else jax.tree.map(lambda a: a[g], layers)
            x, (new, hid) = block.apply({"params": p}, x, c, ctx)
            if per_block:
                blocks.append(jax.tree.map(lambda a, n: n.astype(a.dtype), c, new))
            elif layers is not None:
                layers = jax.tree.map(lambda a, n: a.at[g].set(n.astype(a.dtype)), layers, new)
            hidden.append(hid)
        return x, tuple(blocks) if per_block else layers, jnp.stack(hidden)

    def _check_cuts(self, cache, decode, segment_ids, text_slots, visual_layout, placed_mask, cache_empty=False):
        cfg, cuts = self.config, self.cuts
        cuts.validate_for_model(cfg)
        on = [n for n, v in (("window", cuts.window), ("heads", cuts.heads), ("drop_layer", cuts.drop_layer),
                             ("ffn_ratio", cuts.ffn_ratio)) if v is not None]
        if decode:  # decode tokens are text; the cache must come from a prefill with these cuts
            for field, need in (("visual", cuts.heads is not None), ("text_lengths", cuts.drop_layer is not None)):
                if need and cache.get(field) is None:
                    raise ValueError(f"decode with visual cuts ({', '.join(on)}) needs a cache prefilled with them: "
                                     f"its '{field}' entry is missing (DecodeCache.{field}; init_cache(..., "
                                     "cuts=model.cuts) and MiniCPMV.prefill with the cut model fill it)")
            return
        if cache is not None and not cache_empty:
            raise NotImplementedError(
                f"continued prefill (a prefill into a cache that already holds tokens) with visual cuts "
                f"({', '.join(on)} set) is not implemented: the new chunk's visual tokens would need the cached "
                "text tokens of the dropped layers (compacted) and a per-head visual mask over cached and new keys; "
                "prefill with cuts into an empty cache only (init_cache / DecodeCache.reset), or use Cuts()")
        if segment_ids is not None and cuts.drop_layer is not None:
            raise NotImplementedError("visual layer drop (drop_layer) with packed rows (segment_ids) is not "
                                      "implemented yet")
        attn = [n for n in ("window", "heads") if n in on]
        if segment_ids is not None and attn:
            raise NotImplementedError(f"visual cut(s) {attn} with packed rows (segment_ids) are not implemented yet")
        if attn and placed_mask is not None and visual_layout is None:
            raise ValueError(f"the visual cut(s) {attn} need visual_layout (visual_cuts.VisualLayout: "
                             "batch.visual_index, batch.vision.grid, levels, out_tokens_per_view) to know each "
                             "visual token's view, row and column")
        if text_slots is None:
            raise ValueError(f"the visual cuts ({', '.join(on)}) need batch.text_slots (the compact length of each "
                             "row's text tokens), set by the Packer: PackerConfig(text_slot_multiple=128)")

    def _run_cut_decode(self, x, layers, ctx, period):
        """One decode step of a cut model over the stacked parameters: a Python loop over `visual_cuts.segments`,
        `jax.lax.scan` over the parameter and cache slices of each (as `_run_cut_stack`; nn.scan cannot run
        different static settings on slices of one stack). The decode token is text: full FFN, no compaction;
        the head cut masks visual keys in inactive heads (ctx["visual"]), dropped layers use ctx["compact"] (their
        text-only cache length). Returns (h, new cache layers, hidden [blocks, period, B, 1, D])."""
        cfg = self.config
        params = nn.meta.unbox(self.variables["params"]["layers"])
        new_layers, hidden = [], []
        for seg in segments(cfg, self.cuts, period):
            block = DecoderBlock(cfg, cfg.layer_types[:period], self.dtype, self.param_dtype, self.attention_impl,
                                 self.chunk, True, cuts=seg.layers, parent=None)
            part = lambda a, seg=seg: a[seg.start:seg.stop]
            step = lambda h, pc, block=block: block.apply({"params": pc[0]}, h, pc[1], ctx)
            x, (c, hid) = jax.lax.scan(step, x, (jax.tree.map(part, params), jax.tree.map(part, layers)))
            new_layers.append(c)
            hidden.append(hid)
        new_layers = jax.tree.map(lambda old, *new: jnp.concatenate(new).astype(old.dtype), layers, *new_layers)
        return x, new_layers, jnp.concatenate(hidden)

    def _run_cut_stack(self, x, ctx, attention_mask, visual_mask, text_slots, period, visual_layout=None,
                       layers=None):
        """The decoder stack with visual cuts: a Python loop over `visual_cuts.segments` (runs of layer periods with
        identical settings), `jax.lax.scan` over the stacked parameters inside each. Written by hand rather than
        with nn.scan because nn.scan scans one module over the whole `layers` axis with one static configuration,
        while here consecutive slices of the same stacked tree (params["layers"], unchanged, so checkpoints load)
        run different programs, and the carried sequence changes length where the visual tokens leave. Params
        are created by the ordinary nn.scan path at init. With cuts (1) window / (2) heads the visual index
        (`visual_attention.build_visual_index`, int work) is built here once and read by every full-attention layer
        from ctx["vindex"] (without placed visual tokens it is not built: the cuts have nothing to act on).
        layers: an EMPTY cache's layers (prefill; DeltaNet states zero) or None: layers before drop_layer write
        every token's K/V from slot 0 and the DeltaNet state over all tokens, dropped layers the text tokens' K/V
        compacted to slots 0 .. n_text-1 and the state of the text-only recurrence.
        Returns (h, hidden [layers, B, S, D], overflow [B], new cache layers or None)."""
        cfg = self.config
        bsz, s, _ = x.shape
        mask = jnp.ones((bsz, s), bool) if attention_mask is None else attention_mask
        vis = jnp.zeros((bsz, s), bool) if visual_mask is None else visual_mask.astype(bool)
        text_index, text_valid, slot, is_text, count = text_plan(mask, vis, text_slots)
        ctx = dict(ctx, text=(text_index, text_valid, slot, is_text))
        if (self.cuts.window is not None or self.cuts.heads is not None) and visual_layout is not None \
                and visual_mask is not None:
            lay = visual_layout
            ctx["vindex"] = build_visual_index(vis, lay.visual_index, lay.grid, mask.sum(-1).astype(jnp.int32),
                                               levels=lay.levels, out_tokens_per_view=lay.out_tokens_per_view,
                                               window=self.cuts.window, text_slots=text_slots)
        if self.cuts.drop_layer is not None:
            g = lambda a: gather_rows(a, text_index)
            ctx["compact"] = {"cos": g(ctx["cos"]), "sin": g(ctx["sin"]), "mask": text_valid,
                              "lengths": jnp.minimum(count, text_slots), "index": None, "write": None,
                              "offset": None, "text": ctx["text"]}
        params = nn.meta.unbox(self.variables["params"]["layers"])
        types = cfg.layer_types[:period]
        policy = REMAT_POLICIES[self.remat_policy]
        hidden, base, new_layers = [], None, []
        for seg in segments(cfg, self.cuts, period):
            block = DecoderBlock(cfg, types, self.dtype, self.param_dtype, self.attention_impl, self.chunk,
                                 cuts=seg.layers, enter_drop=seg.enter_drop, parent=None)
            body = lambda p, h, lc, c, block=block: block.apply({"params": p}, h, lc, c)
            if policy is not None:  # as nn.remat on the block in the nn.scan path
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            part = lambda a, seg=seg: a[seg.start:seg.stop]
            seg_cache = None if layers is None else jax.tree.map(part, layers)
            if seg.enter_drop is not None:  # one period: the carried sequence shrinks here
                x_in = x
                x, (lc, hid) = body(jax.tree.map(lambda a: a[seg.start], params), x,
                                    None if seg_cache is None else jax.tree.map(lambda a: a[0], seg_cache), ctx)
                base = x_in if seg.enter_drop == 0 else hid[seg.enter_drop - 1]
                ctx = dict(ctx, base=base)
                hidden.append(hid)
                lc = None if lc is None else jax.tree.map(lambda a: a[None], lc)
            else:
                step = lambda h, pc, body=body, c=ctx: body(pc[0], h, pc[1], c)
                x, (lc, hid) = jax.lax.scan(step, x, (jax.tree.map(part, params), seg_cache),
                                            unroll=self.scan_unroll)
                hidden.append(hid.reshape((-1,) + hid.shape[2:]))
            new_layers.append(lc)
        if base is not None:  # text rows' final states back in place; visual rows keep what they left with
            x = scatter_back(x, base, slot, is_text)
        hidden = jnp.concatenate(hidden)[:, None]  # [layers, 1, B, S, D] as the nn.scan path's [groups, period, ...]
        if layers is not None:
            new_layers = jax.tree.map(lambda old, *new: jnp.concatenate(new).astype(old.dtype), layers, *new_layers)
        else:
            new_layers = None
        return x, hidden, count > text_slots, new_layers


def _cache_capacity(layers) -> int:
    """T, the token slots of a cache's full-attention KV buffers [G, B, T, K, H] (or per block [B, T, K, H])."""
    per_block = isinstance(layers, tuple)
    for c in (layers[0] if per_block else layers).values():
        if "k" in c:
            return c["k"].shape[1 if per_block else 2]
    raise ValueError("the cache has no full-attention layer (no KV buffer to size the visual mask by)")


def unstack_cache(layers) -> tuple:
    """Cache layers {"layer_i": {...: [G, B, ...]}} -> a tuple of G per-block dicts ({...: [B, ...]}), the form a
    decode loop carries (see `TextModel._run_unstacked`); `stack_cache` is the inverse. One copy each way."""
    if isinstance(layers, tuple):
        return layers
    blocks = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a, g=g: a[g], layers) for g in range(blocks))


def stack_cache(layers) -> dict:
    """Inverse of `unstack_cache` (a stacked dict is returned as it is)."""
    if not isinstance(layers, tuple):
        return layers
    return jax.tree.map(lambda *a: jnp.stack(a), *layers)


def unstack_layers(text_params) -> dict:
    """The text model's parameters with the stacked `layers` [blocks, ...] split into a tuple of per-block trees
    under `UNSTACKED` (`layers.unstack`), the serving layout `TextModel` runs as a loop over the blocks (prefill,
    decode, forward; not the cut prefill, not training). Parameters already in that layout are returned as they
    are."""
    if UNSTACKED in text_params:
        return text_params
    text_params = dict(text_params)
    text_params[UNSTACKED] = unstack(text_params.pop("layers"))
    return text_params


def first_real_token(attention_mask):
    """[B, S] bool -> [B] int32: index of each row's first real token (0 for a row without any)."""
    return jnp.argmax(attention_mask, axis=-1).astype(jnp.int32)


def rotate_rows(a, shift):
    """a [B, S, ...]: row b rotated left by shift[b] (out[b, i] = a[b, (i + shift[b]) % S]); a per-row gather."""
    s = a.shape[1]
    idx = (jnp.arange(s, dtype=jnp.int32)[None] + shift[:, None]) % s
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def check_padding(attention_mask) -> None:
    """Host-side: every row's real tokens are contiguous (right, left or both-sides padding); raises ValueError
    naming the rows otherwise (the model would silently mix their tokens up)."""
    m = np.asarray(attention_mask, bool)
    bad = []
    for b, row in enumerate(m):
        idx = np.flatnonzero(row)
        if len(idx) and idx[-1] - idx[0] + 1 != len(idx):
            bad.append(b)
    if bad:
        raise ValueError(f"rows {bad} have padding between real tokens (attention_mask); accepted layouts: each "
                         "row's real tokens contiguous (right or left padding)")


def lm_head_table(text_params: dict, config: TextConfig):
    """The output projection as a [Vp, D] table (Vp = config.padded_vocab_size): the tied embedding, or the untied
    lm_head kernel transposed. Rows from config.vocab_size on are padding: give the loss
    `valid_vocab=config.vocab_size`."""
    if config.tie_word_embeddings:
        return text_params["embed_tokens"]
    return text_params["lm_head"]["kernel"].T
