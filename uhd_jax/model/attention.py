"""One attention function in front of the kernels.

Implementations:
  "xla"    plain einsum + float32 softmax; the reference, runs everywhere (CPU tests).
  "cudnn"  cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
  "splash" the Pallas TPU kernel: reserved, not implemented yet (raises).
  "auto"   cudnn on GPU when dtype and head size allow it, xla otherwise.

Every caller goes through `dot_product_attention`, so a new kernel is one branch here plus its test
against the "xla" path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
            and head_dim <= 256:
        return "cudnn"
    return "xla"


def _xla_attention(q, k, v, mask, scale):
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    qg = q.reshape(b, t, kh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _grouped_mask(mask, b, t, s, kh, g):
    """Boolean mask broadcastable to [B, N, T, S] -> [B, K, G, T, S] for the grouped einsum."""
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, s))
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(b, kh, g, t, s)


def dot_product_attention(q, k, v, *, kv_lengths=None, mask=None, causal: bool = False, scale: float | None = None,
                          implementation: str = "auto"):
    """Multi-head attention with grouped KV heads.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0.
    kv_lengths: [B] int32, keys at positions >= length are padding (also used as query lengths when T == S).
    mask: bool, broadcastable to [B, N, T, S], True = may attend.
    causal: query t sees keys s <= t (T == S).
    Returns [B, T, N, H] in q's dtype. Rows with no visible key return zeros on cudnn and an average on xla;
    callers mask those rows out.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"{n} query heads are not a multiple of {kh} kv heads")
    scale = h ** -0.5 if scale is None else scale
    impl = resolve_implementation(implementation, q.dtype, h)

    if impl == "cudnn":
        q_lengths = None
        if kv_lengths is not None:
            kv_lengths = jnp.maximum(kv_lengths.astype(jnp.int32), 1)
            q_lengths = kv_lengths if t == s else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                            query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
                                            implementation="cudnn")
    if impl == "splash":
        raise NotImplementedError("the splash (Pallas TPU) attention kernel is not implemented yet; "
                                  "use implementation='xla' on TPU")

    g = n // kh
    full = None
    if kv_lengths is not None:
        full = (jnp.arange(s)[None, :] < kv_lengths[:, None])[:, None, None, None, :]  # [B,1,1,1,S]
    if causal:
        c = (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None, None, None]
        full = c if full is None else full & c
    if mask is not None:
        gm = _grouped_mask(mask, b, t, s, kh, g)
        full = gm if full is None else full & gm
    return _xla_attention(q, k, v, full, scale)
