"""Visual cuts (1) window, (2) heads, (3) layer drop and (4) FFN slicing in the LLM (uhd_jax/model/visual_cuts.py,
visual_attention.py, text_model.py): the skipping model against a plain dense implementation written here with the
equivalent masks (the window from each visual token's view / row / col, computed here from the processor's view
shapes), per row on its real tokens only; real view grids from the Processor + Packer; all cuts off leaves the
program unchanged; no [S, S] scores for visual queries; refusals; one compilation per shape."""

import dataclasses
import functools
import tempfile
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.compile_counter import count_compilations
from uhd_jax.config import tiny_config
from uhd_jax.data.batch import ModelBatch, check_text_slots, round_text_slots
from uhd_jax.model.gated_deltanet import ChunkOptions, GatedDeltaNet
from uhd_jax.model.minicpmv import MiniCPMV
from uhd_jax.model.text_layers import apply_rope, rope_cos_sin
from uhd_jax.model.text_model import TextModel, layer_period
from uhd_jax.model.visual_cuts import Cuts, LayerCuts, VisualLayout, load_head_mask, save_head_mask, segments

TOL = 1e-4
CHUNK = ChunkOptions(16)  # several DeltaNet chunks on the full and the compact sequence
S = 120  # sequence bucket (rows of 119 and 115 real tokens); not a multiple of anything the jaxpr check could confuse
PATCH, UNIT = 14, 2  # 4x mode: 2 x 2 patches per visual token
HYBRID_HEADS = (None,) * 3 + ((0, 2),) + (None,) * 3 + ((3,),)  # ragged groups; layer 7: one KV group only
DENSE_HEADS = ((1,), (0, 1, 3), (), (2,))  # layer 2: no head sees visual tokens


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def packed_chats(generation_prompt: bool):
    """(samples, packed batch): two chats with images of different sizes through the real Processor + Packer (4x
    mode, small slices), each ending with an assistant answer, or with the generation prompt (generation tests)."""
    from tests.data_utils import make_model_dir, random_image
    from uhd_jax.data.packer import Packer, PackerConfig
    from uhd_jax.data.processor import Processor

    with tempfile.TemporaryDirectory() as d:
        base = Processor.from_pretrained(make_model_dir(d + "/model"))
    p = Processor(base.tokenizer, base.slice_config.replace(downsample_mode="4x", max_slice_nums=4,
                                                            scale_resolution=112), base.tokens)

    def chat(images, q):
        parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": q}]
        user = {"role": "user", "content": parts}
        if generation_prompt:
            return p.encode_chat([user], add_generation_prompt=True)
        return p.encode_chat([user, {"role": "assistant", "content": "A cat."}])

    samples = [chat([random_image(20, 30, 1), random_image(300, 140, 2)], "What is it?"),
               chat([random_image(60, 500, 3)], "Describe.")]
    return samples, Packer(p, PackerConfig(batch_size=2, seq_buckets=(S,), tokens_per_view=72, views_per_row=5,
                                           text_slot_multiple=16)).pack(samples)


@functools.lru_cache(maxsize=None)
def _layout():
    """`packed_chats` with answers: views of 3x5, 6x3, 1x11 and 3x6 output tokens, text between and after them.
    Returns the batch arrays and, per visual position, its view / row / col computed here from the views' pixel
    shapes."""
    samples, b = packed_chats(generation_prompt=False)
    vis = np.asarray(b.visual_mask, bool)
    view, row, col = (np.full((2, S), -1) for _ in range(3))
    for r, smp in enumerate(samples):
        pos = np.flatnonzero(vis[r])
        k = [(i, t // (v.shape[2] // PATCH // UNIT), t % (v.shape[2] // PATCH // UNIT))
             for i, v in enumerate(smp.views) for t in range((v.shape[1] // PATCH // UNIT) * (v.shape[2] // PATCH // UNIT))]
        assert len(k) == len(pos)
        view[r, pos], row[r, pos], col[r, pos] = np.array(k).T
    return dict(ids=np.asarray(b.input_ids), mask=np.asarray(b.attention_mask, bool), vis=vis,
                vindex=np.asarray(b.visual_index, np.int32), grid=np.asarray(b.vision.grid, np.int32),
                levels=b.vision.levels, t_out=b.vision.out_tokens_per_view, text_slots=b.text_slots, view=view,
                row=row, col=col)


@functools.lru_cache(maxsize=None)
def _setup(model_type):
    cfg = tiny_config(text_model=model_type).text
    d = _layout()
    rng = np.random.default_rng(0)
    ids = np.where(d["vis"], 0, d["ids"] % cfg.vocab_size).astype(np.int32)
    placed = rng.normal(0, 1, (2, S, cfg.hidden_size)).astype(np.float32)
    model = TextModel(cfg, chunk=CHUNK)
    params = jax.jit(lambda k, i, m: model.init(k, i, attention_mask=m))(jax.random.PRNGKey(0), jnp.asarray(ids),
                                                                         jnp.asarray(d["mask"]))["params"]
    params = nn.meta.unbox(params)
    # non-trivial norm scales (zero-centered ones start at 0, Qwen3's at 1)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 * jax.random.normal(next(keys), a.shape) if "scale" in str(path[-1]) else a, params)
    return cfg, params, ids, placed, d


@functools.lru_cache(maxsize=None)
def _step(model_type, cuts, text_slots):
    """One jitted forward per (model, cuts, text_slots), shared by the tests (compiled once)."""
    cfg = tiny_config(text_model=model_type).text
    d = _layout()
    model = TextModel(cfg, chunk=CHUNK, cuts=cuts)

    def f(p, i, m, e, v, vindex, grid):
        return model.apply({"params": p}, i, attention_mask=m, placed_embeds=e, placed_mask=v, text_slots=text_slots,
                           visual_layout=VisualLayout(vindex, grid, d["levels"], d["t_out"]))
    return jax.jit(f)


def _args(params, ids, placed, d):
    return params, ids, d["mask"], placed, d["vis"], d["vindex"], d["grid"]


def _apply(model_type, cuts, text_slots=None):
    cfg, params, ids, placed, d = _setup(model_type)
    return _step(model_type, cuts, text_slots or d["text_slots"])(*_args(params, ids, placed, d))


# --- the dense reference: every token computed, masks say what the cuts leave out ------------------------------

def _rms(x, w, cfg):
    y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)
    return y * (1 + w) if cfg.is_hybrid else y * w


@functools.partial(jax.jit, static_argnums=0)
def _attention(cfg, p, h, positions, keymask):
    """Dense masked GQA over one row: h [L, D], keymask [N, L(query), L(key)] bool; a query with no allowed key in a
    head gets output 0 there (before the gate and o_proj)."""
    n, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L = h.shape[0]
    q = h @ p["q_proj"]["kernel"]
    if cfg.attn_output_gate:
        q = q.reshape(L, n, 2 * hd)
        q, gate = q[..., :hd], q[..., hd:].reshape(L, n * hd)
    else:
        q = q.reshape(L, n, hd)
    k = (h @ p["k_proj"]["kernel"]).reshape(L, kh, hd)
    v = (h @ p["v_proj"]["kernel"]).reshape(L, kh, hd)
    q, k = _rms(q, p["q_norm"]["scale"], cfg), _rms(k, p["k_norm"]["scale"], cfg)
    cos, sin = rope_cos_sin(positions[None], cfg.rotary_dim, cfg.rope_theta)
    q, k = apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0]
    k, v = jnp.repeat(k, n // kh, axis=1), jnp.repeat(v, n // kh, axis=1)  # query head j uses kv head j // (n/kh)
    scores = jnp.einsum("qnh,knh->nqk", q, k) / np.sqrt(hd)
    scores = jnp.where(keymask, scores, -jnp.inf)
    probs = jnp.where(keymask.any(-1, keepdims=True), jax.nn.softmax(scores, -1), 0)
    o = jnp.einsum("nqk,knh->qnh", probs, v).reshape(L, n * hd)
    if cfg.attn_output_gate:
        o = o * jax.nn.sigmoid(gate)
    return o @ p["o_proj"]["kernel"]


@jax.jit
def _mlp(p, h, zero_from):
    """Dense SwiGLU; neurons >= zero_from[t] are zeroed on row t."""
    act = jax.nn.silu(h @ p["gate_proj"]["kernel"]) * (h @ p["up_proj"]["kernel"])
    act = jnp.where(jnp.arange(act.shape[-1])[None] < zero_from[:, None], act, 0)
    return act @ p["down_proj"]["kernel"]


@functools.partial(jax.jit, static_argnums=0)
def _deltanet(cfg, p, h):
    """The model's DeltaNet module (tested against transformers) on one unpadded sequence h [L, D]."""
    return GatedDeltaNet(cfg, chunk=CHUNK).apply({"params": p}, h[None])[0][0]


def keymask(cfg, cuts, i, vis, view, row, col):
    """[N, L, L] allowed (query, key) pairs of full-attention layer i, from the definitions (brute force)."""
    n, L = cfg.num_attention_heads, len(vis)
    causal = np.tril(np.ones((L, L), bool))
    if cuts.drop_layer is not None and i >= cuts.drop_layer:  # no query sees a visual token
        return np.broadcast_to(causal & ~vis[None, :], (n, L, L))
    active = set(range(n)) if cuts.heads is None or cuts.heads[i] is None else set(cuts.heads[i])
    vq = causal  # what a visual query sees in an active head
    if cuts.window is not None:
        r = cuts.window // 2
        near = (view[:, None] == view[None, :]) & (np.abs(row[:, None] - row[None, :]) <= r) & \
            (np.abs(col[:, None] - col[None, :]) <= r)
        vq = (~vis[None, :] & (np.arange(L)[None, :] < np.arange(L)[:, None])) | (vis[None, :] & near)
    out = np.zeros((n, L, L), bool)
    for h in range(n):
        text_q = causal & ((h in active) | ~vis[None, :])
        vis_q = vq if h in active else np.zeros((L, L), bool)
        out[h] = np.where(vis[:, None], vis_q, text_q)
    return out


def reference_row(cfg, params, emb, vis, view, row, col, cuts):
    """One row's real tokens: emb [L, D] (visual rows already placed), vis [L] bool, view/row/col [L] of each
    visual token -> logits [L, V]."""
    period = layer_period(cfg.layer_types)
    L = emb.shape[0]
    pos = jnp.arange(L)
    text = np.flatnonzero(~vis)
    width = cfg.intermediate_size if cuts.ffn_ratio is None else int(cfg.intermediate_size // cuts.ffn_ratio)
    x = emb
    for i, t in enumerate(cfg.layer_types):
        p = jax.tree.map(lambda a: a[i // period], params["layers"])[f"layer_{i % period}"]
        dropped = cuts.drop_layer is not None and i >= cuts.drop_layer
        h = _rms(x, p["input_layernorm"]["scale"], cfg)
        if t == "linear_attention":
            if dropped:  # the recurrence and conv see the text tokens only (text after an image follows the text before)
                y = jnp.zeros_like(h).at[text].set(_deltanet(cfg, p["linear_attn"], h[text]))
            else:
                y = _deltanet(cfg, p["linear_attn"], h)
        else:
            y = _attention(cfg, p["self_attn"], h, pos, keymask(cfg, cuts, i, vis, view, row, col))
        xn = x + y
        zero_from = np.where(vis & (cuts.ffn_ratio is not None), width, cfg.intermediate_size)
        xn = xn + _mlp(p["mlp"], _rms(xn, p["post_attention_layernorm"]["scale"], cfg), zero_from)
        x = jnp.where((vis & dropped)[:, None], x, xn)  # dropped layers leave visual rows as they were
    h = _rms(x, params["norm"]["scale"], cfg)
    return (h @ params["embed_tokens"].T)[:, :cfg.vocab_size]


# hybrid: visual tokens leave inside a layer period (layer 6), after the windowed / head-cut layer 3 (layer 7 is
# dropped: its head entry does not apply); dense: they leave at a period boundary (period 1)
ALL_HYBRID = Cuts(window=3, heads=HYBRID_HEADS, drop_layer=6, ffn_ratio=2)
ALL_DENSE = Cuts(window=3, heads=DENSE_HEADS, drop_layer=3, ffn_ratio=2)
CASES = [("qwen3_5_text", Cuts()), ("qwen3_5_text", Cuts(window=3)), ("qwen3_5_text", Cuts(heads=HYBRID_HEADS)), ("qwen3_5_text", ALL_HYBRID),
         ("qwen3", Cuts()), ("qwen3", Cuts(window=3)), ("qwen3", Cuts(heads=DENSE_HEADS)), ("qwen3", ALL_DENSE)]


@pytest.mark.parametrize("model_type,cuts", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_cuts_match_dense_masked_reference(model_type, cuts):
    cfg, params, ids, placed, d = _setup(model_type)
    logits, out = _apply(model_type, cuts)
    mask, vis = d["mask"], d["vis"]
    emb = np.where(vis[..., None], placed, np.asarray(params["embed_tokens"])[ids])
    errs = []
    for b in range(2):
        n = int(mask[b].sum())
        want = reference_row(cfg, params, jnp.asarray(emb[b, :n]), vis[b, :n], d["view"][b, :n], d["row"][b, :n],
                             d["col"][b, :n], cuts)
        errs.append(rel(logits[b, :n, :cfg.vocab_size], want))
    assert max(errs) < TOL, errs
    if cuts.any:  # the cuts change the answer (so the comparison above can fail)
        plain, _ = _apply(model_type, Cuts())
        assert min(rel(logits[b, :int(mask[b].sum())], plain[b, :int(mask[b].sum())]) for b in range(2)) > 1e-3
    for i in range(cfg.num_hidden_layers):
        assert out[f"layer_{i:02d}"].shape == (2, S, cfg.hidden_size)
    if cuts.drop_layer:  # visual rows of dropped layers hold layer L-1's output
        before = out[f"layer_{cuts.drop_layer - 1:02d}"]
        last = out[f"layer_{cfg.num_hidden_layers - 1:02d}"]
        assert np.array_equal(np.asarray(last)[vis], np.asarray(before)[vis])


def test_all_off_program_unchanged():
    """The field at its default and an explicit Cuts() lower to the same program (hence bitwise equal outputs)."""
    cfg, params, ids, placed, d = _setup("qwen3_5_text")
    args = (jnp.asarray(ids), jnp.asarray(d["mask"]), jnp.asarray(placed), jnp.asarray(d["vis"]))
    f = jax.jit(lambda model, p, i, m, e, v: model.apply({"params": p}, i, attention_mask=m, placed_embeds=e,
                                                         placed_mask=v), static_argnums=0)
    models = (TextModel(cfg, chunk=CHUNK), TextModel(cfg, chunk=CHUNK, cuts=Cuts()))
    texts = [f.lower(model, params, *args).as_text() for model in models]
    assert texts[0] == texts[1]


def _dot_shapes(jaxpr):
    """Output shapes of every dot_general in a jaxpr, sub-jaxprs (scan bodies, ...) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for p in eqn.params.values():
            for x in (p if isinstance(p, (tuple, list)) else (p,)):
                sub = x if hasattr(x, "eqns") else getattr(x, "jaxpr", None)
                if hasattr(sub, "eqns"):
                    shapes += _dot_shapes(sub)
    return shapes


def test_window_heads_program_builds_no_square_scores():
    """With the window and head cuts on every layer (dense LLM), no dot product has two sequence-long axes
    ([S, S] scores) nor two visual-slot axes ([Vc, Vc]); the plain program does (the check can fail)."""
    cfg, params, ids, placed, d = _setup("qwen3")
    vc = d["grid"].shape[1] * d["t_out"]
    heads = ((0, 3), (1,), (0, 1, 2, 3), (2,))
    square = lambda shapes: [sh for sh in shapes if sh.count(S) >= 2 or sh.count(vc) >= 2]
    for cuts, want_square in [(Cuts(window=3, heads=heads), False), (Cuts(window=5), False), (Cuts(), True)]:
        model = TextModel(cfg, chunk=CHUNK, cuts=cuts)
        g = lambda p, i, m, e, v, vi, gr: model.apply(
            {"params": p}, i, attention_mask=m, placed_embeds=e, placed_mask=v, text_slots=d["text_slots"],
            visual_layout=VisualLayout(vi, gr, d["levels"], d["t_out"]))
        shapes = _dot_shapes(jax.make_jaxpr(g)(*_args(params, ids, placed, d)).jaxpr)
        assert bool(square(shapes)) == want_square, (cuts, square(shapes))
        if cuts.heads is not None:  # layer 1: the visual rows' q and k / v projections of one head / KV group
            assert (2, vc, cfg.head_dim) in shapes


def test_compiles_once_for_same_shapes_and_left_padding():
    """Two batches of the same shapes, one program (all four cuts, shared with the reference test); the second
    has row 1 left-padded (the model rotates rows, the visual mask and visual index with them) and gives row 1's
    logits shifted by its padding."""
    cfg, params, ids, placed, d = _setup("qwen3_5_text")
    step = _step("qwen3_5_text", ALL_HYBRID, d["text_slots"])
    pad = S - int(d["mask"][1].sum())
    left = lambda a: np.stack([a[0], np.roll(a[1], pad, axis=0)])
    a = step(*_args(params, ids, placed, d))[0]
    d2 = dict(d, mask=left(d["mask"]), vis=left(d["vis"]), vindex=left(d["vindex"]))
    with count_compilations() as c:
        a = step(*_args(params, ids, placed, d))[0]
        b = step(*_args(params, left(ids), left(placed), d2))[0]
    assert c.count == 0
    n = S - pad
    assert pad > 0 and rel(b[1, pad:, :cfg.vocab_size], a[1, :n, :cfg.vocab_size]) < 1e-6
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_too_many_text_tokens_give_nan_not_truncation():
    """Row 0 with 8 visual positions turned into text holds more text tokens than text_slots (same shapes: the
    program of the reference test)."""
    cfg, params, ids, placed, d = _setup("qwen3")
    ts = d["text_slots"]
    vis = d["vis"].copy()
    vis[0, np.flatnonzero(vis[0])[:8]] = False
    n_text = (d["mask"] & ~vis).sum(1)
    assert n_text[0] > ts >= n_text[1]
    logits, _ = _step("qwen3", ALL_DENSE, ts)(*_args(params, ids, placed, dict(d, vis=vis)))
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1, :, :cfg.vocab_size])).all()
    with pytest.raises(ValueError, match=rf"rows \[0\] hold \[{n_text[0]}\] text tokens > text_slots={ts}"):
        check_text_slots(d["mask"], vis, ts)
    assert round_text_slots(27, 128, 48) == 48 and round_text_slots(130, 128, 4096) == 256


def test_refusals():
    cfg, params, ids, placed, d = _setup("qwen3_5_text")
    run = lambda cuts, **kw: TextModel(cfg, cuts=cuts).apply({"params": params}, jnp.asarray(ids),
                                                             attention_mask=jnp.asarray(d["mask"]), **kw)
    ts = d["text_slots"]
    with pytest.raises(ValueError, match="batch.text_slots"):
        run(Cuts(ffn_ratio=2))
    with pytest.raises(ValueError, match="need visual_layout"):
        run(Cuts(window=5), text_slots=ts, placed_embeds=jnp.asarray(placed), placed_mask=jnp.asarray(d["vis"]))
    with pytest.raises(ValueError, match=r"heads\[3\] = 2 is a head count"):
        run(Cuts(heads=(None,) * 3 + (2,) + (None,) * 4), text_slots=ts)
    with pytest.raises(NotImplementedError, match="packed rows"):
        run(Cuts(drop_layer=2), text_slots=ts, segment_ids=jnp.asarray(d["mask"], jnp.int32))
    with pytest.raises(NotImplementedError, match=r"\['heads'\] with packed rows"):
        run(Cuts(heads=HYBRID_HEADS), text_slots=ts, segment_ids=jnp.asarray(d["mask"], jnp.int32))
    # a cache (MiniCPMV passes its field down; refused before any parameter is read): continued prefill with cuts,
    # and decode from a cache not prefilled with them (generation with cuts: tests/test_visual_cuts_cache.py)
    full = tiny_config()
    z = np.zeros((2, 4), np.int32)
    batch = ModelBatch(input_ids=z, attention_mask=z == 0, positions=z, visual_index=z, visual_mask=z > 0,
                       loss_mask=z > 0, text_slots=4)
    cache = types.SimpleNamespace(layers={}, lengths=jnp.zeros((2,), jnp.int32), empty=False)
    m = MiniCPMV(full, cuts=Cuts(drop_layer=4))
    with pytest.raises(NotImplementedError, match="continued prefill .* with visual cuts"):
        m.apply({"params": {}}, batch, cache, method="prefill")
    with pytest.raises(ValueError, match="drop_layer"):
        m.apply({"params": {}}, jnp.zeros((2,), jnp.int32), cache, method="decode_step")
    with pytest.raises(NotImplementedError, match="window"):
        MiniCPMV(full, cuts=Cuts(window=3)).apply({"params": {}}, batch, cache, method="prefill")


def test_plan_segments_and_head_mask(tmp_path):
    cfg = tiny_config().text  # 8 layers, period 4 (3 DeltaNet + 1 full attention)
    segs = segments(cfg, Cuts(drop_layer=3, ffn_ratio=2), 4)
    assert [(s.start, s.stop, s.enter_drop) for s in segs] == [(0, 1, 3), (1, 2, None)]
    assert segs[0].layers[0] == LayerCuts(None, 64, False, None) and segs[0].layers[3] == LayerCuts(None, 128, True,
                                                                                                   None)
    dense = dataclasses.replace(tiny_config(text_model="qwen3").text)
    assert [(s.start, s.stop, s.enter_drop) for s in segments(dense, Cuts(drop_layer=1, ffn_ratio=2), 1)] == \
        [(0, 1, None), (1, 2, 0), (2, 4, None)]
    assert [(s.start, s.stop) for s in segments(dense, Cuts(ffn_ratio=2), 1)] == [(0, 4)]
    mask = np.ones((8, 4), bool)
    mask[3] = [True, False, True, False]
    mask[7] = [False, False, False, True]
    mask[1] = False  # layer 1 is DeltaNet: ignored
    save_head_mask(tmp_path / "m.npz", mask)
    loaded = load_head_mask(tmp_path / "m.npz")
    assert loaded.dtype == np.bool_ and np.array_equal(loaded, mask)
    cuts = Cuts.from_head_mask(loaded, cfg, first_layer=2)
    assert cuts.heads == (None, None, None, (0, 2), None, None, None, (3,))
    assert Cuts.from_head_mask(loaded, cfg, first_layer=4).heads[3] is None
    save_head_mask(tmp_path / "c.npz", cuts, cfg)
    assert Cuts.from_head_mask(load_head_mask(tmp_path / "c.npz"), cfg).heads == cuts.heads
    assert hash(Cuts(heads=[None, [1, 2]])) == hash(Cuts(heads=(None, (1, 2))))
