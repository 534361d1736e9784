"""Beam search in one `lax.while_loop`, with the semantics of transformers' `GenerationMixin._beam_search`.

The standard VLM evaluation harness runs MiniCPM-V 4.6 with `num_beams=3, repetition_penalty=1.2` (greedy beams,
no sampling). This module is generic over the model: it needs

    step_fn(cache, tokens [B*n] int32) -> (logits [B*n, V] float, cache)   # one decode step of every beam
    reorder_fn(cache, index [M] int32) -> cache                             # gather rows along the batch dim

where n is num_beams and row b*n + j is beam j of prompt b. `reorder_fn` with M = B*n and index
repeat(arange(B), n) also expands a prefilled batch-B cache to its beams (done here, once, before the loop).
`reorder_text_cache` is the reorder of `uhd_jax.model.text_model.init_cache`'s cache (its stacked layer leaves hold
the batch at axis 1, `lengths` at axis 0).

    result = beam_search(step_fn, reorder_fn, cache, first_logits [B, V], seen [B, V] bool, num_beams=3,
                         max_new_tokens=..., eos_token_ids=(...), pad_token_id=..., repetition_penalty=1.2)
    result.tokens[:, 0, :], result.lengths[:, 0]     # best hypothesis per prompt (pad_token_id after its length)

Call it inside `jax.jit` with the callables and the keyword settings static (functools.partial); only `cache`,
`first_logits`, `seen` (and a per-row `repetition_penalty` array) are traced. `seen` marks the prompt's tokens
(`sampling.seen_from_ids`), the history the repetition penalty sees besides each beam's own generated tokens.

Per step, following transformers (utils.py, `_beam_search` and its helpers):
  - log_softmax of the float32 logits, then the repetition penalty on those log-probabilities (transformers runs
    its logits processors after log_softmax in beam search; log-probs are <= 0, so seen tokens' scores are
    multiplied by the penalty), then + the beam's running score;
  - top K = max(2, 1 + #eos) * n over all n*V continuations of a prompt (so n beams can continue even when the
    best ones end); a continuation ends on an eos token or when it reaches max_new_tokens;
  - the n best continuations that did not end keep running (ended ones get -1e9 added);
  - ended continuations among the top n of the K are candidates for the finished set, scored
    sum_logprob / generated_length ** length_penalty; the finished set keeps the n best;
  - early stopping: `early_stopping=True` stops a prompt once n hypotheses finished; False (transformers'
    default) uses its heuristic (best running score / current length ** length_penalty cannot beat the worst
    finished one); "never" uses max_new_tokens as the best length when length_penalty > 0. A prompt that can no
    longer improve accepts no new finished hypotheses; the loop ends when no prompt can improve, or every
    continuation ended.
Scores mirror transformers' float32 arithmetic (the -1e9 masks, the division by the length factor), so the
hypotheses and their order agree with it, not merely the best one. Vocabulary padding columns (>= vocab_size)
never enter a beam.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from uhd_jax.infer.sampling import apply_repetition_penalty, divide_rows, mask_vocab

_NEG = -1.0e9  # transformers' mask value


@struct.dataclass
class BeamResult:
    """Finished hypotheses per prompt, best first (as transformers' `sequences` before num_return_sequences)."""

    tokens: jax.Array  # [B, n, T] int32 generated tokens (the eos included), pad_token_id after `lengths`
    lengths: jax.Array  # [B, n] int32 generated tokens of each hypothesis
    scores: jax.Array  # [B, n] float32 length-penalised log-probability (transformers' sequences_scores)
    steps: jax.Array  # [] int32 decode steps run (transformers' generated length, cur_len - prompt length)


def gather_batch(tree, index: jax.Array, axis: int = 0):
    """Every leaf of `tree` gathered along `axis` with `index`."""
    return jax.tree.map(lambda a: jnp.take(a, index, axis=axis), tree)


def reorder_text_cache(cache: dict, index: jax.Array) -> dict:
    """reorder_fn for `text_model.init_cache` caches: layer leaves [groups, B, ...] on axis 1, lengths [B] on 0."""
    return {"layers": gather_batch(cache["layers"], index, axis=1), "lengths": jnp.take(cache["lengths"], index)}


def _gather_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, M, ...], idx [B, k] -> [B, k, ...] (transformers' _gather_beams)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def beam_search(step_fn: Callable, reorder_fn: Callable, cache: Any, first_logits: jax.Array, seen: jax.Array, *,
                num_beams: int, max_new_tokens: int, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                vocab_size: int | None = None, repetition_penalty=1.0, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> BeamResult:
    """Deterministic beam search (transformers' num_beams > 1, do_sample=False). first_logits [B, V]: each prompt's
    next-token logits from prefill, with `cache` the prefilled batch-B cache; seen [B, V] bool: the prompts'
    tokens. repetition_penalty: a float or [B] per prompt. vocab_size: real columns of V (default all)."""
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams ({num_beams}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    b, v = first_logits.shape
    n, t_max = int(num_beams), int(max_new_tokens)
    eos = jnp.asarray(sorted(set(int(e) for e in eos_token_ids)) or [-1], jnp.int32)
    k = max(2, 1 + len(set(eos_token_ids))) * n
    vocab = v if vocab_size is None else int(vocab_size)
    # length factors len ** length_penalty for len = 1..T+1 (index len - 1), in float64 as transformers' Python
    # `int ** float`
    lp_table = jnp.asarray(np.float32(np.arange(1, t_max + 2, dtype=np.float64) ** float(length_penalty)))
    stop_when_full = early_stopping is True
    top_n_mask = jnp.arange(k) < n

    expand = jnp.repeat(jnp.arange(b), n)
    cache = reorder_fn(cache, expand)
    logits = jnp.take(first_logits.astype(jnp.float32), expand, axis=0)
    seen = jnp.take(seen, expand, axis=0)
    penalty = jnp.take(jnp.broadcast_to(jnp.asarray(repetition_penalty, jnp.float32), (b,)), expand)

    tokens0 = jnp.full((b, n, t_max), pad_token_id, jnp.int32)
    carry = dict(
        t=jnp.int32(0), go=jnp.bool_(True), logits=logits, cache=cache, seen=seen,
        run_tok=tokens0, run_score=jnp.zeros((b, n), jnp.float32).at[:, 1:].set(_NEG),
        fin_tok=tokens0, fin_score=jnp.full((b, n), _NEG, jnp.float32), fin_len=jnp.zeros((b, n), jnp.int32),
        fin_done=jnp.zeros((b, n), bool), improvable=jnp.ones((b,), bool))

    def body(c):
        t = c["t"]
        logp = jax.nn.log_softmax(c["logits"], axis=-1)
        logp = mask_vocab(logp, vocab)
        logp = apply_repetition_penalty(logp, c["seen"], penalty)
        logp = logp.reshape(b, n, v) + c["run_score"][:, :, None]
        vals, idx = jax.lax.top_k(logp.reshape(b, n * v), k)  # [B, K]
        parent, tok = idx // v, (idx % v).astype(jnp.int32)
        at_t = jnp.arange(t_max) == t
        cand_tok = jnp.where(at_t, tok[..., None], _gather_beams(c["run_tok"], parent))  # [B, K, T]
        ended = jnp.isin(tok, eos) | (t + 1 >= t_max)

        # running beams: the n best continuations that did not end
        run_scores_k = vals + ended.astype(jnp.float32) * _NEG
        _, nxt = jax.lax.top_k(run_scores_k, n)
        run_tok = _gather_beams(cand_tok, nxt)
        run_score = _gather_beams(run_scores_k, nxt)
        run_parent = _gather_beams(parent, nxt)
        new_tok = _gather_beams(tok, nxt)

        # finished hypotheses: ended continuations among the top n, merged with the finished set
        just_done = ended & top_n_mask[None, :]
        s = divide_rows(vals, jnp.broadcast_to(lp_table[t], (b,)))
        full = jnp.all(c["fin_done"], axis=-1, keepdims=True) & stop_when_full
        s = s + full.astype(jnp.float32) * _NEG
        s = s + (~c["improvable"])[:, None].astype(jnp.float32) * _NEG
        s = s + (~just_done).astype(jnp.float32) * _NEG
        m_score = jnp.concatenate([c["fin_score"], s], axis=1)
        _, top = jax.lax.top_k(m_score, n)
        fin_tok = _gather_beams(jnp.concatenate([c["fin_tok"], cand_tok], axis=1), top)
        fin_score = _gather_beams(m_score, top)
        fin_len = _gather_beams(jnp.concatenate([c["fin_len"], jnp.full((b, k), t + 1, jnp.int32)], axis=1), top)
        fin_done = _gather_beams(jnp.concatenate([c["fin_done"], just_done], axis=1), top)

        # move each beam's history (seen tokens, cache) to its new place
        rows = (jnp.arange(b)[:, None] * n + run_parent).reshape(-1)
        flat_tok = new_tok.reshape(-1)
        seen = jnp.take(c["seen"], rows, axis=0)
        seen = seen.at[jnp.arange(b * n), flat_tok].set(True)
        cache = reorder_fn(c["cache"], rows)

        # can a prompt still improve on its finished set? (transformers' _check_early_stop_heuristic)
        t1 = t + 1
        best_len = t_max if (early_stopping == "never" and length_penalty > 0.0) else t1
        best_running = divide_rows(run_score[:, 0], jnp.broadcast_to(lp_table[best_len - 1], (b,)))
        worst_done = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), _NEG)
        improvable = c["improvable"] & jnp.any(best_running[:, None] > worst_done, axis=-1)
        go = jnp.any(improvable) & ~(jnp.all(fin_done) & stop_when_full) & ~jnp.all(ended)

        def advance(args):
            cache_, tok_ = args
            out, cache_ = step_fn(cache_, tok_)
            return out.astype(jnp.float32), cache_

        logits, cache = jax.lax.cond(go, advance, lambda a: (c["logits"], a[0]), (cache, flat_tok))
        return dict(t=t1, go=go, logits=logits, cache=cache, seen=seen, run_tok=run_tok, run_score=run_score,
                    fin_tok=fin_tok, fin_score=fin_score, fin_len=fin_len, fin_done=fin_done,
                    improvable=improvable)

    out = jax.lax.while_loop(lambda c: c["go"] & (c["t"] < t_max), body, carry)
    return BeamResult(tokens=out["fin_tok"], lengths=out["fin_len"], scores=out["fin_score"], steps=out["t"])


__all__ = ["BeamResult", "beam_search", "gather_batch", "reorder_text_cache"]
