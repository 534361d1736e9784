"""Packed rows: several samples in one row, told apart by per-token segment ids.

`segment_ids` [B, S] int (the packer numbers a row's samples 1, 2, ... and gives padding 0): a new sample starts
wherever the id differs from the previous token's. Every mixer of the LLM resets there, so each sample computes
what it would alone: full attention is causal and within the sample, the DeltaNet's causal conv sees no input of
the previous sample, and its recurrent state restarts from zero. Only boundaries matter (the functions below
turn ids into runs), so ids need not be unique across a row as long as neighbouring samples differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids):
    """[B, S] bool: True where a new sample starts (the id differs from the previous token's). Position 0 is
    False: the first token continues whatever came before the row (an initial state), as without segments."""
    seg = jnp.asarray(segment_ids)
    return jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def segment_runs(segment_ids):
    """[B, S] int32 run index: 0 for the row's first sample, +1 at every start. Equal runs = the same sample."""
    return jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)


def segment_positions(segment_ids):
    """[B, S] int32 positions that restart at 0 at every sample start (what the packer writes)."""
    starts = segment_starts(segment_ids)
    s = starts.shape[1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), starts.shape)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


def same_segment_mask(runs):
    """runs [B, S] -> bool [B, 1, S, S]: query t may attend key s only inside its own sample (combine with causal
    and the length mask). Broadcast over heads, so one mask serves every head (and cuDNN's [B, 1, T, S] bias)."""
    return (runs[:, :, None] == runs[:, None, :])[:, None]
