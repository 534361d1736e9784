"""The chunked cross-entropy equals the plain full-logits loss, value and gradients, and the text model's
compute_logits=False path feeds it the same hidden states the logits come from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from uhd_jax.config import tiny_config
from uhd_jax.model.text_model import TextModel, lm_head_table
from uhd_jax.train.loss import chunked_cross_entropy, next_token_targets, reference_cross_entropy


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(seed, b=3, s=37, d=24, v=301):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((v, d)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    lengths = rng.integers(s // 3, s + 1, b)
    real = np.arange(s)[None] < lengths[:, None]  # right padding
    mask = real & (rng.random((b, s)) < 0.7)  # loss mask inside the real tokens
    return hidden, table, targets, jnp.asarray(mask)


@pytest.mark.parametrize("chunk", [1, 16, 50, 1000])
def test_matches_full_logits_float32(chunk):
    hidden, table, targets, mask = _inputs(chunk)
    f = lambda h, w: chunked_cross_entropy(h, w, targets, mask, valid_vocab=None, chunk_tokens=chunk,
                                                compute_dtype=jnp.float32)
    r = lambda h, w: reference_cross_entropy(h, w, targets, mask)
    (lf, gf), (lr, gr) = jax.value_and_grad(f, (0, 1))(hidden, table), jax.value_and_grad(r, (0, 1))(hidden, table)
    assert _rel(lf, lr) < 1e-5
    assert _rel(gf[0], gr[0]) < 1e-5 and _rel(gf[1], gr[1]) < 1e-5
    # masked-out tokens get no gradient
    assert np.all(np.asarray(gf[0])[~np.asarray(mask)] == 0)


def test_sum_reduction_and_jit():
    hidden, table, targets, mask = _inputs(7)
    f = jax.jit(lambda h, w: chunked_cross_entropy(h, w, targets, mask, valid_vocab=None, chunk_tokens=32,
                                                   reduction="sum", compute_dtype=jnp.float32))
    ref = reference_cross_entropy(hidden, table, targets, mask) * jnp.sum(mask)
    assert _rel(f(hidden, table), ref) < 1e-5


def test_bf16_compute_close():
    hidden, table, targets, mask = _inputs(3)
    f = lambda h, w: chunked_cross_entropy(h, w, targets, mask, valid_vocab=None, chunk_tokens=20)
    r = lambda h, w: reference_cross_entropy(h, w, targets, mask)
    (lf, gf), (lr, gr) = jax.value_and_grad(f, (0, 1))(hidden, table), jax.value_and_grad(r, (0, 1))(hidden, table)
    assert gf[1].dtype == jnp.float32
    assert _rel(lf, lr) < 1e-2 and _rel(gf[0], gr[0]) < 3e-2 and _rel(gf[1], gr[1]) < 3e-2


def test_chunked_backward_never_holds_full_logits():
    """Memory: the compiled gradient's temporaries stay well under one float32 [tokens, vocab] array."""
    n, d, v = 2048, 64, 8192
    h = jnp.zeros((n, d), jnp.float32)
    w = jnp.zeros((v, d), jnp.float32)
    t = jnp.zeros((n,), jnp.int32)
    m = jnp.ones((n,), bool)
    g = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, valid_vocab=None, chunk_tokens=128), (0, 1)))
    mem = g.lower(h, w).compile().memory_analysis()
    if mem is None:
        pytest.skip("no memory analysis on this backend")
    full = n * v * 4
    assert mem.temp_size_in_bytes < full / 4, (mem.temp_size_in_bytes, full)


def test_text_model_hidden_path_matches_logits():
    cfg = tiny_config().text
    model = TextModel(cfg)
    rng = np.random.default_rng(0)
    b, s = 2, 19
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, s)), jnp.int32)
    attn = jnp.asarray(np.arange(s)[None] < np.array([[s], [12]]))
    params = meta.unbox(model.init(jax.random.PRNGKey(0), ids)["params"])
    loss_mask = attn & jnp.asarray(rng.random((b, s)) < 0.8)
    targets, weights = next_token_targets(ids, loss_mask)

    logits, _ = model.apply({"params": params}, ids, attention_mask=attn)
    none, out = model.apply({"params": params}, ids, attention_mask=attn, compute_logits=False)
    assert none is None
    table = lm_head_table(params, cfg)
    assert _rel(out["norm"] @ table.T, logits) < 1e-6
    full = reference_cross_entropy(logits.reshape(-1, cfg.vocab_size) @ jnp.eye(cfg.vocab_size), jnp.eye(
        cfg.vocab_size), targets.reshape(-1), weights.reshape(-1))
    chunked = chunked_cross_entropy(out["norm"], table, targets, weights, valid_vocab=cfg.vocab_size,
                                    chunk_tokens=8, compute_dtype=jnp.float32)
    assert _rel(chunked, full) < 1e-5


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [16, 1000])
def test_padded_vocab_rows_take_no_part(compute_dtype, chunk):
    """A table padded from 301 to 640 rows, the padding large enough to dominate every softmax if it counted: same
    loss and gradients as the unpadded table (measured: loss bit-equal, gradients within 4e-8 absolute), and
    exactly zero gradient on the padded rows."""
    hidden, table, targets, mask = _inputs(5, v=301)
    pad = jnp.asarray(10 + np.random.default_rng(1).standard_normal((339, table.shape[1])), jnp.float32)
    padded = jnp.concatenate([table, pad])
    f = lambda h, w, v: chunked_cross_entropy(h, w, targets, mask, valid_vocab=v, chunk_tokens=chunk,  # noqa: E731
                                              compute_dtype=compute_dtype)
    lp, (gh_p, gw_p) = jax.jit(jax.value_and_grad(f, (0, 1)), static_argnums=2)(hidden, padded, 301)
    lu, (gh_u, gw_u) = jax.jit(jax.value_and_grad(f, (0, 1)), static_argnums=2)(hidden, table, None)
    assert np.isfinite(float(lp)) and _rel(lp, lu) < 1e-6
    assert _rel(gh_p, gh_u) < 1e-6 and _rel(gw_p[:301], gw_u) < 1e-6
    assert np.all(np.asarray(gw_p[301:]) == 0)
    # without valid_vocab the padding would count: the argument is required, and checked
    assert _rel(f(hidden, padded, None), lu) > 0.1
    with pytest.raises(TypeError, match="valid_vocab"):
        chunked_cross_entropy(hidden, padded, targets, mask)
    with pytest.raises(ValueError, match="valid_vocab"):
        f(hidden, table, 302)


def test_padded_text_model_loss_equals_unpadded():
    """The whole path with padding (vocab 500 -> 768): lm_head_table + valid_vocab gives the loss and table
    gradients of the same weights without padding, tied and untied (dense LLM: the vocab is all that differs)."""
    for tied in (True, False):
        cfg = tiny_config(text_model="qwen3").text.replace(vocab_size=500, tie_word_embeddings=tied)
        padded_cfg = cfg.replace(vocab_pad_multiple=384)
        assert cfg.replace(vocab_pad_multiple=1).padded_vocab_size == 500 and padded_cfg.padded_vocab_size == 768
        params = meta.unbox(TextModel(padded_cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
        unpadded = dict(params, embed_tokens=params["embed_tokens"][:500])
        if not tied:
            unpadded["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :500]}
        rng = np.random.default_rng(2)
        ids = jnp.asarray(rng.integers(0, 500, (2, 17)), jnp.int32)
        targets, weights = next_token_targets(ids, jnp.asarray(rng.random((2, 17)) < 0.8))

        def loss(p, c):
            _, out = TextModel(c).apply({"params": p}, ids, compute_logits=False)
            return chunked_cross_entropy(out["norm"], lm_head_table(p, c), targets, weights, valid_vocab=c.vocab_size,
                                         chunk_tokens=8, compute_dtype=jnp.float32)

        grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
        lp, gp = grad(params, padded_cfg)
        lu, gu = grad(unpadded, cfg.replace(vocab_pad_multiple=1))
        assert _rel(lp, lu) < 1e-6
        head = lambda g: g["embed_tokens"] if tied else g["lm_head"]["kernel"].T  # noqa: E731
        assert _rel(head(gp)[:500], head(gu)) < 1e-6 and np.all(np.asarray(head(gp)[500:]) == 0)
        assert _rel(gp["layers"]["layer_0"]["mlp"]["up_proj"]["kernel"],
                    gu["layers"]["layer_0"]["mlp"]["up_proj"]["kernel"]) < 1e-5
