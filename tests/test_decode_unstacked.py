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


def test_serving_params_give_the_same_model_and_tokens(tmp_path):
    """`serving_params` (every layer stack split per layer: the vision encoder's two stacks and the LLM) computes
    what the stacked layout computes: forward logits, prefill logits and cache, greedy tokens; two images of
    different sizes (views of different lengths). The served prefill slices no weight out of a stack. (Generation
    with served parameters is compared with transformers in test_engine.py: its hybrid model is served.)"""
    from tests.data_utils import make_model_dir, random_image
    from uhd_jax.data.packer import Packer, PackerConfig
    from uhd_jax.data.processor import Processor
    from uhd_jax.infer.engine import Generator, serving_params
    from uhd_jax.model.layers import UNSTACKED as STACK_KEY
    from uhd_jax.model.minicpmv import MiniCPMV

    cfg = tiny_config(insert_layer_id=1)
    proc = Processor.from_pretrained(make_model_dir(str(tmp_path), scale_resolution=112, max_slice_nums=4))
    cfg = cfg.replace(text=cfg.text.replace(vocab_size=248320), image_token_id=248056, video_token_id=248057)
    model = MiniCPMV(cfg, attention_impl="xla", chunk=ChunkOptions(8))
    samples = [proc.encode_chat([{"role": "user", "content": "<|image_pad|>\nRead it."}],
                                images=[random_image(60, 300, seed=1)], add_generation_prompt=True),
               proc.encode_chat([{"role": "user", "content": "<|image_pad|>\n<|image_pad|>\nWhich differs?"}],
                                images=[random_image(200, 90, seed=2), random_image(30, 30, seed=3)],
                                add_generation_prompt=True)]
    batch = Packer(proc, PackerConfig(batch_size=2, seq_buckets=(128,), views_per_row=8,
                                      tokens_per_view=160)).pack(samples)
    params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    served = serving_params(model, params)
    tower = served["vision"]["vision_tower"]
    assert set(tower["layers_pre"]) == set(tower["layers_post"]) == {STACK_KEY} and "layers" not in served["text"]
    again = serving_params(model, served)  # already served: the same arrays back
    assert all(x is y for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(served)))
    forward = jax.jit(lambda p: model.apply({"params": p}, batch)[0])
    np.testing.assert_allclose(np.asarray(forward(served)), np.asarray(forward(params)), rtol=1e-6, atol=1e-6)

    gen = Generator(model)
    cache = gen.new_cache(2, 160)
    (want, w_cache), (got, g_cache) = (gen.prefill(p, batch, cache) for p in (params, served))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
                 g_cache, w_cache)
    hlo = lambda p: gen._prefill.lower(p, batch, cache).compile().as_text().count("dynamic-slice(")
    assert hlo(served) < hlo(params)
