"""Cuts (1) and (2) of the visual-computation savings as attention that skips the work (not a mask on full attention).

Semantics (the agreed ones of `uhd_jax.yopo.flops`; its docstring is the definition):
(1) window w (odd): a visual query attends to the visual keys of its OWN view within |drow|, |dcol| <= w // 2 on
    that view's output-token grid (bidirectional, clipped at the grid's borders) plus every real text token before
    it in the sequence (causal for text keys; text between earlier views of the same image included). Text
    queries attend to every real key before them, as usual.
(2) active heads (a static tuple per layer): in an inactive head, visual tokens are neither queries nor keys: a
    visual query's output in that head is 0 and text queries in that head see only text keys (causally).
Both at once: visual queries exist only in active heads and there they use the window.
Everything is masked BEFORE the softmax, i.e. renormalised over the allowed keys, which is what skipping the
disallowed keys computes. (The paper's released LLaVA code instead zeroes the disallowed probabilities after the
softmax, without renormalising; its released Qwen2-VL code masks before the softmax, as here.)

How the work is skipped, with static shapes. A row's tokens are split into two compacted sets:
- visual slots [B, Vc], Vc = Vr * T_out: slot j holds the row's visual token j (view j // T_out, output token
  j % T_out), the very index space of `ModelBatch.visual_index`. Its capacity is the vision batch's own static
  capacity (the encoder already computed Vr * T_out tokens per row), so no new static argument is needed, and
  the window's neighbours are direct slot arithmetic: view * T_out + (row + dr) * cols + (col + dc).
- text slots [B, Tc]: the row's real non-visual tokens in sequence order. Tc = `text_slots` (static; None = S,
  always enough but then text queries are not compacted). The host picks it per batch (`ModelBatch.text_slots`,
  set by the Packer: the fullest row's count rounded up to a bucket to bound recompiles). A row with more text tokens than Tc cannot be computed: all its
  outputs are NaN (loud), never silently wrong.
Then (per batch row and head, N heads, h active, w window):
  text queries, active heads:   Tc x (Tc + Vc) scores (all keys, causal by position);
  text queries, inactive heads: Tc x Tc        (text keys only);
  visual queries, active heads: Vc x (Tc + w*w) with the window (text keys before the query + the w x w
                                neighbours, gathered per query: [B, Vc, w*w] slot indices, validity-masked at the
                                borders), or Vc x (Tc + Vc) without (causal by position);
  visual queries, inactive heads: nothing (output 0).
The two key sets of a visual query are scored separately and joined in one softmax over their concatenated
logits (the same as a log-sum-exp merge of two partial softmaxes). Nothing [S, S] is built for visual queries;
`tests/test_visual_attention.py` counts the dot products in the jaxpr. All softmaxes run in float32.

Wired into the model (the full version below, projections included) by `text_model.FullAttention.
_visual_cut_attention`, with the index built once per forward in `TextModel._run_cut_stack` from
`visual_cuts.VisualLayout`; forward without a cache, or a prefill into an empty cache (then every token's K/V is
written too; decode queries are text and only need the per-head visual-key mask of cut (2)). The wiring, in short:
    # once per forward, outside the layer scan (int work only), from the ModelBatch:
    index = build_visual_index(batch.visual_mask, batch.visual_index, batch.vision.grid, lengths,
                               levels=batch.vision.levels, out_tokens_per_view=batch.vision.out_tokens_per_view,
                               window=cuts.window, text_slots=text_slots, segments=segment_ids)
    # in FullAttention, after q/k/v + norms + rope ([B, S, N, H], [B, S, K, H]):
    o = head_cut_attention(q, k, v, index, active_heads=layer_heads)   # or window_attention(q, k, v, index)
    # o: [B, S, N, H]; the gate and o_proj as now.
That version still projects q / k / v of every token in every head. To skip the projections too (the FLOPs that
`flops.py` removes under cut (2)), project the two token sets separately: x_text, x_vis = split_tokens(x, index);
text rows through the full q/k/v projections; visual rows through the columns `q_proj_columns` (query and gate
of the active heads, in the per-head [query, gate] layout) and `kv_proj_columns` (only the KV groups holding an
active head); norms and rope on each set (rope's cos/sin split the same way); then
`visual_attention_core(...)` on the compacted sets, o_proj of the visual rows through `o_proj_rows` of the
active heads, and `merge_tokens` back to [B, S, D].
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NEG = jnp.finfo(jnp.float32).min


# ---------------------------------------------------------------------------------------------------------------
# Where each visual token sits


def visual_grid(visual_mask, visual_index, vision_grid, levels: int, out_tokens_per_view: int):
    """Each visual token's view slot and (row, col) on that view's output-token grid.

    visual_mask, visual_index: [B, S] as in `ModelBatch`; vision_grid: [B, Vr, 2] each view's PATCH grid (h, w);
    levels: 2x2 merge rounds (`VisionBatch.levels`); out_tokens_per_view: T_out (`VisionBatch.out_tokens_per_view`).
    A view's output tokens are its 2^levels x 2^levels patch blocks taken row-major (layout.block_order puts the
    block index (R, C) outermost and every merge folds 4 consecutive tokens), so output token t of a view of
    w patch columns sits at row t // (w >> levels), col t % (w >> levels).
    Returns (view, row, col), each [B, S] int32, -1 where visual_mask is False.
    """
    _check_int("levels", levels, 0)
    _check_int("out_tokens_per_view", out_tokens_per_view, 1)
    visual_mask = jnp.asarray(visual_mask, bool)
    idx = jnp.asarray(visual_index, jnp.int32)
    grid = jnp.asarray(vision_grid, jnp.int32)
    view = idx // out_tokens_per_view
    t = idx % out_tokens_per_view
    cols = jnp.take_along_axis(grid[..., 1], jnp.clip(view, 0, grid.shape[1] - 1), axis=1) >> levels
    cols = jnp.maximum(cols, 1)
    neg = jnp.int32(-1)
    return (jnp.where(visual_mask, view, neg), jnp.where(visual_mask, t // cols, neg),
            jnp.where(visual_mask, t % cols, neg))


# ---------------------------------------------------------------------------------------------------------------
# The compacted token sets (built once per forward, shared by every full-attention layer)


class VisualIndex(NamedTuple):
    """Static-shape index arrays of one batch (a pytree; pass it through jit / scan as data).

    text_pos [B, Tc] int32: sequence position of text slot i (S on empty slots); text_valid [B, Tc] bool.
    vis_pos [B, Vc] int32: sequence position of visual slot j (S where the row has no such token); vis_valid.
    text_seg [B, Tc], vis_seg [B, Vc] int32: packed-sample id of each slot (all 0 without segments).
    nbr [B, Vc, w*w] int32: visual slots of each visual slot's window neighbours, nbr_valid [B, Vc, w*w] bool
        (inside the view's grid and present in the row); both None when the window cut is off.
    overflow [B] bool: the row has more text tokens than Tc (its outputs become NaN).
    """

    text_pos: jax.Array
    text_valid: jax.Array
    text_seg: jax.Array
    vis_pos: jax.Array
    vis_valid: jax.Array
    vis_seg: jax.Array
    nbr: jax.Array | None
    nbr_valid: jax.Array | None
    overflow: jax.Array

    @property
    def window(self) -> int | None:
        return None if self.nbr is None else int(round(self.nbr.shape[-1] ** 0.5))


def _check_int(name, value, low):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_window(window) -> None:
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool)
                               or window < 1 or window % 2 == 0):
        raise ValueError(f"window must be None or an odd positive int (a square centred on the query), "
                         f"got {window!r}")


def build_visual_index(visual_mask, visual_index, vision_grid, lengths, *, levels: int, out_tokens_per_view: int,
                       window: int | None = None, text_slots: int | None = None, segments=None) -> VisualIndex:
    """The compacted text and visual slots of a batch (see the module docstring).

    visual_mask, visual_index [B, S], vision_grid [B, Vr, 2] (patch grid per view), lengths [B] (real tokens are
    positions < length), segments [B, S] packed-sample ids or None. window: odd side or None (cut (1) off).
    text_slots: static text capacity Tc (None: S)."""
    check_window(window)
    _check_int("levels", levels, 0)
    _check_int("out_tokens_per_view", out_tokens_per_view, 1)
    visual_mask = jnp.asarray(visual_mask, bool)
    b, s = visual_mask.shape
    tc = s if text_slots is None else text_slots
    _check_int("text_slots", tc, 1)
    grid = jnp.asarray(vision_grid, jnp.int32)
    vr = grid.shape[1]
    t_out = out_tokens_per_view
    vc = vr * t_out
    if vc == 0:
        raise ValueError("vision_grid has no view slots (Vr = 0): a text-only batch needs no visual attention")
    pos = jnp.arange(s, dtype=jnp.int32)
    real = pos[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
    vis = visual_mask & real
    text = real & ~visual_mask
    seg = jnp.zeros((b, s), jnp.int32) if segments is None else jnp.asarray(segments, jnp.int32)
    rows = jnp.arange(b)[:, None]

    slot = jnp.cumsum(text, axis=1, dtype=jnp.int32) - 1
    tgt = jnp.where(text, slot, tc)  # index tc: dropped
    posb = jnp.broadcast_to(pos, (b, s))
    text_pos = jnp.full((b, tc), s, jnp.int32).at[rows, tgt].set(posb, mode="drop")
    n_text = text.sum(axis=1)
    text_valid = text_pos < s
    overflow = n_text > tc

    vtgt = jnp.where(vis, jnp.asarray(visual_index, jnp.int32), vc)
    vis_pos = jnp.full((b, vc), s, jnp.int32).at[rows, vtgt].set(posb, mode="drop")
    vis_valid = vis_pos < s

    def seg_at(p):
        return jnp.take_along_axis(seg, jnp.minimum(p, s - 1), axis=1)

    nbr = nbr_valid = None
    if window is not None:
        j = jnp.arange(vc, dtype=jnp.int32)
        view, t = j // t_out, j % t_out
        gh = grid[:, view, 0] >> levels  # [B, Vc]
        gw = grid[:, view, 1] >> levels
        row, col = t // jnp.maximum(gw, 1), t % jnp.maximum(gw, 1)
        r = window // 2
        offs = np.array([(dr, dc) for dr in range(-r, r + 1) for dc in range(-r, r + 1)], np.int32)  # [w*w, 2]
        nr = row[..., None] + offs[:, 0]
        nc = col[..., None] + offs[:, 1]
        inside = (nr >= 0) & (nr < gh[..., None]) & (nc >= 0) & (nc < gw[..., None])
        nbr = jnp.where(inside, view[:, None] * t_out + nr * gw[..., None] + nc, 0)
        nbr = jnp.clip(nbr, 0, vc - 1).astype(jnp.int32)
        present = jnp.take_along_axis(vis_valid, nbr.reshape(b, -1), axis=1).reshape(nbr.shape)
        nbr_valid = inside & present & vis_valid[..., None]

    return VisualIndex(text_pos=text_pos, text_valid=text_valid, text_seg=seg_at(text_pos), vis_pos=vis_pos,
                       vis_valid=vis_valid, vis_seg=seg_at(vis_pos), nbr=nbr, nbr_valid=nbr_valid,
                       overflow=overflow)


def split_tokens(x, index: VisualIndex):
    """x [B, S, ...] -> (x at the text slots [B, Tc, ...], x at the visual slots [B, Vc, ...]); empty slots hold
    the last position's value (masked everywhere downstream)."""
    s = x.shape[1]

    def take(p):
        p = jnp.minimum(p, s - 1).reshape(p.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, p, axis=1)

    return take(index.text_pos), take(index.vis_pos)


def merge_tokens(y_text, y_vis, index: VisualIndex, seq_len: int):
    """Inverse of `split_tokens`: [B, Tc, ...] and [B, Vc, ...] -> [B, S, ...], zeros at padding positions; a row
    with `index.overflow` (more text tokens than text slots, so some were never computed) is NaN throughout."""
    b = y_text.shape[0]
    out = jnp.zeros((b, seq_len) + y_text.shape[2:], jnp.result_type(y_text, y_vis))
    rows = jnp.arange(b)[:, None]
    out = out.at[rows, index.text_pos].set(y_text.astype(out.dtype), mode="drop")
    out = out.at[rows, index.vis_pos].set(y_vis.astype(out.dtype), mode="drop")
    return jnp.where(index.overflow.reshape((b,) + (1,) * (out.ndim - 1)), jnp.nan, out)


# ---------------------------------------------------------------------------------------------------------------
# Heads: static layouts and projection columns


def normalize_heads(active_heads, num_heads: int) -> tuple:
    """None (all heads) or a collection of distinct head indices -> sorted tuple."""
    if active_heads is None:
        return tuple(range(num_heads))
    if isinstance(active_heads, numbers.Integral):
        raise ValueError(f"active_heads must be a tuple of head indices (a calibrated mask), not a count "
                         f"({active_heads!r})")
    a = tuple(sorted(int(i) for i in active_heads))
    if len(set(a)) != len(a) or any(not 0 <= i < num_heads for i in a):
        raise ValueError(f"active_heads {tuple(active_heads)!r} must be distinct indices in [0, {num_heads})")
    return a


def active_kv_groups(num_heads: int, num_kv_heads: int, active_heads) -> tuple:
    """The KV heads (groups) holding at least one active query head, sorted."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    g = num_heads // num_kv_heads
    return tuple(sorted({i // g for i in normalize_heads(active_heads, num_heads)}))


def q_proj_columns(num_heads: int, head_dim: int, active_heads, gated: bool) -> np.ndarray:
    """Columns of the q_proj kernel [D, N*H*(2 if gated)] for the active heads, in head order; gated: each head's
    [query (H), gate (H)] as FullAttention lays them out, so the taken columns reshape to [h, 2H] the same way."""
    a = normalize_heads(active_heads, num_heads)
    per = head_dim * (2 if gated else 1)
    return np.array([i * per + c for i in a for c in range(per)], np.int32)


def kv_proj_columns(num_heads: int, num_kv_heads: int, head_dim: int, active_heads) -> np.ndarray:
    """Columns of the k_proj / v_proj kernels [D, K*H] of the KV groups holding an active head."""
    return np.array([k * head_dim + c for k in active_kv_groups(num_heads, num_kv_heads, active_heads)
                     for c in range(head_dim)], np.int32)


def o_proj_rows(num_heads: int, head_dim: int, active_heads) -> np.ndarray:
    """Rows of the o_proj kernel [N*H, D] that read the active heads' outputs."""
    return np.array([i * head_dim + c for i in normalize_heads(active_heads, num_heads) for c in range(head_dim)],
                    np.int32)


def _group_layout(heads: tuple, g: int):
    """Static grouped layout of a subset of query heads for a GQA einsum: (groups [Kx], slots [Kx, gx] local
    indices into `heads` (ragged groups padded by repeating their first head), back [len(heads)] flat index of
    each head in the [Kx * gx] layout)."""
    groups = tuple(sorted({i // g for i in heads}))
    members = [[n for n, i in enumerate(heads) if i // g == k] for k in groups]
    gx = max(len(m) for m in members)
    slots = np.array([m + [m[0]] * (gx - len(m)) for m in members], np.int32)
    back = np.zeros(len(heads), np.int32)
    for a, m in enumerate(members):
        for b_, n in enumerate(m):
            back[n] = a * gx + b_
    return groups, slots, back


# ---------------------------------------------------------------------------------------------------------------
# The attention


def _softmax_parts(logit_parts, mask_parts):
    """One softmax over the concatenation of several logit blocks (last axis), masked before it; rows with no
    allowed key give 0. Returns the probability blocks."""
    sizes = [x.shape[-1] for x in logit_parts]
    logits = jnp.concatenate([jnp.where(m, x, _NEG) for x, m in zip(logit_parts, mask_parts)], axis=-1)
    anyk = jnp.concatenate(mask_parts, axis=-1).any(axis=-1, keepdims=True)
    p = jnp.where(anyk, jax.nn.softmax(logits, axis=-1), 0.0)
    return jnp.split(p, np.cumsum(sizes)[:-1], axis=-1)


def _grouped_q(q, slots):
    """q [B, T, h, H] (heads in `heads` order) -> [B, T, Kx, gx, H]."""
    return q[:, :, slots.reshape(-1)].reshape(q.shape[:2] + slots.shape + q.shape[-1:])


def _ungroup(o, back):
    """[B, T, Kx, gx, H] -> [B, T, h, H] (drops the padding heads)."""
    return o.reshape(o.shape[:2] + (-1,) + o.shape[-1:])[:, :, back]


def _shared_keys(qg, kk, vv, mask, scale):
    """qg [B, T, Kx, gx, H], keys [B, S', Kx, H] shared by all queries; mask [B, T, S'] -> [B, T, Kx, gx, H]."""
    lg = jnp.einsum("btkgh,bskh->bkgts", qg, kk, preferred_element_type=jnp.float32) * scale
    (p,) = _softmax_parts([lg], [mask[:, None, None]])
    return jnp.einsum("bkgts,bskh->btkgh", p, vv, preferred_element_type=jnp.float32)


def visual_attention_core(q_text, k_text, v_text, q_vis, k_vis, v_vis, index: VisualIndex, *,
                          active_heads=None, scale: float | None = None):
    """Attention on the compacted token sets (see the module docstring for what each query set sees).

    q_text [B, Tc, N, H], k_text / v_text [B, Tc, K, H]: every head of the text slots.
    q_vis [B, Vc, h, H]: the visual slots' queries of the active heads only (sorted head order);
    k_vis / v_vis [B, Vc, Ka, H]: the visual slots' keys / values of `active_kv_groups` only (sorted).
    active_heads: static tuple of head indices (None: all).
    Returns (o_text [B, Tc, N, H], o_vis [B, Vc, h, H]) in q_text's dtype (float32 softmax); empty slots give 0,
    rows with `index.overflow` give NaN."""
    b, tc, n, hd = q_text.shape
    kh = k_text.shape[2]
    if n % kh:
        raise ValueError(f"{n} query heads are not a multiple of {kh} kv heads")
    g = n // kh
    act = normalize_heads(active_heads, n)
    ina = tuple(i for i in range(n) if i not in set(act))
    groups_a = active_kv_groups(n, kh, act) if act else ()
    if q_vis.shape[2] != len(act):
        raise ValueError(f"q_vis has {q_vis.shape[2]} heads for {len(act)} active heads")
    if k_vis.shape[2] != len(groups_a) or v_vis.shape[2] != len(groups_a):
        raise ValueError(f"k_vis / v_vis have {k_vis.shape[2]} / {v_vis.shape[2]} kv heads for the "
                         f"{len(groups_a)} groups holding an active head")
    scale = hd ** -0.5 if scale is None else scale
    dtype = q_text.dtype
    ix = index
    same_tt = ix.text_seg[:, :, None] == ix.text_seg[:, None, :]
    tt = ix.text_valid[:, :, None] & ix.text_valid[:, None, :] & same_tt & \
        (ix.text_pos[:, None, :] <= ix.text_pos[:, :, None])  # [B, Tc(q), Tc(k)]

    parts_text = []  # (heads, output [B, Tc, len(heads), H])
    if ina:  # text queries, inactive heads: text keys only
        groups, slots, back = _group_layout(ina, g)
        qg = _grouped_q(q_text[:, :, list(ina)], slots)
        o = _shared_keys(qg, k_text[:, :, list(groups)], v_text[:, :, list(groups)], tt, scale)
        parts_text.append((ina, _ungroup(o, back)))
    o_vis = jnp.zeros((b, q_vis.shape[1], 0, hd), jnp.float32)
    if act:
        groups, slots, back = _group_layout(act, g)
        local = {k: i for i, k in enumerate(groups_a)}  # groups == groups_a
        kt, vt = k_text[:, :, list(groups)], v_text[:, :, list(groups)]
        kv = k_vis[:, :, [local[k] for k in groups]]
        vv = v_vis[:, :, [local[k] for k in groups]]
        # text queries, active heads: text keys and visual keys, causal by position
        tv = ix.vis_valid[:, None, :] & ix.text_valid[:, :, None] & \
            (ix.text_seg[:, :, None] == ix.vis_seg[:, None, :]) & (ix.vis_pos[:, None, :] <= ix.text_pos[:, :, None])
        qg = _grouped_q(q_text[:, :, list(act)], slots)
        o = _shared_keys(qg, jnp.concatenate([kt, kv], 1), jnp.concatenate([vt, vv], 1),
                         jnp.concatenate([tt, tv], 2), scale)
        parts_text.append((act, _ungroup(o, back)))
        # visual queries (active heads): text keys before them ...
        qvg = _grouped_q(q_vis, slots)
        vt_mask = ix.vis_valid[:, :, None] & ix.text_valid[:, None, :] & \
            (ix.vis_seg[:, :, None] == ix.text_seg[:, None, :]) & (ix.text_pos[:, None, :] < ix.vis_pos[:, :, None])
        lg_t = jnp.einsum("bqkgh,bskh->bkgqs", qvg, kt, preferred_element_type=jnp.float32) * scale
        if ix.nbr is None:  # ... and visual keys at or before them
            vv_mask = ix.vis_valid[:, :, None] & ix.vis_valid[:, None, :] & \
                (ix.vis_seg[:, :, None] == ix.vis_seg[:, None, :]) & (ix.vis_pos[:, None, :] <= ix.vis_pos[:, :, None])
            lg_v = jnp.einsum("bqkgh,bskh->bkgqs", qvg, kv, preferred_element_type=jnp.float32) * scale
            p_t, p_v = _softmax_parts([lg_t, lg_v], [vt_mask[:, None, None], vv_mask[:, None, None]])
            ov = jnp.einsum("bkgqs,bskh->bqkgh", p_v, vv, preferred_element_type=jnp.float32)
        else:  # ... and the w x w neighbours of their own view (gathered per query: [B, Vc, w*w, Kx, H])
            vc, ww = ix.nbr.shape[1], ix.nbr.shape[2]
            flat = ix.nbr.reshape(b, vc * ww)[:, :, None, None]
            kn = jnp.take_along_axis(kv, flat, axis=1).reshape(b, vc, ww, *kv.shape[2:])
            vn = jnp.take_along_axis(vv, flat, axis=1).reshape(b, vc, ww, *vv.shape[2:])
            lg_v = jnp.einsum("bqkgh,bqjkh->bkgqj", qvg, kn, preferred_element_type=jnp.float32) * scale
            p_t, p_v = _softmax_parts([lg_t, lg_v], [vt_mask[:, None, None], ix.nbr_valid[:, None, None]])
            ov = jnp.einsum("bkgqj,bqjkh->bqkgh", p_v, vn, preferred_element_type=jnp.float32)
        ov = ov + jnp.einsum("bkgqs,bskh->bqkgh", p_t, vt, preferred_element_type=jnp.float32)
        o_vis = _ungroup(ov, back)

    # text outputs back in head order (static permutation)
    heads = sum((h for h, _ in parts_text), ())
    o_text = jnp.concatenate([o for _, o in parts_text], axis=2)[:, :, list(np.argsort(heads))]
    bad = ix.overflow[:, None, None, None]
    o_text = jnp.where(bad, jnp.nan, o_text).astype(dtype)
    o_vis = jnp.where(bad, jnp.nan, o_vis).astype(dtype)
    return o_text, o_vis


def head_cut_fused(q_text, k_text, v_text, q_vis, k_vis, v_vis, index: VisualIndex, *, active_heads, seq_len: int,
                   lengths=None, implementation: str = "auto"):
    """Cut (2) without the window, on the fused attention kernel (cuDNN flash attention on a GPU) instead of
    `visual_attention_core`'s materialised [Vc, Tc + Vc] scores, which made the cut 3.3x SLOWER than no cut on an
    H100 (Qwen3-8B, 5,120 visual tokens). Same inputs and outputs as `visual_attention_core` (no window); same
    function, because without the window the cut's key sets are plain causal sets:
      active heads: every query, text or visual, sees every real key before it (text and visual): causal attention
        over the whole sequence, in these heads only (the visual K/V of the active KV groups);
      inactive heads: text queries see only text keys: causal attention over the compacted text slots (slot order
        is sequence order; the valid slots are a prefix of each row).
    A KV group with only some heads active is expanded to one KV head per query head (the kernel needs whole
    groups). Padded rows (`segments`) are not supported here: the caller refuses cuts on packed rows.
    seq_len: S; lengths [B] real tokens (None: all S)."""
    from uhd_jax.model.attention import dot_product_attention

    b, _, n, hd = q_text.shape
    kh = k_text.shape[2]
    g = n // kh
    act = normalize_heads(active_heads, n)
    ina = tuple(i for i in range(n) if i not in set(act))
    groups_a = active_kv_groups(n, kh, act) if act else ()
    if q_vis.shape[2] != len(act) or k_vis.shape[2] != len(groups_a):
        raise ValueError(f"q_vis / k_vis have {q_vis.shape[2]} / {k_vis.shape[2]} heads for {len(act)} active heads "
                         f"in {len(groups_a)} KV groups")
    dtype = q_text.dtype
    bad = index.overflow[:, None, None, None]
    parts = []  # (heads, text output [B, Tc, len(heads), H])
    o_vis = jnp.zeros((b, q_vis.shape[1], 0, hd), dtype)

    def per_head_kv(kk, vv, heads, groups):  # KV heads lined up with the query heads `heads`
        local = {grp: i for i, grp in enumerate(groups)}
        idx = [local[h // g] for h in heads]
        if idx == [i for i in range(len(groups)) for _ in range(g)]:  # whole groups, in order: GQA as it is
            return kk, vv
        return kk[:, :, idx], vv[:, :, idx]

    if act:
        q = merge_tokens(q_text[:, :, list(act)], q_vis, index, seq_len)
        k = merge_tokens(k_text[:, :, list(groups_a)], k_vis, index, seq_len)
        v = merge_tokens(v_text[:, :, list(groups_a)], v_vis, index, seq_len)
        k, v = per_head_kv(k, v, act, groups_a)
        o = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), kv_lengths=lengths, causal=True,
                                  implementation=implementation)
        o_t, o_vis = split_tokens(o, index)
        parts.append((act, o_t))
    if ina:
        groups_i = tuple(sorted({h // g for h in ina}))
        k, v = per_head_kv(k_text[:, :, list(groups_i)], v_text[:, :, list(groups_i)], ina, groups_i)
        o = dot_product_attention(q_text[:, :, list(ina)], k, v, kv_lengths=index.text_valid.sum(-1),
                                  causal=True, implementation=implementation)
        parts.append((ina, o))
    heads = sum((h for h, _ in parts), ())
    o_text = jnp.concatenate([o for _, o in parts], axis=2)[:, :, list(np.argsort(heads))]
    return jnp.where(bad, jnp.nan, o_text).astype(dtype), jnp.where(bad, jnp.nan, o_vis).astype(dtype)


def head_cut_attention(q, k, v, index: VisualIndex, *, active_heads=None, scale: float | None = None):
    """Cut (2) (and cut (1) when `index` was built with a window) on full-layout arrays.

    q [B, S, N, H], k / v [B, S, K, H] (rope applied); active_heads: static tuple of active head indices (None:
    all, i.e. cut (1) alone; () : no head sees visual tokens). Visual queries are taken only in the active heads
    and visual keys / values only in the KV groups holding an active head. Returns [B, S, N, H]: visual outputs
    are 0 in inactive heads, padding positions 0."""
    b, s, n, hd = q.shape
    kh = k.shape[2]
    act = normalize_heads(active_heads, n)
    groups = active_kv_groups(n, kh, act) if act else ()
    qt, qv = split_tokens(q, index)
    kt, kv = split_tokens(k, index)
    vt, vv = split_tokens(v, index)
    o_text, o_vis = visual_attention_core(qt, kt, vt, qv[:, :, list(act)], kv[:, :, list(groups)],
                                          vv[:, :, list(groups)], index, active_heads=act, scale=scale)
    full_vis = jnp.zeros(o_vis.shape[:2] + (n, hd), o_vis.dtype)
    if act:
        full_vis = full_vis.at[:, :, list(act)].set(o_vis)
    return merge_tokens(o_text, full_vis, index, s)


def window_attention(q, k, v, index: VisualIndex, *, scale: float | None = None):
    """Cut (1) alone: causal attention except that visual queries see only the text keys before them and the
    visual keys of their own view within the window `index` was built with. q [B, S, N, H], k / v [B, S, K, H];
    returns [B, S, N, H] (padding positions 0)."""
    if index.nbr is None:
        raise ValueError("window_attention: index was built with window=None; pass window= to build_visual_index")
    return head_cut_attention(q, k, v, index, active_heads=None, scale=scale)


# ---------------------------------------------------------------------------------------------------------------
# Calibration statistic


def attention_mass(q, k, *, visual_mask, lengths, chunk: int = 128, segments=None, scale: float | None = None):
    """Per row and head, the causal softmax attention mass that all real queries put on visual keys and on text
    keys: (visual [B, N], text [B, N]) float32, summed over the row's real queries (the paper's r(l, h) =
    visual / text; sum over rows for a batch total). Probabilities are computed chunk-wise over queries
    (`chunk` queries at a time, a lax.scan), never [N, S, S] at once.

    q [B, S, N, H] (rope applied), k [B, S, K, H]; visual_mask [B, S]; lengths [B]; segments [B, S] or None."""
    _check_int("chunk", chunk, 1)
    b, s, n, hd = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"{n} query heads are not a multiple of {kh} kv heads")
    g = n // kh
    scale = hd ** -0.5 if scale is None else scale
    pad = -s % chunk
    pos = jnp.arange(s, dtype=jnp.int32)
    real = pos[None] < jnp.asarray(lengths, jnp.int32)[:, None]
    vis_k = jnp.asarray(visual_mask, bool) & real
    text_k = real & ~jnp.asarray(visual_mask, bool)
    seg = jnp.zeros((b, s), jnp.int32) if segments is None else jnp.asarray(segments, jnp.int32)
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, (s + pad) // chunk, chunk, kh, g, hd)
    qpos = jnp.arange(s + pad, dtype=jnp.int32).reshape(-1, chunk)
    qreal = jnp.pad(real, ((0, 0), (0, pad))).reshape(b, -1, chunk)
    qseg = jnp.pad(seg, ((0, 0), (0, pad))).reshape(b, -1, chunk)

    def step(carry, xs):
        qc, pc, rc, sc = xs  # [B, c, K, G, H], [c], [B, c], [B, c]
        lg = jnp.einsum("bckgh,bskh->bkgcs", qc, k, preferred_element_type=jnp.float32) * scale
        m = real[:, None, :] & (pos[None, None, :] <= pc[None, :, None]) & rc[:, :, None] & \
            (sc[:, :, None] == seg[:, None, :])  # [B, c, S]
        (p,) = _softmax_parts([lg], [m[:, None, None]])
        vm = jnp.einsum("bkgcs,bs->bkg", p, vis_k.astype(jnp.float32))
        tm = jnp.einsum("bkgcs,bs->bkg", p, text_k.astype(jnp.float32))
        return (carry[0] + vm.reshape(b, n), carry[1] + tm.reshape(b, n)), None

    zero = jnp.zeros((b, n), jnp.float32)
    xs = (jnp.moveaxis(qp, 1, 0), qpos, jnp.moveaxis(qreal, 1, 0), jnp.moveaxis(qseg, 1, 0))
    (vis_mass, text_mass), _ = jax.lax.scan(step, (zero, zero), xs)
    return vis_mass, text_mass
