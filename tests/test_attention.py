"""The attention dispatch against an independent float64 numpy attention: GQA, kv_lengths, causal, masks of every
broadcast shape, T != S, explicit scale; the cuDNN kernel against the same reference on a GPU (gpu marker)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.model.attention import dot_product_attention, resolve_implementation


def reference(q, k, v, allowed, scale):
    """Plain float64 attention, written without the project's code. q [B,T,N,H], k/v [B,S,K,H] with query head
    n reading kv head n // (N/K); allowed: bool broadcastable to [B, N, T, S]. Rows with no allowed key: NaN."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    out = np.zeros((b, t, n, h))
    allowed = np.broadcast_to(allowed, (b, n, t, s))
    for head in range(n):
        kv = head // (n // kh)
        logits = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, kv]) * scale
        logits = np.where(allowed[:, head], logits, -np.inf)
        with np.errstate(invalid="ignore"):
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsh->bth", p, v[:, :, kv])
    return out


def _inputs(rng, b, t, s, n, kh, h):
    return (rng.standard_normal((b, t, n, h)), rng.standard_normal((b, s, kh, h)), rng.standard_normal((b, s, kh, h)))


def _check(q, k, v, allowed, scale=None, rtol=2e-6, **kw):
    """Runs the dispatch (float32) and compares every query row that sees at least one key."""
    scale_ = q.shape[-1] ** -0.5 if scale is None else scale
    want = reference(q, k, v, allowed, scale_)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = np.asarray(dot_product_attention(f32(q), f32(k), f32(v), scale=scale, **kw), np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    b, t, n, _ = q.shape
    rows = np.broadcast_to(allowed, (b, n, t, k.shape[1])).any(-1).transpose(0, 2, 1)  # [B, T, N]
    assert rows.any()
    err = np.abs(got[rows] - want[rows]).max() / np.abs(want[rows]).max()
    assert err < rtol, err
    return err


# (b, t, s, n, kh, h): MHA, GQA 2:1 and 4:1, MQA, T != S (decode-like and cross), the ViT's head size
SHAPES = [(2, 7, 7, 4, 4, 16), (3, 16, 16, 8, 2, 8), (1, 33, 33, 6, 1, 12), (2, 1, 19, 8, 2, 32),
          (2, 5, 12, 4, 2, 16), (2, 64, 64, 4, 4, 72)]


@pytest.mark.parametrize("implementation", ["auto", "xla"])
@pytest.mark.parametrize("b,t,s,n,kh,h", SHAPES)
def test_dispatch_matches_numpy(implementation, b, t, s, n, kh, h):
    if implementation == "auto" and jax.default_backend() != "cpu":
        pytest.skip("on a GPU, auto with float32 is still xla; the cuDNN path is tested by the gpu tests")
    rng = np.random.default_rng(100 * t + s)
    q, k, v = _inputs(rng, b, t, s, n, kh, h)
    lengths = rng.integers(1, s + 1, b)
    lengths[0] = s  # one full row, the others padded
    key_ok = np.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    cases = [(dict(), np.ones((1, 1, t, s), bool)), (dict(kv_lengths=jnp.asarray(lengths, jnp.int32)), key_ok)]
    # masks in each shape the docstring allows: [B, N, T, S] (per head), [B, 1, T, S], [1, 1, T, S]
    for shape in [(b, n, t, s), (b, 1, t, s), (1, 1, t, s)]:
        m = rng.random(shape) > 0.4
        m[..., 0] = True  # at least one visible key per row
        cases.append((dict(mask=jnp.asarray(m)), m))
        cases.append((dict(mask=jnp.asarray(m), kv_lengths=jnp.asarray(lengths, jnp.int32)), m & key_ok))
    if t == s:
        causal = np.tril(np.ones((t, t), bool))[None, None]
        m = rng.random((b, n, t, s)) > 0.3
        m[..., 0] = True
        cases += [(dict(causal=True), causal),
                  (dict(causal=True, kv_lengths=jnp.asarray(lengths, jnp.int32)), causal & key_ok),
                  (dict(causal=True, kv_lengths=jnp.asarray(lengths, jnp.int32), mask=jnp.asarray(m)),
                   causal & key_ok & m)]
    for kw, allowed in cases:
        _check(q, k, v, allowed, implementation=implementation, **kw)
    _check(q, k, v, key_ok, scale=0.37, implementation=implementation, kv_lengths=jnp.asarray(lengths, jnp.int32))


def test_masked_rows_and_padding_keys_do_not_leak():
    """Values at padded keys (huge, NaN-free) change nothing for the real queries."""
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, 2, 9, 9, 4, 2, 8)
    lengths = np.array([9, 4])
    k2, v2 = k.copy(), v.copy()
    k2[1, 4:], v2[1, 4:] = 1e4, -1e4
    f = lambda k_, v_: np.asarray(dot_product_attention(  # noqa: E731
        *(jnp.asarray(x, jnp.float32) for x in (q, k_, v_)), kv_lengths=jnp.asarray(lengths, jnp.int32), causal=True))
    np.testing.assert_array_equal(f(k, v)[1, :4], f(k2, v2)[1, :4])


def test_errors():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="flash"):
        resolve_implementation("flash", jnp.float32, 64)
    with pytest.raises(NotImplementedError, match="splash"):
        dot_product_attention(x, x, x, implementation="splash")
    with pytest.raises(ValueError, match="multiple"):
        dot_product_attention(jnp.zeros((1, 4, 3, 8)), x, x)  # 3 query heads over 2 kv heads


@pytest.mark.cpu
def test_auto_is_xla_on_cpu():
    for dtype in (jnp.float32, jnp.bfloat16):
        assert resolve_implementation("auto", dtype, 64) == "xla"
    assert resolve_implementation("cudnn", jnp.bfloat16, 64) == "cudnn"  # an explicit choice is kept


# ---------------------------------------------------------------------------------------------- GPU only
# The three call patterns of the model: ViT (kv_lengths, T == S, 16 heads of 72), text prefill (causal +
# kv_lengths, GQA 8:2, head 256), decode (one query over a cache, kv_lengths, T != S).
GPU_CASES = [
    ("vit", (4, 256, 256, 16, 16, 72), dict(), [256, 100, 17, 0]),  # 0: an empty view slot
    ("prefill", (3, 128, 128, 8, 2, 256), dict(causal=True), [128, 77, 5]),
    ("decode", (3, 1, 96, 8, 2, 256), dict(), [96, 40, 1]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,shape,kw,lengths", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_cudnn_matches_numpy(name, shape, kw, lengths):
    b, t, s, n, kh, h = shape
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(rng, b, t, s, n, kh, h))
    lengths = np.asarray(lengths, np.int32)
    allowed = np.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    if kw.get("causal"):
        allowed = allowed & np.tril(np.ones((t, s), bool))[None, None]
    want = reference(np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32), allowed,
                     h ** -0.5)
    got = dot_product_attention(q, k, v, kv_lengths=jnp.asarray(lengths), implementation="cudnn", **kw)
    auto = dot_product_attention(q, k, v, kv_lengths=jnp.asarray(lengths), implementation="auto", **kw)
    assert got.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(got, np.float32))  # auto -> cudnn
    got = np.asarray(got, np.float64)
    # real queries only: with T == S the lengths also bound the queries (cuDNN leaves padded query rows at 0)
    rows = np.ones((b, t), bool) if t != s else np.arange(t)[None, :] < lengths[:, None]
    err = np.linalg.norm(got[rows] - want[rows]) / np.linalg.norm(want[rows])
    assert err < 1e-2, err  # bf16 output rounding (~4e-3)


@pytest.mark.gpu
def test_auto_picks_cudnn_on_gpu():
    assert resolve_implementation("auto", jnp.bfloat16, 72) == "cudnn"
    assert resolve_implementation("auto", jnp.float16, 256) == "cudnn"
    assert resolve_implementation("auto", jnp.float32, 64) == "xla"  # cuDNN flash attention is 16-bit only
    assert resolve_implementation("auto", jnp.bfloat16, 12) == "xla"  # head size not a multiple of 8
    assert resolve_implementation("auto", jnp.bfloat16, 512) == "xla"  # head size above cuDNN's 256
