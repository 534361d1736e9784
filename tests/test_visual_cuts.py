"""Visual cuts (3) layer drop and (4) FFN slicing in the LLM (uhd_jax/model/visual_cuts.py, text_model.py): the
skipping model against a plain dense implementation written here with the equivalent masks, per row on its real
tokens only; all cuts off leaves the program unchanged; refusals; one compilation per shape."""

import dataclasses
import functools
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
from uhd_jax.model.visual_cuts import Cuts, LayerCuts, load_head_mask, save_head_mask, segments

TOL = 1e-4
CHUNK = ChunkOptions(16)  # several DeltaNet chunks on the full and the compact sequence
S, TEXT_SLOTS = 48, 32
# (kind, length): runs of text and of visual tokens ("images" of different lengths between text), per row
ROWS = ([("t", 5), ("v", 9), ("t", 4), ("v", 12), ("t", 18)],  # 48 real tokens, 27 text
        [("t", 3), ("v", 7), ("t", 6), ("v", 5), ("t", 16)])  # 37 real tokens + 11 padding, 25 text


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.lru_cache(maxsize=None)
def _setup(model_type):
    cfg = tiny_config(text_model=model_type).text
    rng = np.random.default_rng(0)
    mask = np.zeros((2, S), bool)
    vis = np.zeros((2, S), bool)
    for b, runs in enumerate(ROWS):
        o = 0
        for kind, n in runs:
            mask[b, o:o + n] = True
            vis[b, o:o + n] = kind == "v"
            o += n
    ids = rng.integers(0, cfg.vocab_size, (2, S)).astype(np.int32)
    placed = rng.normal(0, 1, (2, S, cfg.hidden_size)).astype(np.float32)
    model = TextModel(cfg, chunk=CHUNK)
    params = jax.jit(lambda k, i, m: model.init(k, i, attention_mask=m))(jax.random.PRNGKey(0), jnp.asarray(ids),
                                                                         jnp.asarray(mask))["params"]
    params = nn.meta.unbox(params)
    # non-trivial norm scales (zero-centered ones start at 0, Qwen3's at 1)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 * jax.random.normal(next(keys), a.shape) if "scale" in str(path[-1]) else a, params)
    return cfg, params, ids, mask, vis, placed


def _apply(cfg, params, ids, mask, vis, placed, cuts, text_slots=TEXT_SLOTS):
    model = TextModel(cfg, chunk=CHUNK, cuts=cuts)
    f = jax.jit(lambda p, i, m, e, v: model.apply({"params": p}, i, attention_mask=m, placed_embeds=e, placed_mask=v,
                                                  text_slots=text_slots))
    return f(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(placed), jnp.asarray(vis))


# --- the dense reference: every token computed, masks say what the cuts leave out ------------------------------

def _rms(x, w, cfg):
    y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)
    return y * (1 + w) if cfg.is_hybrid else y * w


@functools.partial(jax.jit, static_argnums=0)
def _attention(cfg, p, h, positions, keymask):
    """Dense masked GQA over one row: h [L, D], keymask [L(query), L(key)] bool."""
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
    scores = jnp.where(keymask[None], scores, -jnp.inf)
    o = jnp.einsum("nqk,knh->qnh", jax.nn.softmax(scores, -1), v).reshape(L, n * hd)
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


def reference_row(cfg, params, emb, vis, cuts):
    """One row's real tokens: emb [L, D] (visual rows already placed), vis [L] bool -> logits [L, V]."""
    period = layer_period(cfg.layer_types)
    L = emb.shape[0]
    pos = jnp.arange(L)
    text = np.flatnonzero(~vis)
    width = cfg.intermediate_size if cuts.ffn_ratio is None else int(cfg.intermediate_size // cuts.ffn_ratio)
    causal = np.tril(np.ones((L, L), bool))
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
            keymask = causal & ~vis[None, :] if dropped else causal
            y = _attention(cfg, p["self_attn"], h, pos, keymask)
        xn = x + y
        zero_from = np.where(vis & (cuts.ffn_ratio is not None), width, cfg.intermediate_size)
        xn = xn + _mlp(p["mlp"], _rms(xn, p["post_attention_layernorm"]["scale"], cfg), zero_from)
        x = jnp.where((vis & dropped)[:, None], x, xn)  # dropped layers leave visual rows as they were
    h = _rms(x, params["norm"]["scale"], cfg)
    return (h @ params["embed_tokens"].T)[:, :cfg.vocab_size]


CASES = [("qwen3_5_text", Cuts()), ("qwen3_5_text", Cuts(ffn_ratio=2)), ("qwen3_5_text", Cuts(drop_layer=3)),
         ("qwen3_5_text", Cuts(drop_layer=4, ffn_ratio=2)), ("qwen3_5_text", Cuts(drop_layer=0, ffn_ratio=4)),
         ("qwen3", Cuts()), ("qwen3", Cuts(drop_layer=1, ffn_ratio=2))]


@pytest.mark.parametrize("model_type,cuts", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_cuts_match_dense_masked_reference(model_type, cuts):
    """Hybrid drop_layer 3 leaves inside a layer period (mid-block), 4 at a period boundary, 0 before any layer."""
    cfg, params, ids, mask, vis, placed = _setup(model_type)
    logits, out = _apply(cfg, params, ids, mask, vis, placed, cuts)
    emb = np.where(vis[..., None], placed, np.asarray(params["embed_tokens"])[ids])
    errs = []
    for b in range(2):
        n = int(mask[b].sum())
        want = reference_row(cfg, params, jnp.asarray(emb[b, :n]), vis[b, :n], cuts)
        errs.append(rel(logits[b, :n, :cfg.vocab_size], want))
    assert max(errs) < TOL, errs
    for i in range(cfg.num_hidden_layers):
        assert out[f"layer_{i:02d}"].shape == (2, S, cfg.hidden_size)
    if cuts.drop_layer:  # visual rows of dropped layers hold layer L-1's output
        before = out[f"layer_{cuts.drop_layer - 1:02d}"]
        last = out[f"layer_{cfg.num_hidden_layers - 1:02d}"]
        assert np.array_equal(np.asarray(last)[vis], np.asarray(before)[vis])


def test_all_off_program_unchanged():
    """The field at its default (and an explicit Cuts()) lowers to the same program and bitwise equal outputs."""
    cfg, params, ids, mask, vis, placed = _setup("qwen3_5_text")
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(placed), jnp.asarray(vis))
    f = jax.jit(lambda model, p, i, m, e, v: model.apply({"params": p}, i, attention_mask=m, placed_embeds=e,
                                                         placed_mask=v), static_argnums=0)
    models = (TextModel(cfg, chunk=CHUNK), TextModel(cfg, chunk=CHUNK, cuts=Cuts()))
    texts = [f.lower(model, params, *args).as_text() for model in models]
    assert texts[0] == texts[1]
    (a, oa), (b, ob) = (f(model, params, *args) for model in models)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(oa["layer_03"]), np.asarray(ob["layer_03"]))


def test_compiles_once_for_same_shapes_and_left_padding():
    """Two batches of the same shapes, one program; the second has row 1 left-padded (the model rotates rows, the
    visual mask with them) and gives row 1's logits shifted by its padding."""
    cfg, params, ids, mask, vis, placed = _setup("qwen3_5_text")
    model = TextModel(cfg, chunk=CHUNK, cuts=Cuts(drop_layer=3, ffn_ratio=2))
    step = jax.jit(lambda p, i, m, e, v: model.apply({"params": p}, i, attention_mask=m, placed_embeds=e,
                                                     placed_mask=v, text_slots=TEXT_SLOTS)[0])
    pad = S - int(mask[1].sum())
    left = lambda a: np.stack([a[0], np.roll(a[1], pad, axis=0)])
    with count_compilations() as c:
        a = step(params, ids, mask, placed, vis)
        first = c.count
        b = step(params, left(ids), left(mask), left(placed), left(vis))
    assert first >= 1 and c.count == first
    n = S - pad
    assert rel(b[1, pad:, :cfg.vocab_size], a[1, :n, :cfg.vocab_size]) < 1e-6
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_too_many_text_tokens_give_nan_not_truncation():
    cfg, params, ids, mask, vis, placed = _setup("qwen3")
    logits, _ = _apply(cfg, params, ids, mask, vis, placed, Cuts(ffn_ratio=2), text_slots=26)  # row 0 has 27
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1, :, :cfg.vocab_size])).all()
    with pytest.raises(ValueError, match=r"rows \[0\] hold \[27\] text tokens > text_slots=26"):
        check_text_slots(mask, vis, 26)
    assert round_text_slots(27, 128, 48) == 48 and round_text_slots(130, 128, 4096) == 256


def test_refusals():
    cfg, params, ids, mask, vis, placed = _setup("qwen3_5_text")
    run = lambda cuts, **kw: TextModel(cfg, cuts=cuts).apply({"params": params}, jnp.asarray(ids),
                                                             attention_mask=jnp.asarray(mask), **kw)
    with pytest.raises(ValueError, match="batch.text_slots"):
        run(Cuts(ffn_ratio=2))
    with pytest.raises(NotImplementedError, match="window"):
        run(Cuts(window=5), text_slots=TEXT_SLOTS)
    heads = (None,) * 3 + ((0, 2),) + (None,) * 4
    with pytest.raises(NotImplementedError, match="heads"):
        run(Cuts(heads=heads), text_slots=TEXT_SLOTS)
    with pytest.raises(ValueError, match=r"heads\[3\] = 2 is a head count"):
        run(Cuts(heads=(None,) * 3 + (2,) + (None,) * 4), text_slots=TEXT_SLOTS)
    with pytest.raises(NotImplementedError, match="packed rows"):
        run(Cuts(drop_layer=2), text_slots=TEXT_SLOTS, segment_ids=jnp.asarray(mask, jnp.int32))
    # prefill / decode with a cache (MiniCPMV passes its field down; refused before any parameter is read)
    full = tiny_config()
    z = np.zeros((2, 4), np.int32)
    batch = ModelBatch(input_ids=z, attention_mask=z == 0, positions=z, visual_index=z, visual_mask=z > 0,
                       loss_mask=z > 0, text_slots=4)
    cache = types.SimpleNamespace(layers={}, lengths=jnp.zeros((2,), jnp.int32), empty=True)
    m = MiniCPMV(full, cuts=Cuts(drop_layer=4))
    with pytest.raises(NotImplementedError, match="visual cuts with a KV cache are not implemented yet"):
        m.apply({"params": {}}, batch, cache, method="prefill")
    with pytest.raises(NotImplementedError, match="drop_layer"):
        m.apply({"params": {}}, jnp.zeros((2,), jnp.int32), cache, method="decode_step")


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
