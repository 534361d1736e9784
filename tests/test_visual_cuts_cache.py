"""Generation with the visual cuts: a prefill with cuts into an empty cache, then decode steps, against the no-cache
cut forward over prompt + the decoded tokens (itself tested against a dense masked reference in
tests/test_visual_cuts.py). Prompts with images from the real Processor + Packer (the batch of
tests/test_visual_cuts.py: two rows of different lengths, right padding); decode through the scanned stack and
through the unstacked per-block parameters; the Generator's greedy tokens; the cache of a model without cuts
unchanged; continued prefill with cuts refused."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_visual_cuts import (ALL_DENSE, ALL_HYBRID, CHUNK, DENSE_HEADS, HYBRID_HEADS, S, _layout, _setup,
                                    packed_chats, rel)
from uhd_jax.compile_counter import count_compilations
from uhd_jax.config import tiny_config
from uhd_jax.data.batch import ModelBatch
from uhd_jax.infer.beam_generate import BeamGenerator
from uhd_jax.infer.cache import DecodeCache, init_cache
from uhd_jax.infer.engine import Generator
from uhd_jax.model.minicpmv import MiniCPMV, _text_cache
from uhd_jax.model.text_model import TextModel, unstack_layers
from uhd_jax.model.visual_cuts import Cuts, VisualLayout

TOL = 1e-4
NEW = 4  # decoded tokens
CAP = S + 8  # cache capacity
S_REF = S + 8  # the reference sequence: prompt + NEW tokens fit every row
HEADS = {"qwen3_5_text": HYBRID_HEADS, "qwen3": DENSE_HEADS}
ALL = {"qwen3_5_text": ALL_HYBRID, "qwen3": ALL_DENSE}


def _pad(a, n, value=0):
    return np.concatenate([a, np.full((a.shape[0], n) + a.shape[2:], value, a.dtype)], axis=1)


@functools.lru_cache(maxsize=None)
def _fns(model_type, cuts):
    cfg = tiny_config(text_model=model_type).text
    d = _layout()
    model = TextModel(cfg, chunk=CHUNK, cuts=cuts)
    lay = lambda vi, g: VisualLayout(vi, g, d["levels"], d["t_out"])

    @jax.jit
    def forward(p, i, m, e, v, vi, g):  # the no-cache cut forward (tested in test_visual_cuts.py)
        return model.apply({"params": p}, i, attention_mask=m, placed_embeds=e, placed_mask=v,
                           text_slots=d["text_slots"] + 16, visual_layout=lay(vi, g))[0]

    @jax.jit
    def prefill(p, i, m, e, v, vi, g, cache):
        logits, out = model.apply({"params": p}, i, attention_mask=m, placed_embeds=e, placed_mask=v,
                                  text_slots=d["text_slots"], visual_layout=lay(vi, g), cache=cache,
                                  cache_empty=True, last_logits_only=True)
        return logits[:, 0], out["cache"]

    @jax.jit
    def decode(p, tok, cache):
        logits, out = model.apply({"params": p}, tok[:, None], cache=cache, decode=True)
        return logits[:, 0], out["cache"]
    return forward, prefill, decode


def _check(model_type, cuts):
    """Errors of the prefill's last logits and of each decode step's, for the scanned and the unstacked decode."""
    cfg, params, ids, placed, d = _setup(model_type)
    forward, prefill, decode = _fns(model_type, cuts)
    n = d["mask"].sum(1)
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, NEW)).astype(np.int32)
    # the reference: prompt + the NEW tokens right after each row's real tokens, one forward without a cache
    ext = S_REF - S
    rids, rmask, rvis = _pad(ids, ext), _pad(d["mask"], ext, False), _pad(d["vis"], ext, False)
    for b in range(2):
        rids[b, n[b]:n[b] + NEW] = toks[b]
        rmask[b, n[b]:n[b] + NEW] = True
    ref = forward(params, rids, rmask, _pad(placed, ext), rvis, _pad(d["vindex"], ext), d["grid"])
    ref = np.asarray(ref[..., :cfg.vocab_size])
    cache0 = _text_cache(init_cache(cfg, 2, CAP, jnp.float32, cuts=cuts))
    logits, cache0 = prefill(params, ids, d["mask"], placed, d["vis"], d["vindex"], d["grid"], cache0)
    errs = {"prefill": rel(logits[:, :cfg.vocab_size], ref[np.arange(2), n - 1])}
    if cuts.drop_layer is not None:
        assert np.array_equal(cache0["text_lengths"], (d["mask"] & ~d["vis"]).sum(1))
    if cuts.heads is not None:
        assert np.array_equal(cache0["visual"][:, :S], d["vis"]) and not cache0["visual"][:, S:].any()
    for name, p in (("scan", params), ("unstacked", unstack_layers(params))):
        cache = cache0
        for i in range(NEW):
            logits, cache = decode(p, toks[:, i], cache)
            errs[f"{name}_{i}"] = rel(logits[:, :cfg.vocab_size], ref[np.arange(2), n + i])
        assert np.array_equal(cache["lengths"], n + NEW)
        if cuts.drop_layer is not None:
            assert np.array_equal(cache["text_lengths"], cache0["text_lengths"] + NEW)
    return errs


@pytest.mark.parametrize("model_type,which", [("qwen3_5_text", "all"), ("qwen3", "all"), ("qwen3", "drop"),
                                              ("qwen3", "heads")])
def test_decode_after_cut_prefill_matches_no_cache_forward(model_type, which):
    """Prefill (with images, two rows of different lengths) + NEW teacher-forced decode steps (scanned stack and
    unstacked per-block parameters): each step's logits are the no-cache cut forward's at the same position. The
    hybrid drops at layer 6, inside a block (DeltaNet and full attention layers dropped); the dense model's head
    cut has a layer where no head sees visual tokens; drop alone: layers before it with the plain attention."""
    cuts = {"all": ALL[model_type], "drop": Cuts(drop_layer=ALL[model_type].drop_layer),
            "heads": Cuts(heads=HEADS[model_type])}[which]
    errs = _check(model_type, cuts)
    print(model_type, which, {k: "%.1e" % e for k, e in errs.items()})
    assert max(errs.values()) <= TOL, errs


def test_text_slot_overflow_is_nan_and_overflowed_not_garbage():
    """Row 0 with 8 visual positions turned into text holds more text tokens than text_slots (the dense all-cuts
    programs of the test above, same shapes): its prefill and decode logits are NaN, the cache marks it
    overflowed; row 1 is unaffected."""
    cfg, params, ids, placed, d = _setup("qwen3")
    _, prefill, decode = _fns("qwen3", ALL_DENSE)
    vis = d["vis"].copy()
    vis[0, np.flatnonzero(vis[0])[:8]] = False
    assert ((d["mask"] & ~vis).sum(1) > d["text_slots"]).tolist() == [True, False]
    cache = init_cache(cfg, 2, CAP, jnp.float32, cuts=ALL_DENSE)
    logits, c = prefill(params, ids, d["mask"], placed, vis, d["vindex"], d["grid"], _text_cache(cache))
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1, :cfg.vocab_size])).all()
    assert np.asarray(cache.replace(text_lengths=c["text_lengths"]).overflowed).tolist() == [True, False]
    for i in range(2):
        logits, c = decode(params, jnp.array([1, 2], jnp.int32), c)
        assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1, :cfg.vocab_size])).all()


# --- Generator: MiniCPMV with the vision encoder ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _mini():
    cfg = tiny_config()
    batch = _vision_batch()  # the test tokenizer's ids mapped into the tiny vocabulary, placeholders kept
    ids = np.where(np.asarray(batch.visual_mask, bool), cfg.image_token_id,
                   np.asarray(batch.input_ids) % 400).astype(np.int32)
    batch = dataclasses.replace(batch, input_ids=ids)
    model = MiniCPMV(cfg, chunk=CHUNK, attention_impl="xla", cuts=ALL_HYBRID)
    params = jax.jit(lambda k: MiniCPMV(cfg, chunk=CHUNK).init(k, batch))(jax.random.PRNGKey(2))["params"]
    return cfg, model, params, batch


@functools.lru_cache(maxsize=None)
def _vision_batch() -> ModelBatch:
    """The two chats of test_visual_cuts ending with the generation prompt, packed with their vision arrays."""
    return packed_chats(generation_prompt=True)[1]


def test_generator_with_cuts_greedy_matches_no_cache_forward():
    """Generator.generate with a cut model: the greedy tokens are the argmax of the no-cache cut forward over
    prompt + generated tokens at every generated position; one compilation for two calls of the same shapes;
    beam search with one beam gives the same tokens."""
    cfg, model, params, batch = _mini()
    gen = Generator(model)
    new = 5
    out = gen.generate(params, batch, max_new_tokens=new, capacity=S + new)
    with count_compilations() as c:
        again = gen.generate(params, batch, max_new_tokens=new, capacity=S + new)
    assert c.count == 0
    assert np.array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
    assert out.cache.text_lengths is not None and out.cache.visual is not None
    n = np.asarray(batch.attention_mask).sum(1)
    ext = new
    ids, mask = _pad(np.asarray(batch.input_ids), ext), _pad(np.asarray(batch.attention_mask, bool), ext, False)
    toks = np.asarray(out.tokens)
    for b in range(2):
        ids[b, n[b]:n[b] + new] = toks[b]
        mask[b, n[b]:n[b] + new] = True
    full = dataclasses.replace(batch, input_ids=ids, attention_mask=mask,
                               positions=_pad(np.asarray(batch.positions), ext),
                               visual_index=_pad(np.asarray(batch.visual_index), ext),
                               visual_mask=_pad(np.asarray(batch.visual_mask, bool), ext, False),
                               loss_mask=_pad(np.asarray(batch.loss_mask, bool), ext, False),
                               text_slots=batch.text_slots + 16)
    for b in range(2):
        full.positions[b, n[b]:n[b] + new] = np.arange(n[b], n[b] + new)
    logits = np.asarray(jax.jit(lambda p, bt: model.apply({"params": p}, bt)[0])(params, full))[..., :cfg.text.vocab_size]
    for b in range(2):
        want = logits[b, n[b] - 1:n[b] + new - 1].argmax(-1)
        assert np.array_equal(toks[b], want), (b, toks[b], want)
    # beam search with one beam is greedy (prefill with cuts, then DecodeCache.take and decode steps)
    beams = BeamGenerator(model, num_beams=1).generate(params, batch, max_new_tokens=new, capacity=S + new)
    assert all(np.array_equal(beams.tokens[b], toks[b]) for b in range(2))


def test_no_cut_cache_unchanged_and_continued_prefill_refused():
    cfg = tiny_config()
    c = init_cache(cfg, 2, 16, jnp.float32)
    assert c.visual is None and c.text_lengths is None
    assert [f.name for f in dataclasses.fields(DecodeCache)][:4] == ["layers", "lengths", "capacity", "empty"]
    assert jax.tree.structure(c) == jax.tree.structure(c.reset()) == jax.tree.structure(c.take([1]))
    assert len(jax.tree.leaves(c)) == len(jax.tree.leaves(c.layers)) + 1  # layers + lengths, nothing new
    # the text model's cache dict of a model without cuts: exactly {"layers", "lengths"}
    assert set(_text_cache(c)) == {"layers", "lengths"}
    with_cuts = init_cache(cfg, 2, 16, jnp.float32, cuts=ALL_HYBRID)
    assert with_cuts.visual.shape == (2, 16) and with_cuts.text_lengths.shape == (2,)
    with pytest.raises(ValueError, match="other visual cuts"):
        with_cuts.insert(c.take([0]), [1])
    # continued prefill with cuts: refused before anything runs (no parameter read)
    z = np.zeros((2, 4), np.int32)
    batch = ModelBatch(input_ids=z, attention_mask=z == 0, positions=z, visual_index=z, visual_mask=z > 0,
                       loss_mask=z > 0, text_slots=4)
    m = MiniCPMV(cfg, cuts=Cuts(drop_layer=4))
    with pytest.raises(NotImplementedError, match="continued prefill"):
        m.apply({"params": {}}, batch, with_cuts.replace(empty=False), method="prefill")
    with pytest.raises(ValueError, match="'text_lengths' entry is missing"):
        m.apply({"params": {}}, jnp.zeros((2,), jnp.int32), c, method="decode_step")
