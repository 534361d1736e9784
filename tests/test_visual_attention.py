"""Cuts (1) window and (2) heads as skipping attention (uhd_jax/model/visual_attention.py), checked against a dense
masked softmax attention written here from the definition (float64 numpy, the allowed [S, S] mask built by brute
force from each token's view / row / col as the test lays them out)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.data.batch import round_text_slots, text_count
from uhd_jax.model import visual_attention as va

LEVELS = 2
T_OUT = 32
N, K, H = 4, 2, 8


# ---------------------------------------------------------------------------------------------------------------
# Hand-made layouts: a row is a list of segments, int = text run, (slot, rows, cols) = one view's token grid


def make_batch(rows_spec, s, vr=3, segments=None, t_out=T_OUT):
    b = len(rows_spec)
    vm = np.zeros((b, s), bool)
    vi = np.zeros((b, s), np.int32)
    grid = np.zeros((b, vr, 2), np.int32)
    view = np.full((b, s), -1)
    row = np.full((b, s), -1)
    col = np.full((b, s), -1)
    lengths = np.zeros(b, np.int32)
    for bi, spec in enumerate(rows_spec):
        p = 0
        for seg in spec:
            if isinstance(seg, int):
                p += seg
                continue
            slot, r, c = seg
            grid[bi, slot] = (r << LEVELS, c << LEVELS)
            for t in range(r * c):
                vm[bi, p] = True
                vi[bi, p] = slot * t_out + t
                view[bi, p], row[bi, p], col[bi, p] = slot, t // c, t % c
                p += 1
        lengths[bi] = p
    seg_ids = None if segments is None else np.asarray(segments, np.int32)
    return dict(visual_mask=vm, visual_index=vi, grid=grid, lengths=lengths, view=view, row=row, col=col,
                segments=seg_ids)


ROWS = [[3, (0, 3, 4), 2, (1, 2, 5), (2, 1, 1), 4],  # text before / between / after, adjacent views
        [1, (1, 3, 3), 5, (0, 2, 2), 2]]  # slots out of sequence order, slot 2 empty, right padding
S = 40


def allowed_mask(d, window, active):
    """[B, N, S, S] bool from the definition; active: set of active heads."""
    vm, view, row, col, lengths = d["visual_mask"], d["view"], d["row"], d["col"], d["lengths"]
    b, s = vm.shape
    seg = d["segments"] if d["segments"] is not None else np.zeros((b, s), np.int32)
    out = np.zeros((b, N, s, s), bool)
    for bi in range(b):
        for i in range(lengths[bi]):
            for j in range(lengths[bi]):
                if seg[bi, i] != seg[bi, j]:
                    continue
                for n in range(N):
                    if vm[bi, i]:
                        if n not in active:
                            ok = False
                        elif window is None:
                            ok = j <= i
                        else:
                            r = window // 2
                            ok = (not vm[bi, j] and j < i) or (
                                vm[bi, j] and view[bi, j] == view[bi, i] and abs(row[bi, j] - row[bi, i]) <= r
                                and abs(col[bi, j] - col[bi, i]) <= r)
                    else:
                        ok = j <= i and (n in active or not vm[bi, j])
                    out[bi, n, i, j] = ok
    return out


def dense_probs(q, k, allowed):
    """Masked softmax probabilities [B, N, S, S] in float64 (rows without an allowed key: 0)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    lg = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    mx = np.where(allowed, lg, -np.inf).max(axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(np.where(allowed, lg - np.where(np.isfinite(mx), mx, 0.0), 0.0)), 0.0)
    den = e.sum(-1, keepdims=True)
    return np.divide(e, den, out=np.zeros_like(e), where=den > 0)


def dense_reference(q, k, v, allowed):
    v = np.repeat(np.asarray(v, np.float64), q.shape[2] // k.shape[2], axis=2)
    return np.einsum("bnqk,bknh->bqnh", dense_probs(q, k, allowed), v)


def rel_err(got, ref, d):
    real = np.arange(ref.shape[1])[None, :] < d["lengths"][:, None]
    diff = np.abs(np.asarray(got, np.float64) - ref)[real]
    return float(diff.max() / np.abs(ref[real]).max())


def qkv(s, seed=0, b=2):
    rs = np.random.RandomState(seed)
    return (rs.randn(b, s, N, H).astype(np.float32), rs.randn(b, s, K, H).astype(np.float32),
            rs.randn(b, s, K, H).astype(np.float32))


_build = jax.jit(va.build_visual_index, static_argnames=("levels", "out_tokens_per_view", "window", "text_slots"))
head_cut = jax.jit(va.head_cut_attention, static_argnames=("active_heads",))
window_attn = jax.jit(va.window_attention)


def index_of(d, window, text_slots=None):
    va.check_window(window)
    return _build(d["visual_mask"], d["visual_index"], d["grid"], d["lengths"], levels=LEVELS,
                                 out_tokens_per_view=T_OUT, window=window, text_slots=text_slots,
                                 segments=d["segments"])


# ---------------------------------------------------------------------------------------------------------------
# visual_grid


def test_visual_grid_hand_layout():
    d = make_batch(ROWS, S)
    view, row, col = va.visual_grid(d["visual_mask"], d["visual_index"], d["grid"], LEVELS, T_OUT)
    np.testing.assert_array_equal(view, d["view"])
    np.testing.assert_array_equal(row, d["row"])
    np.testing.assert_array_equal(col, d["col"])


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_visual_grid_matches_processor(tmp_path, mode):
    from tests.data_utils import make_model_dir, random_image
    from uhd_jax.data.packer import Packer, PackerConfig
    from uhd_jax.data.processor import Processor

    base = Processor.from_pretrained(make_model_dir(str(tmp_path / "model")))
    p = Processor(base.tokenizer, base.slice_config.replace(downsample_mode=mode, max_slice_nums=4), base.tokens)

    def chat(images):
        parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": "What is it?"}]
        return p.encode_chat([{"role": "user", "content": parts}, {"role": "assistant", "content": "A cat."}])

    samples = [chat([random_image(700, 1000, 1)]), chat([random_image(100, 60, 2), random_image(30, 900, 3)]),
               chat([random_image(448, 448, 4), random_image(900, 300, 5)])]
    tpv = 1152 if mode == "16x" else 1160
    b = Packer(p, PackerConfig(batch_size=3, seq_buckets=(4096,), tokens_per_view=tpv, views_per_row=10)).pack(
        samples)
    vis = b.vision
    view, row, col = (np.asarray(x) for x in va.visual_grid(b.visual_mask, b.visual_index, vis.grid, vis.levels,
                                                            vis.out_tokens_per_view))
    unit = 4 if mode == "16x" else 2  # patches per output token along a side
    for r, s in enumerate(samples):
        exp_view, exp_row, exp_col = [], [], []
        for k, v in enumerate(s.views):  # from the views' pixel shapes: 14 px patches, unit x unit per token
            rows, cols = v.shape[1] // 14 // unit, v.shape[2] // 14 // unit
            exp_view += [k] * (rows * cols)
            exp_row += [t // cols for t in range(rows * cols)]
            exp_col += [t % cols for t in range(rows * cols)]
        pos = np.flatnonzero(b.visual_mask[r])
        assert len(s.views) >= 1 and pos.size == len(exp_view)
        np.testing.assert_array_equal(view[r, pos], exp_view)
        np.testing.assert_array_equal(row[r, pos], exp_row)
        np.testing.assert_array_equal(col[r, pos], exp_col)
        assert (view[r][~b.visual_mask[r]] == -1).all() and (col[r][~b.visual_mask[r]] == -1).all()
    assert len({v.shape[1:] for s in samples for v in s.views}) >= 4  # several grid shapes were exercised


# ---------------------------------------------------------------------------------------------------------------
# window and heads against the dense reference


@pytest.mark.parametrize("window", [1, 3, 5, 11])  # 11: larger than every grid
def test_window_attention_matches_dense(window):
    d = make_batch(ROWS, S)
    q, k, v = qkv(S)
    got = window_attn(q, k, v, index_of(d, window))
    ref = dense_reference(q, k, v, allowed_mask(d, window, set(range(N))))
    assert rel_err(got, ref, d) <= 1e-5
    assert not np.asarray(got)[~(np.arange(S)[None] < d["lengths"][:, None])].any()  # padding: 0


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("active", [(), (0,), (1, 2), (3, 0, 2), (0, 1, 2, 3)])
def test_head_cut_matches_dense(window, active):
    d = make_batch(ROWS, S)
    q, k, v = qkv(S, seed=1)
    got = np.asarray(head_cut(q, k, v, index_of(d, window, text_slots=12), active_heads=active))
    ref = dense_reference(q, k, v, allowed_mask(d, window, set(active)))
    assert rel_err(got, ref, d) <= 1e-5
    for n in set(range(N)) - set(active):  # visual outputs of inactive heads are exactly 0
        assert not got[..., n, :][d["visual_mask"]].any()


@functools.partial(jax.jit, static_argnames=("act",))
def _fused_full(q, k, v, ix, lengths, act):
    """head_cut_fused (the model's path for cut (2) without the window) on full-layout arrays, like
    va.head_cut_attention: the visual queries / keys of the active heads / groups only."""
    groups = va.active_kv_groups(N, K, act) if act else ()
    (qt, qv), (kt, kv), (vt, vv) = va.split_tokens(q, ix), va.split_tokens(k, ix), va.split_tokens(v, ix)
    ot, ov = va.head_cut_fused(qt, kt, vt, qv[:, :, list(act)], kv[:, :, list(groups)], vv[:, :, list(groups)], ix,
                               active_heads=act, seq_len=q.shape[1], lengths=lengths, implementation="xla")
    full = jnp.zeros(ov.shape[:2] + (N, H), ov.dtype)
    if act:
        full = full.at[:, :, list(act)].set(ov)
    return va.merge_tokens(ot, full, ix, q.shape[1])


@pytest.mark.parametrize("active", [(), (0,), (1, 2), (3, 0, 2), (0, 1, 2, 3)])
def test_head_cut_fused_matches_dense(active):
    """Cut (2) without the window on the fused kernel (two causal attention calls): the same function as the
    definition, with groups partly active (expanded KV heads), whole groups (GQA as is), and none."""
    act = va.normalize_heads(active, N)
    d = make_batch(ROWS, S)
    q, k, v = qkv(S, seed=1)
    ix = index_of(d, None, text_slots=12)
    got = np.asarray(_fused_full(q, k, v, ix, jnp.asarray(d["lengths"]), act))
    ref = dense_reference(q, k, v, allowed_mask(d, None, set(active)))
    assert rel_err(got, ref, d) <= 1e-5
    for n in set(range(N)) - set(active):
        assert not got[..., n, :][d["visual_mask"]].any()
    # a row with more text tokens than text slots: NaN throughout, the other row unaffected
    bad = np.asarray(_fused_full(q, k, v, index_of(d, None, text_slots=8), jnp.asarray(d["lengths"]), act))
    assert np.isnan(bad[0]).all() and np.isfinite(bad[1]).all()


def test_packed_segments():
    """Packed rows: keys of the query's own sample only (same S and capacities as above: compiled once)."""
    d = make_batch([[2, (0, 2, 3), 3, 2, (1, 3, 2), 1], [(2, 2, 2), 4]], S,
                   segments=[[1] * 11 + [2] * 9 + [0] * 20, [1] * 8 + [0] * 32])
    q, k, v = qkv(S, seed=2)
    for window, active in [(3, (1, 2)), (None, (0,)), (3, (0, 1, 2, 3))]:
        got = head_cut(q, k, v, index_of(d, window, text_slots=12), active_heads=active)
        ref = dense_reference(q, k, v, allowed_mask(d, window, set(active)))
        assert rel_err(got, ref, d) <= 1e-5


def test_text_between_views_is_seen_by_later_views_only():
    """A visual query sees every text token before it, including text between earlier views of the image."""
    d = make_batch([[2, (0, 2, 2), 3, (1, 2, 2), 1], [1]], S)  # view 0 at 2..5, text 6..8, view 1 at 9..12
    q, k, v = qkv(S, seed=3)
    ix = index_of(d, 3)
    base = np.asarray(window_attn(q, k, v, ix))
    v2 = v.copy()
    v2[0, 7] += 1.0  # a text token between view 0 (positions 2..5) and view 1 (positions 9..12)
    moved = np.abs(np.asarray(window_attn(q, k, v2, ix)) - base).max(axis=(2, 3))[0]
    assert not moved[2:6].any() and moved[9:13].all()


def test_text_overflow_gives_nan_and_text_slots_needed():
    d = make_batch(ROWS, S)
    real = np.arange(S)[None, :] < np.asarray(d["lengths"])[:, None]
    need = int(text_count(real, d["visual_mask"]).max())  # what the packer rounds up into ModelBatch.text_slots
    assert need == 9 and round_text_slots(need, 8, S) == 16
    q, k, v = qkv(S)
    bad = np.asarray(window_attn(q, k, v, index_of(d, 3, text_slots=need - 1)))
    assert np.isnan(bad[0]).all() and np.isfinite(bad[1]).all()  # row 0 has 9 text tokens, row 1 has 8


# ---------------------------------------------------------------------------------------------------------------
# The work really drops


def _sub_jaxprs(params):
    for p in params.values():
        for x in (p if isinstance(p, (tuple, list)) else (p,)):
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr


def _dot_macs(jaxpr):
    """Multiply-adds of every dot_general in a jaxpr (sub-jaxprs included), and their output shapes."""
    macs, shapes = 0, []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            a = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            macs += int(np.prod(out)) * int(np.prod([a[i] for i in lc]))
            shapes.append(out)
        for sub in _sub_jaxprs(eqn.params):
            m, s_ = _dot_macs(sub)
            macs, shapes = macs + m, shapes + s_
    return macs, shapes


def test_window_flops_drop_as_accounted():
    from uhd_jax.yopo.flops import attention_pairs

    rows_, cols_, text = 24, 32, 20
    s = 2 * rows_ * cols_ + 3 * text
    t_out = rows_ * cols_
    d = make_batch([[text, (0, rows_, cols_), text, (1, rows_, cols_), text]], s, vr=2, t_out=t_out)
    w, tc = 5, 3 * text
    ix = _build(d["visual_mask"], d["visual_index"], d["grid"], d["lengths"], levels=LEVELS,
                out_tokens_per_view=t_out, window=w, text_slots=tc)
    q, k, v = qkv(s, b=1)
    jaxpr = jax.make_jaxpr(va.window_attention)(q, k, v, ix).jaxpr
    macs, shapes = _dot_macs(jaxpr)
    vc = 2 * t_out
    assert not any(sh.count(s) >= 2 or sh.count(vc) >= 2 for sh in shapes)  # no [S, S] / [Vc, Vc] block
    pairs = tc * (tc + vc) + vc * (tc + w * w)  # text q x all keys; visual q x (text + w*w neighbours)
    assert macs == 2 * N * H * pairs  # scores and weighted values
    dense = 2 * N * H * s * s
    acc = attention_pairs([text, (rows_, cols_), text, (rows_, cols_), text], window=w)
    assert macs < 0.1 * dense  # 1596 tokens, 1536 visual: ~6% of the square
    assert pairs < 2.5 * sum(acc.values())  # the accounting counts causal pairs; we compute small rectangles


# ---------------------------------------------------------------------------------------------------------------
# attention_mass, projection columns, errors


@pytest.mark.parametrize("chunk", [7, 64])
def test_attention_mass_matches_dense(chunk):
    d = make_batch(ROWS, S)
    q, k, _ = qkv(S, seed=4)
    vis, txt = jax.jit(va.attention_mass, static_argnames="chunk")(
        q, k, visual_mask=d["visual_mask"], lengths=d["lengths"], chunk=chunk)
    allowed = allowed_mask(d, None, set(range(N)))  # plain causal over real tokens
    p = dense_probs(q, k, allowed)
    ref_vis = np.einsum("bnqk,bk->bn", p, d["visual_mask"].astype(np.float64))
    ref_txt = np.einsum("bnqk,bk->bn", p, (~d["visual_mask"]).astype(np.float64))
    np.testing.assert_allclose(vis + txt, d["lengths"][:, None] * np.ones(N), rtol=1e-5)  # each query sums to 1
    assert np.abs(vis - ref_vis).max() / np.abs(ref_vis).max() <= 1e-5
    assert np.abs(txt - ref_txt).max() / np.abs(ref_txt).max() <= 1e-5


def test_projection_columns_follow_fullattention_layout():
    rs = np.random.RandomState(5)
    d_model, active = 6, (0, 3)
    x = rs.randn(3, d_model)
    for gated in (False, True):
        w = rs.randn(d_model, N * H * (2 if gated else 1))
        full = (x @ w).reshape(3, N, -1)  # FullAttention: per head [query (H), gate (H)] when gated
        part = (x @ w[:, va.q_proj_columns(N, H, active, gated)]).reshape(3, len(active), -1)
        np.testing.assert_array_equal(part, full[:, list(active)])
    wk = rs.randn(d_model, K * H)
    np.testing.assert_array_equal((x @ wk[:, va.kv_proj_columns(N, K, H, (3,))]), (x @ wk).reshape(3, K, H)[:, 1])
    assert va.active_kv_groups(N, K, (0, 1)) == (0,) and va.active_kv_groups(N, K, (1, 2)) == (0, 1)
    o = rs.randn(3, N, H)
    wo = rs.randn(N * H, d_model)
    np.testing.assert_allclose(o[:, list(active)].reshape(3, -1) @ wo[va.o_proj_rows(N, H, active)],
                               np.einsum("bnh,nhd->bd", o[:, list(active)], wo.reshape(N, H, -1)[list(active)]))


def test_errors_name_the_parameter():
    d = make_batch(ROWS, S)
    for bad in (2, 0, -3, 3.0, True):
        with pytest.raises(ValueError, match="window"):
            index_of(d, bad)
    with pytest.raises(ValueError, match="text_slots"):
        index_of(d, 3, text_slots=0)
    with pytest.raises(ValueError, match="active_heads"):
        va.normalize_heads((0, 0), N)
    with pytest.raises(ValueError, match="active_heads"):
        va.normalize_heads((4,), N)
    with pytest.raises(ValueError, match="active_heads"):
        va.normalize_heads(2, N)
    q, k, v = qkv(S)
    with pytest.raises(ValueError, match="window=None"):
        va.window_attention(q, k, v, index_of(d, None))
