"""The engine's `pick_fn` from `uhd_jax.infer.sampling`: per-request temperature / top-k / top-p / repetition
penalty / seed in the Generator and the SlotEngine.

The engine (engine.py) and the sampling functions (sampling.py) meet here:

    pick_fn = make_pick_fn(cfg.text)                       # one compiled picker for any mix of settings
    params = request_params(temperature=0.7, top_p=0.8)   # one request's settings: a dict of scalars
    engine = SlotEngine(model, params_tree, proc, ..., pick_fn=pick_fn, sampling_defaults=request_params())
    engine.submit(Request(sample, max_new_tokens=64, seed=3, sampling=params))
    # or the batch Generator: Generator(model, pick_fn=pick_fn).generate(..., key=[seed per row],
    #                                     sampling_params=stack_params([params_row0, params_row1, ...]))

The per-row parameters travel with the request through the engine's `PickContext.params` (leaves [B]); the
picker is stateless: the repetition penalty's seen-token mask is rebuilt at each step from the context's prompt
ids (all of them, image placeholders included, as transformers' `input_ids`) and the tokens the row generated so
far, so a slot taking a new request carries nothing over. Draws use the context's per-row key (the request's
seed folded with its step count), so a seeded request gives the same tokens in any slot, batch position or
company. Greedy rows (do_sample False or temperature 0) take the argmax after the repetition penalty, exactly as
transformers' greedy search with `repetition_penalty` does.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from uhd_jax.config import TextConfig
from uhd_jax.infer.engine import PickContext
from uhd_jax.infer.sampling import SamplingState, pick, seen_from_ids

KEYS = ("temperature", "top_k", "top_p_cut", "repetition_penalty", "do_sample")

# transformers' GenerationConfig defaults (what generation_config.json leaves out means these)
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def request_params(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   do_sample: bool = True) -> dict:
    """One request's sampling settings as the picker reads them (numpy scalars). Validated as transformers does
    (ValueError naming the setting): temperature >= 0 (0: greedy), top_p in [0, 1], repetition_penalty > 0.
    top_k <= 0 is off. top_p is stored as its cut 1 - top_p, computed in float64 as transformers does."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not np.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    cut = 1.0 - float(top_p) if top_p < 1.0 else 0.0
    return {"temperature": np.float32(temperature), "top_k": np.int32(top_k), "top_p_cut": np.float32(cut),
            "repetition_penalty": np.float32(repetition_penalty), "do_sample": np.bool_(do_sample)}


def params_from_generation_config(gen: dict, **overrides) -> dict:
    """request_params from a generation_config.json dict (transformers' defaults for what it leaves out); keyword
    `overrides` (not None) replace its values."""
    g = dict(HF_DEFAULTS)
    g.update({k: v for k, v in gen.items() if k in g and v is not None})
    g.update({k: v for k, v in overrides.items() if v is not None})
    return request_params(**g)


def stack_params(rows: Sequence[dict]) -> dict:
    """Per-row settings [B] (the Generator's `sampling_params`) from one request_params dict per row."""
    return {k: jnp.asarray(np.stack([np.asarray(r[k]) for r in rows])) for k in KEYS}


def make_pick_fn(text: TextConfig):
    """A pick_fn for the engine: `sampling.pick` with each row's settings (ctx.params, request_params' keys) and
    a repetition penalty over the row's prompt + generated tokens. With ctx.params None every row is greedy."""
    vocab = text.vocab_size

    def pick_fn(logits, ctx: PickContext):
        if ctx.params is None:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        b, n = ctx.generated.shape
        gen_mask = jnp.arange(n)[None, :] < ctx.step[:, None]
        ids = jnp.concatenate([ctx.prompt, jnp.maximum(ctx.generated, 0)], axis=1)
        mask = jnp.concatenate([ctx.prompt_mask, gen_mask], axis=1)
        p = ctx.params
        state = SamplingState(temperature=p["temperature"], top_k=p["top_k"], top_p_cut=p["top_p_cut"],
                              repetition_penalty=p["repetition_penalty"], do_sample=p["do_sample"],
                              seen=seen_from_ids(ids, mask, logits.shape[-1]), vocab_size=vocab)
        return pick(logits, state, ctx.key)

    return pick_fn


__all__ = ["request_params", "params_from_generation_config", "stack_params", "make_pick_fn", "HF_DEFAULTS"]
