"""Next-token choice for the decode loop: repetition penalty, temperature, top-k, top-p, greedy or sampled.

Every setting is a per-row array, so one compiled function serves a batch whose rows ask for different settings
(continuous batching: a slot's settings change without recompiling). Shapes are static; nothing here branches in
Python on values. Semantics are those of `transformers` (`generation/logits_process.py`, and the order in which
`GenerationMixin._get_logits_processor` applies them):

  1. RepetitionPenaltyLogitsProcessor: for every token already seen in the row (prompt + generated so far, each
     token at most once), a score s becomes s * penalty if s < 0, else s / penalty.
  2. TemperatureLogitsWarper: s / temperature.                                     (sampling rows only)
  3. TopKLogitsWarper: scores strictly below the k-th largest become -inf (ties with it are kept).  (sampling rows)
  4. TopPLogitsWarper (min_tokens_to_keep=1): sort ascending, cumulative softmax probabilities; tokens whose
     cumulative probability is <= 1 - top_p become -inf, the most probable token is always kept.   (sampling rows)
Greedy rows (do_sample False, or temperature <= 0) take the argmax after step 1, as transformers' greedy search
does (the warpers 2-4 are only installed when sampling). A setting that transformers would skip is a no-op here:
temperature 1, top_k <= 0 (0 is "off" in generation_config.json), top_p >= 1, repetition_penalty 1.

Ties: top-k keeps every token tied with the k-th value, as transformers does. For top-p transformers splits a run
of tokens tied at the cut in whatever order its (unstable) sort left them; here every token tied with the smallest
kept value is kept, so the result does not depend on token order. Without such a tie the two agree exactly.
The cut 1 - top_p is computed in float64 on the host (as transformers compares float32 probabilities with a Python
float), so `SamplingState.top_p_cut` holds it, not top_p.

Vocabulary padding: logits [B, V] may have more columns than the real vocabulary (`config.padded_vocab_size`; the
model fills the padded columns with the most negative finite float). Columns >= `state.vocab_size` are set to
-inf before anything else, so they are never picked, whatever the settings.

Interface for the decode loop (uhd_jax/infer/engine.py):

    state = make_state(batch, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size,
                       temperature=..., top_k=..., top_p=..., repetition_penalty=..., do_sample=...,
                       prompt_ids=ids [B, S], prompt_mask=mask [B, S])          # host side, once per batch / slot
    # inside jit / the lax.while_loop body, each step:
    keys = row_keys(seeds [B] uint32, steps [B] int32)   # one key per row and step (or any key array [B])
    tokens = pick(logits [B, V] float32, state, keys)    # -> int32 [B]
    state = mark_seen(state, tokens, active [B] bool)    # the new tokens now count for the repetition penalty

`pick(logits, state, key)`: `key` is per-row keys [B] (typed `jax.random.key` array, or raw uint32 [B, 2]) or one
key (then split into B). Per-row keys derived from a row's own seed and its own step count (`row_keys`) make a
row's samples independent of which other rows share the batch. `state` is a pytree (flax struct): carry it through
the loop; `state.seen` [B, Vp] bool is the only part that changes. To put one slot's settings in, use
`set_row(state, i, row_state)` with a batch-1 state made by `make_state`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NEG_INF = -jnp.inf


@struct.dataclass
class SamplingState:
    """Per-row next-token settings and the row's seen-token mask. All arrays have a leading batch dim B."""

    temperature: jax.Array  # [B] float32; <= 0 means greedy
    top_k: jax.Array  # [B] int32; <= 0 means off
    top_p_cut: jax.Array  # [B] float32: 1 - top_p (computed in float64); <= 0 means top-p off
    repetition_penalty: jax.Array  # [B] float32; 1 means off
    do_sample: jax.Array  # [B] bool; False means greedy
    seen: jax.Array  # [B, Vp] bool: tokens in the prompt or generated so far (repetition penalty)
    vocab_size: int = struct.field(pytree_node=False, default=0)  # real columns; 0: all columns are real

    @property
    def greedy(self) -> jax.Array:
        return ~self.do_sample | (self.temperature <= 0)


def _per_row(value, batch: int, dtype) -> np.ndarray:
    a = np.asarray(value, dtype)
    if a.ndim == 0:
        a = np.full((batch,), a, dtype)
    if a.shape != (batch,):
        raise ValueError(f"a per-row setting must be a scalar or have shape ({batch},), got {a.shape}")
    return a


def make_state(batch: int, *, vocab_size: int, padded_vocab_size: int | None = None, temperature=1.0, top_k=0,
               top_p=1.0, repetition_penalty=1.0, do_sample=True, prompt_ids=None,
               prompt_mask=None) -> SamplingState:
    """Host-side constructor. Each setting is a scalar (all rows) or a sequence of B values. prompt_ids [B, S]
    (with prompt_mask [B, S] bool marking real tokens, default all) seed the seen mask. Validates like
    transformers: top_p in [0, 1], repetition_penalty > 0, temperature >= 0 (0: greedy)."""
    vp = vocab_size if padded_vocab_size is None else padded_vocab_size
    if not 0 < vocab_size <= vp:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, padded_vocab_size {vp}]")
    t = _per_row(temperature, batch, np.float64)
    p = _per_row(top_p, batch, np.float64)
    r = _per_row(repetition_penalty, batch, np.float64)
    if np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"top_p must be in [0, 1], got {p}")
    if np.any(r <= 0):
        raise ValueError(f"repetition_penalty must be > 0, got {r}")
    if np.any(t < 0):
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {t}")
    cut = np.where(p < 1.0, 1.0 - p, 0.0)  # float64, like transformers' Python float `1 - self.top_p`
    seen = np.zeros((batch, vp), bool)
    if prompt_ids is not None:
        ids = np.asarray(prompt_ids)
        mask = np.ones(ids.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
        if ids.ndim != 2 or ids.shape[0] != batch or mask.shape != ids.shape:
            raise ValueError(f"prompt_ids must be [{batch}, S] with a matching mask, got {ids.shape}, {mask.shape}")
        rows = np.broadcast_to(np.arange(batch)[:, None], ids.shape)
        ok = mask & (ids >= 0) & (ids < vp)
        seen[rows[ok], ids[ok]] = True
    return SamplingState(temperature=jnp.asarray(t, jnp.float32), top_k=jnp.asarray(_per_row(top_k, batch, np.int64)
                                                                                     .astype(np.int32)),
                         top_p_cut=jnp.asarray(cut, jnp.float32), repetition_penalty=jnp.asarray(r, jnp.float32),
                         do_sample=jnp.asarray(_per_row(do_sample, batch, bool)), seen=jnp.asarray(seen),
                         vocab_size=int(vocab_size))


def from_generation_config(gen: dict, batch: int, *, vocab_size: int, padded_vocab_size: int | None = None,
                           prompt_ids=None, prompt_mask=None, **overrides) -> SamplingState:
    """make_state from a generation_config.json dict (keys do_sample, temperature, top_k, top_p,
    repetition_penalty; transformers' defaults where absent: do_sample False, temperature 1, top_k 50, top_p 1,
    repetition_penalty 1). `overrides` replace its values."""
    g = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
    g.update({k: v for k, v in gen.items() if k in g and v is not None})
    g.update(overrides)
    return make_state(batch, vocab_size=vocab_size, padded_vocab_size=padded_vocab_size, prompt_ids=prompt_ids,
                      prompt_mask=prompt_mask, **g)


def set_row(state: SamplingState, i, row: SamplingState) -> SamplingState:
    """`state` with row i replaced by the batch-1 state `row` (a slot taking a new request). Jittable."""
    return jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b[0], i, 0), state, row)


# ----------------------------------------------------------------------------------------------- processors
def mask_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """Columns >= vocab_size (vocabulary padding) to -inf. A no-op when vocab_size is 0 or the full width."""
    if not vocab_size or vocab_size >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, NEG_INF)


def divide_rows(x: jax.Array, d: jax.Array) -> jax.Array:
    """x [B, ...] / d [B], correctly rounded like torch's `tensor / float`. A plain `x / d[:, None]` is not: XLA's
    algebraic simplifier turns a divide by a broadcast into a multiply by the reciprocal (1 ulp off about half the
    time); the optimization barrier on the broadcast divisor keeps the true division."""
    d = jnp.broadcast_to(jnp.asarray(d, x.dtype).reshape(d.shape + (1,) * (x.ndim - d.ndim)), x.shape)
    return x / jax.lax.optimization_barrier(d)


def apply_repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """RepetitionPenaltyLogitsProcessor: seen tokens' scores s -> s * penalty if s < 0 else s / penalty."""
    p = jnp.asarray(penalty, scores.dtype)
    return jnp.where(seen, jnp.where(scores < 0, scores * p[:, None], divide_rows(scores, p)), scores)


def apply_temperature(scores: jax.Array, temperature: jax.Array) -> jax.Array:
    """TemperatureLogitsWarper: s / temperature (temperature > 0 per row)."""
    return divide_rows(scores, jnp.asarray(temperature, scores.dtype))


def _kth_largest(sorted_asc: jax.Array, k: jax.Array) -> jax.Array:
    """[B, 1] value of the k-th largest entry per row (k <= 0: -inf, i.e. off; k > V: the smallest)."""
    v = sorted_asc.shape[-1]
    idx = v - jnp.clip(k, 1, v)
    kth = jnp.take_along_axis(sorted_asc, idx[:, None], axis=-1)
    return jnp.where((k > 0)[:, None], kth, NEG_INF)


def _top_p_threshold(sorted_asc: jax.Array, cut: jax.Array) -> jax.Array:
    """[B, 1] smallest value top-p keeps, from ascending-sorted scores (-inf where top-p is off). The removed
    positions (cumulative probability <= cut, never the last) form a prefix, since the cumulative sum of
    non-negative terms never decreases; the value right after that prefix is the threshold."""
    cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
    remove = cum <= cut[:, None]
    remove = remove.at[:, -1].set(False)
    n = jnp.sum(remove, axis=-1, dtype=jnp.int32)
    thr = jnp.take_along_axis(sorted_asc, n[:, None], axis=-1)
    return jnp.where((cut > 0)[:, None], thr, NEG_INF)


def apply_top_k(scores: jax.Array, top_k: jax.Array) -> jax.Array:
    """TopKLogitsWarper (min_tokens_to_keep=1): scores below the k-th largest -> -inf; rows with k <= 0 unchanged."""
    thr = _kth_largest(jnp.sort(scores, axis=-1), jnp.asarray(top_k, jnp.int32))
    return jnp.where(scores < thr, NEG_INF, scores)


def apply_top_p(scores: jax.Array, top_p_cut: jax.Array) -> jax.Array:
    """TopPLogitsWarper (min_tokens_to_keep=1) given cut = 1 - top_p per row; rows with cut <= 0 unchanged."""
    thr = _top_p_threshold(jnp.sort(scores, axis=-1), jnp.asarray(top_p_cut, jnp.float32))
    return jnp.where(scores < thr, NEG_INF, scores)


def apply_top_k_top_p(scores: jax.Array, top_k: jax.Array, top_p_cut: jax.Array) -> jax.Array:
    """apply_top_p(apply_top_k(scores, k), cut) with one sort: top-k only turns a prefix of the ascending order to
    -inf, so the sorted top-k output is the sorted input with that prefix replaced."""
    s = jnp.sort(scores, axis=-1)
    k_thr = _kth_largest(s, jnp.asarray(top_k, jnp.int32))
    s = jnp.where(s < k_thr, NEG_INF, s)
    thr = jnp.maximum(k_thr, _top_p_threshold(s, jnp.asarray(top_p_cut, jnp.float32)))
    return jnp.where(scores < thr, NEG_INF, scores)


def process_logits(logits: jax.Array, state: SamplingState) -> jax.Array:
    """The scores each row picks from, float32 [B, V] (-inf where filtered): padding masked, repetition penalty;
    then for sampling rows temperature, top-k, top-p. Greedy rows take the argmax of this."""
    x = mask_vocab(logits.astype(jnp.float32), state.vocab_size)
    x = apply_repetition_penalty(x, state.seen, state.repetition_penalty)
    sample = ~state.greedy
    x = apply_temperature(x, jnp.where(sample, state.temperature, 1.0))
    k = jnp.where(sample, state.top_k, 0)
    cut = jnp.where(sample, state.top_p_cut, 0.0)
    need_sort = jnp.any((k > 0) | (cut > 0))  # skip the [B, V] sort when no row filters
    return jax.lax.cond(need_sort, lambda y: apply_top_k_top_p(y, k, cut), lambda y: y, x)


def _row_keys(key, batch: int):
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    per_row = key.ndim == (1 if typed else 2)
    if per_row:
        if key.shape[0] != batch:
            raise ValueError(f"{key.shape[0]} keys for {batch} rows")
        return key
    return jax.random.split(key, batch)


def pick(logits: jax.Array, state: SamplingState, key) -> jax.Array:
    """Next token per row, int32 [B]: argmax for greedy rows, a draw from softmax(process_logits) otherwise.
    logits [B, V] (any float dtype; processed in float32); key: per-row keys [B] or one key (see module doc)."""
    x = process_logits(logits, state)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
    keys = _row_keys(key, x.shape[0])
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)
    return jnp.where(state.greedy, greedy_tok, drawn)


def mark_seen(state: SamplingState, tokens: jax.Array, active: jax.Array | None = None) -> SamplingState:
    """The state after emitting `tokens` [B] (only where `active` [B] bool, default all rows)."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    add = jnp.ones((b,), bool) if active is None else active
    seen = state.seen.at[rows, tokens].set(state.seen[rows, tokens] | add)
    return state.replace(seen=seen)


def seen_from_ids(ids: jax.Array, mask: jax.Array | None, vocab: int) -> jax.Array:
    """[B, vocab] bool presence mask of ids [B, S] where mask [B, S] (jittable; e.g. for prompts on device)."""
    b = ids.shape[0]
    m = jnp.ones(ids.shape, jnp.uint8) if mask is None else mask.astype(jnp.uint8)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
    return jnp.zeros((b, vocab), jnp.uint8).at[rows, ids].max(m, mode="drop") > 0


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Per-row keys [B] for one decode step: fold_in(key(seed_b), step_b). With a row's own seed and own step
    count, its draws do not depend on the other rows of the batch or on when it entered its slot."""
    seeds = jnp.asarray(seeds, jnp.uint32)
    steps = jnp.broadcast_to(jnp.asarray(steps, jnp.uint32), seeds.shape)
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)


__all__ = ["SamplingState", "make_state", "from_generation_config", "set_row", "mask_vocab", "divide_rows",
           "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p", "apply_top_k_top_p",
           "process_logits", "pick", "mark_seen", "seen_from_ids", "row_keys"]
