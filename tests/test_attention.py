"""The attention dispatch's XLA path against a float64 numpy reference: GQA, padding, causal, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.model.attention import dot_product_attention, resolve_implementation


def reference(q, k, v, allowed, scale):
    """float64 loop-free reference; allowed: bool [B, N, T, S]."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    logits = np.where(allowed, logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    p = np.exp(logits - m)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("b,t,n,kh,h", [(2, 7, 4, 2, 16), (3, 16, 8, 8, 8), (1, 33, 6, 1, 12)])
def test_xla_path(b, t, n, kh, h):
    rng = np.random.default_rng(t)
    q = rng.standard_normal((b, t, n, h))
    k = rng.standard_normal((b, t, kh, h))
    v = rng.standard_normal((b, t, kh, h))
    lengths = rng.integers(1, t + 1, b)
    extra = rng.random((b, 1, t, t)) > 0.3
    extra[..., 0] = True  # keep at least one visible key per row
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    key_ok = np.arange(t)[None, None, None, :] < lengths[:, None, None, None]
    causal = np.tril(np.ones((t, t), bool))[None, None]
    cases = [
        (dict(kv_lengths=jnp.asarray(lengths)), key_ok),
        (dict(causal=True), causal),
        (dict(causal=True, kv_lengths=jnp.asarray(lengths), mask=jnp.asarray(extra)), causal & key_ok & extra),
    ]
    for kw, allowed in cases:
        out = np.asarray(dot_product_attention(f32(q), f32(k), f32(v), implementation="xla", **kw))
        ref = reference(q, k, v, np.broadcast_to(allowed, (b, n, t, t)), h ** -0.5)
        rows = np.broadcast_to(allowed, (b, n, t, t)).any(-1).transpose(0, 2, 1)  # [B, T, N]
        np.testing.assert_allclose(out[rows], ref[rows], rtol=1e-5, atol=1e-5)


def test_dispatch_choice():
    assert resolve_implementation("auto", jnp.float32, 64) == ("xla" if jax.default_backend() != "gpu" else "xla")
    assert resolve_implementation("xla", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ValueError, match="flash"):
        resolve_implementation("flash", jnp.float32, 64)
    with pytest.raises(NotImplementedError, match="splash"):
        x = jnp.zeros((1, 4, 2, 8))
        dot_product_attention(x, x, x, implementation="splash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_xla():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 256, 16, 72)), jnp.bfloat16) for _ in range(3))
    lengths = jnp.asarray([256, 100, 17, 0], jnp.int32)
    a = dot_product_attention(q, k, v, kv_lengths=lengths, implementation="cudnn").astype(jnp.float32)
    b = dot_product_attention(q, k, v, kv_lengths=lengths, implementation="xla").astype(jnp.float32)
    valid = np.arange(256)[None, :] < np.asarray(lengths)[:, None]
    err = np.linalg.norm(np.asarray(a - b)[valid]) / np.linalg.norm(np.asarray(b)[valid])
    assert err < 1e-2
