"""Beam search against transformers' generate(num_beams=3, do_sample=False, repetition_penalty=1.2), token for
token, on a tiny random Qwen3 (and the hybrid Qwen3.5) whose weights our TextModel loads: several prompts and prompt
lengths in one right-padded batch, hypotheses ending early on eos, vocabulary padding, length penalty and
early-stopping modes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.text_ref_utils import reference_llm, text_params_from_torch
from uhd_jax.config import tiny_config
from uhd_jax.infer.beam import beam_search, reorder_text_cache
from uhd_jax.infer.sampling import seen_from_ids
from uhd_jax.model.text_model import TextModel, init_cache

PAD = 7  # not 0: transformers fills finished hypotheses with `pad_token_id or eos_token_id[0]`, so a pad id of 0
# would come out as the first eos id there
LENGTHS = (5, 9, 13)  # prompt lengths, one right-padded batch


@functools.lru_cache(maxsize=None)
def _setup(model_type="qwen3"):
    # vocab 500 padded to 512 inside our parameters: padded columns must never enter a beam
    cfg = dataclasses.replace(tiny_config(text_model=model_type).text, vocab_size=500)
    assert cfg.padded_vocab_size == 512
    ref = reference_llm(cfg, seed=3)
    params = text_params_from_torch(ref.state_dict(), cfg)
    return cfg, ref, params


def _prompts(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, cfg.vocab_size, n) for n in LENGTHS]


@functools.lru_cache(maxsize=None)
def _runner(model_type, max_new, eos, length_penalty, early_stopping):
    cfg, _, _ = _setup(model_type)
    model = TextModel(cfg)
    s = max(LENGTHS)

    @jax.jit
    def run(params, ids, mask):
        cache = init_cache(cfg, ids.shape[0], s + max_new, jnp.float32)
        logits, out = model.apply({"params": params}, ids, attention_mask=mask, cache=cache, last_logits_only=True)

        def step(cache, tok):
            lg, o = model.apply({"params": params}, tok[:, None], cache=cache, decode=True)
            return lg[:, 0], o["cache"]

        return beam_search(step, reorder_text_cache, out["cache"], logits[:, 0],
                           seen_from_ids(ids, mask, cfg.padded_vocab_size), num_beams=3, max_new_tokens=max_new,
                           eos_token_ids=eos, pad_token_id=PAD, vocab_size=cfg.vocab_size, repetition_penalty=1.2,
                           length_penalty=length_penalty, early_stopping=early_stopping)
    return run


def _ours(model_type, prompts, max_new, eos, length_penalty=1.0, early_stopping=False):
    cfg, _, params = _setup(model_type)
    s = max(LENGTHS)
    ids = np.zeros((len(prompts), s), np.int32)
    mask = np.zeros((len(prompts), s), bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, True
    r = _runner(model_type, max_new, tuple(eos), length_penalty, early_stopping)(params, ids, mask)
    return jax.tree.map(np.asarray, r)


def _theirs(model_type, prompt, max_new, eos, length_penalty=1.0, early_stopping=False):
    _, ref, _ = _setup(model_type)
    with torch.no_grad():
        out = ref.generate(torch.from_numpy(prompt[None]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           num_beams=3, do_sample=False, repetition_penalty=1.2, max_new_tokens=max_new,
                           eos_token_id=list(eos) or None, pad_token_id=PAD, length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return_sequences=3, return_dict_in_generate=True,
                           output_scores=True)
    return out.sequences[:, len(prompt):].numpy(), out.sequences_scores.numpy()


def _eos_from_free_run(model_type, prompts, max_new, picks=((0, 1), (2, 2))):
    """Tokens the no-eos beams emit early (picks: (prompt, position) of the best hypothesis; by default the 2nd
    token of prompt 0 and the 3rd of prompt 2): as eos they end hypotheses early."""
    seqs = {i: _theirs(model_type, prompts[i], max_new, ())[0][0] for i in {i for i, _ in picks}}
    eos = tuple(sorted({int(seqs[i][j]) for i, j in picks}))
    assert PAD not in eos
    return eos


def _compare(model_type, prompts, max_new, eos, **kw):
    ours = _ours(model_type, prompts, max_new, eos, **kw)
    for i, p in enumerate(prompts):
        want, scores = _theirs(model_type, p, max_new, eos, **kw)  # all 3 finished hypotheses, best first
        for j in range(3):
            n = int(ours.lengths[i, j])
            # transformers pads its hypotheses to the longest one with pad_token_id
            np.testing.assert_array_equal(ours.tokens[i, j, :want.shape[1]], want[j], err_msg=f"prompt {i} beam {j}")
            assert np.all(want[j, n:] == PAD) and want[j, n - 1] != PAD
            assert np.all(ours.tokens[i, j, n:] == PAD)
        np.testing.assert_allclose(ours.scores[i], scores, rtol=1e-5, err_msg=f"prompt {i}")
    return ours


@pytest.mark.parametrize("max_new", [6, 10])
def test_beam_matches_transformers(max_new):
    prompts = _prompts(_setup()[0])
    eos = _eos_from_free_run("qwen3", prompts, max_new)
    ours = _compare("qwen3", prompts, max_new, eos)
    assert ours.lengths.min() < max_new, ours.lengths  # some hypotheses ended on eos before max_new_tokens
    assert np.all(ours.tokens < 500)  # never a padded vocabulary column


def test_beam_without_eos_and_other_prompts():
    """No eos at all (every hypothesis runs to max_new_tokens); a different prompt draw."""
    prompts = _prompts(_setup()[0], seed=1)
    ours = _compare("qwen3", prompts, 7, ())
    assert np.all(ours.lengths == 7) and int(ours.steps) == 7


@pytest.mark.parametrize("length_penalty,early_stopping", [(2.0, True), (-0.5, "never")])
def test_beam_length_penalty_and_early_stopping(length_penalty, early_stopping):
    prompts = _prompts(_setup()[0], seed=2)
    eos = _eos_from_free_run("qwen3", prompts, 8)
    _compare("qwen3", prompts, 8, eos, length_penalty=length_penalty, early_stopping=early_stopping)


def test_beam_hybrid_deltanet_cache():
    """MiniCPM-V 4.6's LLM: the DeltaNet conv/recurrent states are reordered with the beams too."""
    prompts = _prompts(_setup("qwen3_5_text")[0], seed=3)[::2]  # lengths 5 and 13 (its reference runs slowly)
    eos = _eos_from_free_run("qwen3_5_text", prompts, 6, picks=((0, 0), (1, 1)))
    ours = _compare("qwen3_5_text", prompts, 6, eos)
    assert ours.lengths.min() < 6, ours.lengths
