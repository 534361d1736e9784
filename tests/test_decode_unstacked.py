"""The decode step over per-block parameters (`unstack_layers`, what the engines' decode loops use) computes what
the scanned step computes, and a row that takes no token (active False) keeps every cache entry exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.config import tiny_config
from uhd_jax.model.gated_deltanet import ChunkOptions
from uhd_jax.model.text_model import UNSTACKED, TextModel, init_cache, stack_cache, unstack_cache, unstack_layers


def _setup(model_type):
    cfg = tiny_config(text_model=model_type).text
    if model_type == "qwen3_5_text":
        cfg = dataclasses.replace(cfg, head_dim=32)
    model = TextModel(cfg, chunk=ChunkOptions(8))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 13)))
    params = model.init(jax.random.key(1), ids)["params"]
    mask = jnp.asarray(np.arange(13)[None] < np.array([13, 6, 9])[:, None])
    _, out = jax.jit(lambda p, c: model.apply({"params": p}, ids, attention_mask=mask, cache=c))(
        params, init_cache(cfg, 3, 24, jnp.float32))
    return cfg, model, params, out["cache"]


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3"])
def test_unstacked_decode_equals_scanned(model_type):
    cfg, model, params, cache = _setup(model_type)
    flat = unstack_layers(params)
    assert "layers" not in flat and len(flat[UNSTACKED]) == jax.tree.leaves(params["layers"])[0].shape[0]
    step = jax.jit(lambda p, t, c, a: model.apply({"params": p}, t, cache=c, decode=True, active=a))
    tok = jnp.array([[5], [7], [11]])
    active = jnp.array([True, False, True])
    want, w_out = step(params, tok, cache, active)
    got, g_out = step(flat, tok, cache, active)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
                 g_out["cache"], w_out["cache"])
    for out in (w_out, g_out):  # the inactive row's cache is untouched, bit for bit; the active rows' changed
        new = out["cache"]
        for name, c in cache["layers"].items():
            for key, old in c.items():
                np.testing.assert_array_equal(np.asarray(new["layers"][name][key])[:, 1], np.asarray(old)[:, 1])
                assert not np.array_equal(np.asarray(new["layers"][name][key])[:, 0], np.asarray(old)[:, 0]), key
        np.testing.assert_array_equal(new["lengths"], np.asarray(cache["lengths"]) + np.array([1, 0, 1]))


def test_text_model_of_an_unbound_minicpmv():
    """MiniCPMV(...).text_model() is a free TextModel configured as the full model (it asserted before)."""
    from uhd_jax.model.minicpmv import MiniCPMV

    text = MiniCPMV(tiny_config(), chunk=ChunkOptions(8)).text_model()
    assert isinstance(text, TextModel) and text.chunk == ChunkOptions(8) and text.parent is None
    ids = jnp.zeros((1, 4), jnp.int32)
    params = text.init(jax.random.key(0), ids)["params"]
    logits, _ = text.apply({"params": params}, ids)
    assert logits.shape[:2] == (1, 4)


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3"])
def test_per_block_cache_decode_equals_stacked(model_type):
    """The decode loops carry the cache per block (`unstack_cache`): same logits and, restacked, the same cache
    bit for bit as the stacked cache; and no block's arrays are sliced out of a stack and written back."""
    cfg, model, params, cache = _setup(model_type)
    flat = unstack_layers(params)
    step = jax.jit(lambda p, t, c, a: model.apply({"params": p}, t, cache=c, decode=True, active=a))
    tok = jnp.array([[5], [7], [11]])
    active = jnp.array([True, False, True])
    want, w_out = step(flat, tok, cache, active)
    blocks = dict(cache, layers=unstack_cache(cache["layers"]))
    got, g_out = step(flat, tok, blocks, active)
    assert isinstance(g_out["cache"]["layers"], tuple) and len(g_out["cache"]["layers"]) == len(flat[UNSTACKED])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 stack_cache(g_out["cache"]["layers"]), w_out["cache"]["layers"])
    assert stack_cache(cache["layers"]) is cache["layers"] and unstack_cache(blocks["layers"]) is blocks["layers"]
    # the stacked form writes each block back into [G, ...] buffers (dynamic-update-slice); the per-block form not
    hlo = lambda c: step.lower(flat, tok, c, active).compile().as_text()
    assert hlo(cache).count("dynamic-update-slice(") > 0
    assert hlo(blocks).count("dynamic-update-slice(") < hlo(cache).count("dynamic-update-slice(")
