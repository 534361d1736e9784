"""Next-token cross-entropy over a large vocabulary without the full [tokens, vocab] logits.

`chunked_cross_entropy(hidden, table, targets, weights)` computes
    sum_i weights_i * (logsumexp(table @ hidden_i) - (table @ hidden_i)[targets_i])
by a scan over chunks of tokens: per chunk the logits [C, V] are formed (operands in `compute_dtype`,
float32 accumulation), reduced to logsumexp and the target logit, and dropped. The gradient is a custom VJP that
is chunked the same way: per chunk it recomputes the logits, forms (softmax - onehot) * weight in one pass and
accumulates d table in float32 across chunks, so the live memory is O(C * V) whatever the number of tokens.

`table` is [Vp, D] (the tied embedding, or an untied lm_head kernel transposed); rows from `valid_vocab` on are
vocabulary padding (`TextConfig.padded_vocab_size`): inside each chunk their logits are -inf, so they enter no
logsumexp and get exactly zero gradient. The matmul operand cast of the table happens once per call, not per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(x, chunk: int):
    n = x.shape[0]
    pad = (-n) % chunk
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((-1, chunk) + x.shape[1:])


def _logits(h, w, cdt, valid):
    """[C, Vp] float32 logits; padded vocab columns (index >= valid) -inf."""
    logits = jnp.einsum("cd,vd->cv", h.astype(cdt), w, preferred_element_type=jnp.float32)
    if valid < w.shape[0]:
        logits = jnp.where(jnp.arange(w.shape[0]) < valid, logits, -jnp.inf)
    return logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ce_sum(hidden, table, targets, weights, chunk, cdt, valid):
    return _ce_fwd(hidden, table, targets, weights, chunk, cdt, valid)[0]


def _ce_fwd(hidden, table, targets, weights, chunk, cdt, valid):
    w = table.astype(cdt)
    hs, ts, ws = _chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk)

    def body(_, xs):
        h, t, wt = xs
        logits = _logits(h, w, cdt, valid)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return None, (lse, jnp.sum(wt * (lse - tgt)))

    _, (lse, partial) = jax.lax.scan(body, None, (hs, ts, ws))
    return jnp.sum(partial), (hidden, table, targets, weights, lse)


def _ce_bwd(chunk, cdt, valid, res, g):
    hidden, table, targets, weights, lse = res
    w = table.astype(cdt)
    n = hidden.shape[0]
    hs, ts, ws = _chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk)
    vocab = jnp.arange(table.shape[0], dtype=targets.dtype)

    def body(dw, xs):
        h, t, wt, l = xs
        logits = _logits(h, w, cdt, valid)  # padded columns: p = exp(-inf) = 0, so their d table rows stay 0
        scale = (g * wt).astype(jnp.float32)[:, None]
        p = jnp.exp(logits - l[:, None])
        dlogits = (jnp.where(vocab[None, :] == t[:, None], p - 1.0, p) * scale).astype(cdt)
        dh = jnp.einsum("cv,vd->cd", dlogits, w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("cv,cd->vd", dlogits, h.astype(cdt), preferred_element_type=jnp.float32)
        return dw, dh.astype(hidden.dtype)

    dw0 = jnp.zeros(table.shape, jnp.float32)
    dw, dh = jax.lax.scan(body, dw0, (hs, ts, ws, lse))
    dh = dh.reshape((-1,) + hidden.shape[1:])[:n]
    return dh, dw.astype(table.dtype), None, None


_ce_sum.defvjp(_ce_fwd, _ce_bwd)


def chunked_cross_entropy(hidden, table, targets, weights, *, valid_vocab: int | None, chunk_tokens: int = 1024,
                          compute_dtype=jnp.bfloat16, reduction: str = "mean"):
    """hidden [..., D] final (normed) hidden states; table [Vp, D]; targets [...] int in [0, valid_vocab);
    weights [...] (bool loss mask or float weights; 0 drops a token). valid_vocab: the real vocabulary size
    (`TextConfig.vocab_size`; rows from it on are padding and take no part), or None if every row is real;
    required so that a padded table is never silently used as a real one. Returns the weighted mean (reduction
    "mean": sum / sum of weights, 0 if no weight) or the weighted sum ("sum") as float32. Gradients flow to hidden
    and table (float32 accumulation over chunks; padded rows get 0); chunk_tokens sets the live logits size
    [chunk_tokens, Vp] float32."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    rows = table.shape[0]
    valid = rows if valid_vocab is None else int(valid_vocab)
    if not 0 < valid <= rows:
        raise ValueError(f"valid_vocab {valid_vocab} must be in [1, {rows}] (the table's rows)")
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = jnp.asarray(targets).reshape(-1).astype(jnp.int32)
    wts = jnp.asarray(weights).reshape(-1).astype(jnp.float32)
    chunk = max(1, min(chunk_tokens, h.shape[0]))
    total = _ce_sum(h, table, t, wts, chunk, jnp.dtype(compute_dtype), valid)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(wts), 1e-9)


def next_token_targets(input_ids, loss_mask, segment_ids=None):
    """Shifted targets and weights for next-token prediction: position s predicts input_ids[s + 1], counted
    where loss_mask[s + 1] is True (the token being predicted is a target). Returns (targets, weights) [B, S];
    the last position has weight 0. With `segment_ids` (packed rows) a position also has weight 0 where the next
    token starts another sample: a sample's last token never predicts the next sample's first."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        same = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros_like(seg[:, :1], bool)], axis=1)
        weights = jnp.where(same, weights, jnp.zeros_like(weights))
    return targets, weights


def reference_cross_entropy(hidden, table, targets, weights):
    """The plain full-logits loss (tests): float32 logits [N, V], weighted mean."""
    logits = jnp.einsum("...d,vd->...v", hidden, table, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    wts = weights.astype(jnp.float32)
    return jnp.sum(wts * (lse - tgt)) / jnp.maximum(jnp.sum(wts), 1e-9)
