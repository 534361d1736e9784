"""Beam search over the full model: `beam.beam_search` driven by `MiniCPMV.prefill` / `MiniCPMV.decode_step`.

    gen = BeamGenerator(model, num_beams=3, eos_token_ids=proc.eos_token_ids, pad_token_id=proc.pad_token_id,
                        repetition_penalty=1.2)
    out = gen.generate(params, batch, max_new_tokens=64)   # out.tokens[b]: the best hypothesis of row b

One jit: prefill of the batch (images encoded once per prompt, not once per beam) into a cache of B rows, then
`beam_search` with step = one decode step of all B*n beams and reorder = the DecodeCache's row gather
(`DecodeCache.take`, which also expands the prefilled cache to the beams). The repetition penalty sees each
prompt's ids (image placeholders included, as transformers' `input_ids`) and each beam's own tokens. Semantics
are transformers' `generate(num_beams=n, do_sample=False)` (see beam.py); tests/test_generate_beam.py checks
the full model token for token against `MiniCPMV4_6ForConditionalGeneration.generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.data.batch import ModelBatch, check_text_slots
from uhd_jax.infer.beam import beam_search
from uhd_jax.infer.cache import DecodeCache, init_cache
from uhd_jax.infer.engine import CacheCapacityError, decode_variables
from uhd_jax.infer.sampling import seen_from_ids
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement
from uhd_jax.model.text_model import check_padding, unstack_cache


@dataclasses.dataclass
class BeamGeneration:
    """Per row: the best hypothesis (its eos included when one ended it) and its finish reason ("stop" or
    "length"); all hypotheses best first with their scores (transformers' sequences_scores). Rows without
    prompt tokens get empty tokens and None."""

    tokens: list[np.ndarray]
    finish_reasons: list[str | None]
    hypotheses: list[list[np.ndarray]]
    scores: np.ndarray  # [B, n]


class BeamGenerator:
    def __init__(self, model: MiniCPMV, *, num_beams: int, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 repetition_penalty: float = 1.0, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 cache_dtype=None):
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.model = model
        self.num_beams = int(num_beams)
        self.eos = tuple(int(e) for e in eos_token_ids)
        self.settings = dict(num_beams=self.num_beams, eos_token_ids=self.eos, pad_token_id=int(pad_token_id),
                             vocab_size=model.config.text.vocab_size, repetition_penalty=float(repetition_penalty),
                             length_penalty=float(length_penalty), early_stopping=early_stopping)
        self.cache_dtype = jnp.dtype(model.dtype if cache_dtype is None else cache_dtype)
        self._run = jax.jit(self._run_impl, static_argnames=("max_new_tokens", "capacity"))

    def _run_impl(self, params, batch, *, max_new_tokens, capacity):
        model, variables = self.model, {"params": params}
        b = batch.input_ids.shape[0]
        cache = init_cache(model.config, b, capacity, self.cache_dtype, cuts=model.cuts)
        logits, cache = model.apply(variables, batch, cache, method=MiniCPMV.prefill)

        step_vars = decode_variables(params)
        cache = cache.replace(layers=unstack_cache(cache.layers))  # carried per block through the beam loop

        def step(c: DecodeCache, tok):
            return model.apply(step_vars, tok, c, method=MiniCPMV.decode_step)

        seen = seen_from_ids(jnp.asarray(batch.input_ids, jnp.int32), jnp.asarray(batch.attention_mask, bool),
                             logits.shape[-1])
        return beam_search(step, lambda c, idx: c.take(idx), cache, logits, seen, max_new_tokens=max_new_tokens,
                           **self.settings)

    def generate(self, params, batch: ModelBatch, *, max_new_tokens: int, capacity: int | None = None
                 ) -> BeamGeneration:
        """Beam search for every row of `batch`. capacity: cache slots per beam (default prompt width +
        max_new_tokens); CacheCapacityError (nothing runs) if a prompt + max_new_tokens does not fit."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_padding(batch.attention_mask)
        check_visual_placement(batch, self.model.config.image_token_id)
        if self.model.cuts.any and batch.text_slots is not None:  # a cut model's compaction must hold every text token
            check_text_slots(batch.attention_mask, batch.visual_mask, batch.text_slots)
        ids = np.asarray(batch.input_ids)
        lengths = np.asarray(batch.attention_mask, bool).sum(-1)
        capacity = ids.shape[1] + max_new_tokens if capacity is None else int(capacity)
        bad = np.flatnonzero(lengths + max_new_tokens > capacity)
        if len(bad):
            raise CacheCapacityError("; ".join(f"row {r}: {lengths[r]} prompt + {max_new_tokens} new tokens > "
                                               f"capacity {capacity}" for r in bad))
        res = jax.device_get(self._run(params, batch, max_new_tokens=int(max_new_tokens), capacity=capacity))
        tokens, out_len, scores = np.asarray(res.tokens), np.asarray(res.lengths), np.asarray(res.scores)
        best, reasons, hyps = [], [], []
        for r in range(ids.shape[0]):
            if lengths[r] == 0:
                best.append(np.zeros(0, np.int32))
                reasons.append(None)
                hyps.append([])
                continue
            h = [tokens[r, j, :out_len[r, j]] for j in range(self.num_beams)]
            hyps.append(h)
            best.append(h[0])
            reasons.append("stop" if len(h[0]) and int(h[0][-1]) in self.eos else "length")
        return BeamGeneration(tokens=best, finish_reasons=reasons, hypotheses=hyps, scores=scores)


__all__ = ["BeamGenerator", "BeamGeneration"]
