"""Gated DeltaNet: the linear-attention token mixer of Qwen3.5 (transformers' `Qwen3_5GatedDeltaNet`).

Per value head, a state S [Dk, Dv] (float32) is updated token by token:
    S <- exp(g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t
with q, k L2-normalised (q also scaled by Dk^-1/2), g_t = -exp(A_log) softplus(a_t + dt_bias) <= 0, and
beta_t = sigmoid(b_t). Two equal forms:
  - `chunk_gated_delta_rule`: chunks of C tokens; inside a chunk a triangular (UT) system gives all the
    updates with matmuls, batched over chunks; a short sequential pass carries the state across chunks.
    For training and prefill.
  - `gated_delta_step`: one token, for decoding.
Tokens where the mask is False (padding at the end of a row) are identity steps (g = 0, beta = 0), so the
final state after a padded prefill is the state after each row's last real token.

Packed rows (`segment_ids`, see `uhd_jax.model.segments`): at every sample start the state restarts from zero and
the causal conv sees no input of the previous sample. The chunked form does this exactly, with no huge negative
decay: a reset at token t is a decay factor alpha_t = 0, and the chunked algebra uses the decays only through the
products D_ij = prod_{j < l <= i} alpha_l (token j to token i), D_i0 (chunk start to i) and D_Cj (j to chunk end);
with resets these are exp(cum_i - cum_j) where no start lies in (j, i], and exactly 0 otherwise. So the
intra-chunk decay matrix is cut across samples, and the carried state reaches only the tokens of the sample that
was running when the chunk began.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.model.layers import Dense
from uhd_jax.model.segments import segment_runs, segment_starts
from uhd_jax.parallel.axes import with_axes

Dtype = Any


def l2_normalize(x, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _prepare(q, k, v, g, beta):
    """float32; q/k heads repeated to the value heads (each k head serves consecutive v heads); q, k normalised."""
    hk, hv = k.shape[2], v.shape[2]
    if hv != hk:
        q = jnp.repeat(q, hv // hk, axis=2)
        k = jnp.repeat(k, hv // hk, axis=2)
    f32 = lambda x: x.astype(jnp.float32)
    q, k, v, g, beta = map(f32, (q, k, v, g, beta))
    q = l2_normalize(q) * (q.shape[-1] ** -0.5)
    k = l2_normalize(k)
    return q, k, v, g, beta


def unit_lower_inverse(a):
    """(I + a)^-1 for a strictly lower-triangular a [..., n, n], by recursive 2x2 blocking (matmuls only)."""
    n = a.shape[-1]
    return _unit_lower_inverse(a.reshape((-1, n, n))).reshape(a.shape)


def _unit_lower_inverse(a):
    """a [M, n, n]. The two diagonal blocks recurse as one batch of 2M (concatenated, not stacked: the batch stays
    one dim, so no product exceeds rank 3; XLA's CPU dot emitter aborts on rank-8 operands)."""
    m, n = a.shape[0], a.shape[-1]
    if n == 1:
        return jnp.ones_like(a)
    h = n // 2
    top, bot, off = a[:, :h, :h], a[:, h:, h:], a[:, h:, :h]
    if h == n - h:  # both diagonal blocks in one batched call
        inv = _unit_lower_inverse(jnp.concatenate([top, bot], axis=0))
        ti, bi = inv[:m], inv[m:]
    else:
        ti, bi = _unit_lower_inverse(top), _unit_lower_inverse(bot)
    off = -bi @ off @ ti
    upper = jnp.concatenate([ti, jnp.zeros(ti.shape[:-1] + (n - h,), a.dtype)], axis=-1)
    lower = jnp.concatenate([off, bi], axis=-1)
    return jnp.concatenate([upper, lower], axis=-2)


STATE_PASSES = ("transition", "direct")
SOLVERS = ("blocked", "triangular_solve")


def chunk_gated_delta_rule(q, k, v, g, beta, *, chunk_size: int = 64, initial_state=None,
                           state_pass: str = "transition", solver: str = "blocked", segment_ids=None):
    """Chunked (parallel) gated delta rule.

    q, k: [B, S, Hk, Dk]; v: [B, S, Hv, Dv]; g, beta: [B, S, Hv] (g = log decay <= 0).
    initial_state: [B, Hv, Dk, Dv] or None (zeros).
    segment_ids: [B, S] int or None: packed samples; the state restarts from zero wherever the id changes
      (boundaries may fall anywhere in a chunk; see the module notes). The final state is then the last
      sample's (padding that carries its own id resets it too).
    Returns (out [B, S, Hv, Dv] in v's dtype, final_state [B, Hv, Dk, Dv] float32).

    Per chunk of C tokens (UT transform): u = T beta v, w = T beta e^cum k with T = (I + A)^-1; the state
    entering chunk i+1 is S' = e^cum_last S + k_tail^T (u - w S). Everything but the pass of S across chunks
    is batched over chunks, in layout [N, B, H, C, D] (each chunk contiguous).
      state_pass "transition": S' = M S + B with M = e^cum_last I - k_tail^T w (one matmul per chunk);
                 "direct": v_new = u - w S, then S' (two matmuls per chunk).
      solver "blocked": T by recursive 2x2 blocking (matmuls only); "triangular_solve": solve for u and w.
    Matmul operands are in v's dtype (bf16 in training, as the FLA kernels do) with float32 accumulation;
    decays, T and the recurrent state are float32. All choices compute the same function.
    """
    if state_pass not in STATE_PASSES or solver not in SOLVERS:
        raise ValueError(f"state_pass must be one of {STATE_PASSES} and solver one of {SOLVERS}")
    f32, cdt = jnp.float32, v.dtype
    hk, hv = k.shape[2], v.shape[2]
    if hv != hk:  # each k head serves hv // hk consecutive v heads
        q = jnp.repeat(q, hv // hk, axis=2)
        k = jnp.repeat(k, hv // hk, axis=2)
    b, s, h, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = (-s) % c
    n = (s + pad) // c

    def chunks(x):  # [B, S, H, ...] -> [N, B, H, C, ...]; padded steps are identities (g = 0, beta = 0)
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    q = chunks((l2_normalize(q.astype(f32)) * dk ** -0.5).astype(cdt))
    k = chunks(l2_normalize(k.astype(f32)).astype(cdt))
    v = chunks(v)
    g, beta = chunks(g.astype(f32)), chunks(beta.astype(f32))  # [N, B, H, C]
    dot = functools.partial(jnp.einsum, preferred_element_type=f32)

    cum = jnp.cumsum(g, axis=-1)
    causal = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    e_cum = jnp.exp(cum)  # D_i0: decay from the chunk start to token i
    e_tail = jnp.exp(cum[..., -1:] - cum)  # D_Cj: from token j to the chunk end
    e_last = jnp.exp(cum[..., -1])  # D_C0: across the whole chunk
    if segment_ids is not None:  # decays across a sample start are exactly 0 (alpha = 0 at the start)
        same, carry, tail = _chunk_segment_masks(segment_ids, c, pad)
        causal = causal & same  # [N, B, 1, C, C]: j <= i in the same sample
        e_cum = jnp.where(carry, e_cum, 0.0)  # the carried state reaches only the sample running at the chunk start
        e_tail = jnp.where(tail, e_tail, 0.0)  # only the chunk's last sample passes its updates on
        e_last = jnp.where(carry[..., -1], e_last, 0.0)
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # e^(cum_i - cum_j), j <= i

    # A_ij = beta_i k_i.k_j e^(cum_i - cum_j) for i > j
    a = jnp.where(strict, dot("...cd,...sd->...cs", k, k) * decay * beta[..., :, None], 0.0)
    if solver == "blocked":
        t = unit_lower_inverse(a)
        u = dot("...cs,...sd->...cd", (t * beta[..., None, :]).astype(cdt), v).astype(cdt)
        w = dot("...cs,...sd->...cd", (t * (beta * e_cum)[..., None, :]).astype(cdt), k).astype(cdt)
    else:
        rhs = jnp.concatenate([v.astype(f32) * beta[..., None], k.astype(f32) * (beta * e_cum)[..., None]], -1)
        uw = jax.lax.linalg.triangular_solve(a, rhs, left_side=True, lower=True, unit_diagonal=True)
        u, w = uw[..., :dv].astype(cdt), uw[..., dv:].astype(cdt)
    k_tail = (k * e_tail[..., None]).astype(cdt)
    chunk_decay = e_last[..., None, None]  # [N, B, H, 1, 1]
    s0 = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state.astype(f32)

    if state_pass == "transition":
        trans = chunk_decay * jnp.eye(dk, dtype=f32) - dot("...cd,...ce->...de", k_tail, w)
        xs = (trans, dot("...cd,...ce->...de", k_tail, u))

        def step(state, x):
            return x[0] @ state + x[1], state
    else:
        xs = (w, u, k_tail, chunk_decay)

        def step(state, x):
            w_i, u_i, kt_i, d_i = x
            v_new = (u_i - dot("bhcd,bhde->bhce", w_i, state.astype(cdt))).astype(cdt)
            return state * d_i + dot("bhcd,bhce->bhde", kt_i, v_new), (state, v_new)

    if n <= 64:  # straight-line code: no while-loop overhead on GPU; outputs stacked once
        state, outs = s0, []
        for i in range(n):
            state, o = step(state, tuple(x[i] for x in xs))
            outs.append(o)
        final, ys = state, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:
        final, ys = jax.lax.scan(step, s0, xs, unroll=8)
    if state_pass == "transition":
        before = ys
        v_new = (u - dot("...cd,...de->...ce", w, before.astype(cdt))).astype(cdt)
    else:
        before, v_new = ys

    attn = (dot("...cd,...sd->...cs", q, k) * decay).astype(cdt)
    out = dot("...cd,...de->...ce", (q * e_cum[..., None]).astype(cdt), before.astype(cdt)) \
        + dot("...cs,...se->...ce", attn, v_new)
    out = jnp.moveaxis(jnp.moveaxis(out, 2, 3), 0, 1).reshape(b, n * c, h, dv)[:, :s]
    return out.astype(cdt), final


def _chunk_segment_masks(segment_ids, c: int, pad: int):
    """Masks of the chunked form for packed samples, [N, B, 1, C(, C)] (broadcast over heads):
    same[i, j]: tokens i and j of a chunk belong to the same sample; carry[i]: token i belongs to the sample that
    was running just before the chunk (so the carried state reaches it); tail[j]: token j belongs to the chunk's
    last sample (so its update reaches the state passed on). The padded steps after the row continue its last
    sample (identity steps, no reset)."""
    runs = segment_runs(segment_ids)
    prev = jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1)  # the run of the token before (itself at 0)
    if pad:
        runs = jnp.pad(runs, ((0, 0), (0, pad)), mode="edge")
        prev = jnp.pad(prev, ((0, 0), (0, pad)), mode="edge")
    b, n = runs.shape[0], runs.shape[1] // c
    runs = jnp.moveaxis(runs.reshape(b, n, c), 1, 0)[:, :, None]  # [N, B, 1, C]
    prev = jnp.moveaxis(prev.reshape(b, n, c), 1, 0)[:, :, None]
    same = runs[..., :, None] == runs[..., None, :]
    carry = runs == prev[..., :1]
    tail = runs == runs[..., -1:]
    return same, carry, tail


def conv_segment_masks(segment_ids, ksize: int) -> list:
    """For the causal conv over [previous ksize-1 inputs, this input]: masks[j] [B, S] bool, True where the input
    that tap j reads (ksize-1-j tokens back) belongs to the same sample as the output token."""
    runs = segment_runs(segment_ids)
    out = []
    for j in range(ksize):
        d = ksize - 1 - j
        if d == 0:
            out.append(jnp.ones(runs.shape, bool))
        else:
            back = jnp.pad(runs, ((0, 0), (d, 0)), constant_values=-1)[:, :runs.shape[1]]
            out.append(back == runs)
    return out


def gated_delta_step(state, q, k, v, g, beta):
    """One token, already prepared (`_prepare`): state [B, H, Dk, Dv] f32; q, k [B, H, Dk]; v [B, H, Dv];
    g, beta [B, H]. Returns (new_state, out [B, H, Dv])."""
    state = state * jnp.exp(g)[..., None, None]
    kv_mem = jnp.einsum("bhkv,bhk->bhv", state, k)
    delta = (v - kv_mem) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent_gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None):
    """Token-by-token form; same arguments and results as `chunk_gated_delta_rule` (with `segment_ids` the state
    is set to zero before the first token of every sample)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, s, h, dk = k.shape
    s0 = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None \
        else initial_state.astype(jnp.float32)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))

    if segment_ids is None:
        def step(state, xs):
            return gated_delta_step(state, *xs)
    else:
        xs = xs + (jnp.moveaxis(segment_starts(segment_ids), 1, 0),)

        def step(state, xs):
            state = jnp.where(xs[-1][:, None, None, None], 0.0, state)  # a sample starts: nothing carries over
            return gated_delta_step(state, *xs[:-1])

    final, out = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(out, 0, 1).astype(out_dtype), final


class GatedRMSNorm(nn.Module):
    """`w * rms_norm(x) * silu(z)` per value head (norm before gate), statistics in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, z):
        w = self.param("scale", with_axes(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        y = w.astype(self.dtype) * y.astype(self.dtype)
        return (y.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))).astype(self.dtype)


def qkv_hf_order(config) -> np.ndarray:
    """Our fused q|k|v channel layout as indices into Hugging Face's: our channel c is HF channel order[c].

    HF concatenates all q heads | all k heads | all v heads. We group per key head i: [q_i (Dk), k_i (Dk),
    v_{i*g} .. v_{(i+1)*g-1} (g = Hv/Hk value heads of Dv each)], C = Hk * (2 Dk + g Dv) channels, so a
    contiguous 1/t of the channels (t dividing Hk) holds whole key heads with their own value heads and
    tensor parallelism can split the channel dim. in_proj_qkv, the conv kernel and the conv cache use it.
    """
    hk, hv, dk, dv = (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim,
                      config.linear_value_head_dim)
    q = np.arange(hk * dk).reshape(hk, dk)
    v = 2 * hk * dk + np.arange(hv * dv).reshape(hk, (hv // hk) * dv)  # key head i serves value heads i*g..
    return np.concatenate([q, hk * dk + q, v], axis=1).reshape(-1)


def init_deltanet_cache(config, batch: int, dtype=jnp.float32) -> dict:
    """conv: the last K-1 inputs of the causal conv [B, K-1, C] (channels grouped per key head, `qkv_hf_order`);
    state: [B, Hv, Dk, Dv] float32."""
    conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim \
        + config.linear_num_value_heads * config.linear_value_head_dim
    return {"conv": jnp.zeros((batch, config.linear_conv_kernel_dim - 1, conv_dim), dtype),
            "state": jnp.zeros((batch, config.linear_num_value_heads, config.linear_key_head_dim,
                                config.linear_value_head_dim), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
    """How `chunk_gated_delta_rule` runs (every choice computes the same function). The default was the fastest
    for a 2048-token prefill on an H100 (experiments/bench_llm.py --variants); for training, "direct" was 5%
    faster on the DeltaNet core alone."""

    chunk_size: int = 128
    state_pass: str = "transition"
    solver: str = "blocked"


class GatedDeltaNet(nn.Module):
    """x [B, S, D] -> [B, S, D]. `decode=True`: S == 1 and `cache` holds the conv and recurrent states. A prefill
    with a cache continues from it (conv window and recurrent state; zeros for a fresh cache).

    Parameters are the reference's, except that in_proj_qkv's output channels and the conv kernel [K, C] are
    grouped per key head (`qkv_hf_order`), so the channel dim shards over whole heads.
    """

    config: Any  # TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    chunk: ChunkOptions = ChunkOptions()
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask=None, cache=None, segment_ids=None):
        """mask: [B, S] bool, real tokens left-aligned (decode: [B, 1], False for a row that takes no token and
        keeps its conv window and recurrent state exactly). cache: `init_deltanet_cache` dict or None.
        segment_ids: [B, S] int or None: packed samples (conv window and state reset where the id changes; not
        with a cache or decode). Returns (y [B, S, D], new cache or None)."""
        if segment_ids is not None and (cache is not None or self.decode):
            raise ValueError("segment_ids (packed rows) take no cache: a cache holds one sequence per row")
        cfg = self.config
        bsz, s, d = x.shape
        hk, hv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim)
        kdim, vdim, ksize = hk * dk, hv * dv, cfg.linear_conv_kernel_dim
        conv_dim = 2 * kdim + vdim
        dense = lambda f, name: Dense(f, ("embed", "heads"), use_bias=False, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=name)
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0).astype(x.dtype)
        qkv = dense(conv_dim, "in_proj_qkv")(x)
        z = dense(vdim, "in_proj_z")(x)
        b = dense(hv, "in_proj_b")(x)
        a = dense(hv, "in_proj_a")(x)
        conv_w = self.param("conv_kernel", with_axes(nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                                                     ("conv", "heads")), (ksize, conv_dim), self.param_dtype)
        a_log = self.param("A_log", with_axes(lambda key, shape, dt: jnp.log(
            jax.random.uniform(key, shape, dt, 0.01, 16.0)), ("heads",)), (hv,), self.param_dtype)
        dt_bias = self.param("dt_bias", with_axes(nn.initializers.ones, ("heads",)), (hv,), self.param_dtype)

        # causal depthwise conv over [previous K-1 inputs, this input]
        wf = conv_w.astype(jnp.float32)
        if self.decode:
            if s != 1:
                raise ValueError(f"decode takes one token per step, got {s}")
            window = jnp.concatenate([cache["conv"].astype(qkv.dtype), qkv], axis=1)  # [B, K, C]
            conv = jnp.einsum("bkc,kc->bc", window.astype(jnp.float32), wf)[:, None]
            new_conv = window[:, 1:]
            if mask is not None:  # a row that takes no token (mask False) keeps its conv window; its g and beta
                # are set to 0 below, so its recurrent state comes out exactly unchanged (state * e^0 + k * 0)
                new_conv = jnp.where(mask[:, :1, None], new_conv, cache["conv"].astype(new_conv.dtype))
        else:  # left context: the cached last K-1 inputs (continued prefill), or zeros
            padded = jnp.pad(qkv, ((0, 0), (ksize - 1, 0), (0, 0))) if cache is None \
                else jnp.concatenate([cache["conv"].astype(qkv.dtype), qkv], axis=1)
            if segment_ids is None:
                conv = sum(padded[:, j:j + s].astype(jnp.float32) * wf[j] for j in range(ksize))
            else:  # tap j reads the input ksize-1-j tokens back: only from the same sample (no cache: plain forward)
                same = conv_segment_masks(segment_ids, ksize)
                conv = sum(jnp.where(same[j][..., None], padded[:, j:j + s].astype(jnp.float32), 0.0) * wf[j]
                           for j in range(ksize))
            new_conv = None
            if cache is not None:  # the last K-1 real inputs of each row (context before the start)
                lengths = jnp.full((bsz,), s, jnp.int32) if mask is None else mask.sum(-1).astype(jnp.int32)
                idx = lengths[:, None] + jnp.arange(ksize - 1)[None]
                new_conv = jnp.take_along_axis(padded, idx[..., None], axis=1)
        conv = nn.silu(conv).astype(self.dtype)

        conv = conv.reshape(bsz, s, hk, conv_dim // hk)  # per key head: [q_i, k_i, its g value heads]
        q, k = conv[..., :dk], conv[..., dk:2 * dk]
        v = conv[..., 2 * dk:].reshape(bsz, s, hv, dv)
        beta = nn.sigmoid(b)
        g = -jnp.exp(a_log.astype(jnp.float32)) * nn.softplus(a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        if mask is not None:
            g = jnp.where(mask[..., None], g, 0.0)
            beta = jnp.where(mask[..., None], beta, 0).astype(beta.dtype)

        if self.decode:
            qp, kp, vp, gp, bp = _prepare(q, k, v, g, beta)
            state, o = gated_delta_step(cache["state"], qp[:, 0], kp[:, 0], vp[:, 0], gp[:, 0], bp[:, 0])
            core = o[:, None].astype(self.dtype)
        else:
            core, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None if cache is None
                                                 else cache["state"], **dataclasses.asdict(self.chunk),
                                                 segment_ids=segment_ids)
        core = GatedRMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(
            core, z.reshape(bsz, s, hv, dv))
        y = Dense(d, ("heads", "embed"), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="out_proj")(core.reshape(bsz, s, vdim))
        new_cache = None if cache is None else {"conv": new_conv.astype(cache["conv"].dtype), "state": state}
        return y, new_cache
