"""Next-token choice against transformers' logits processors: each processor's float output (-inf where filtered),
the order generate applies them in, per-row settings in one batch, ties, vocabulary padding, sampling frequencies,
and one compile for a while_loop whose rows change settings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from uhd_jax.compile_counter import count_compilations
from uhd_jax.infer import sampling as S

V = 64
# one row per column: a spread of settings, each processor on and off somewhere, extremes included
TEMPS = [0.7, 1.0, 1.3, 0.5, 2.0, 1.0, 0.9, 0.25]
TOPK = [0, 5, 1, 10, 64, 3, 80, 0]  # 80 > V keeps all
TOPP = [1.0, 0.9, 0.5, 0.95, 0.3, 0.8, 0.0, 0.6]  # 0.0 keeps only the most probable
REP = [1.2, 1.0, 0.8, 1.5, 1.1, 1.0, 1.3, 2.0]
B = len(TEMPS)


def _logits(kind: str, seed: int, b=B, v=V) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, (b, v))
    if kind == "ties":  # a coarse grid: many equal scores, including around the top-k / top-p cuts
        x = np.round(x * 2) / 2
    return x.astype(np.float32)


def _seen(seed: int, b=B, v=V) -> np.ndarray:
    ids = np.random.default_rng(seed + 100).integers(0, v, (b, 12))
    seen = np.zeros((b, v), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    return seen, ids


def _state(seen_ids, **kw):
    kw = {"temperature": TEMPS, "top_k": TOPK, "top_p": TOPP, "repetition_penalty": REP, **kw}
    return S.make_state(B, vocab_size=V, prompt_ids=seen_ids, **kw)


def _same(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), what
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[fin], want[fin], err_msg=what)


def _torch_row(proc, ids_row, scores_row):
    return proc(torch.from_numpy(ids_row[None]), torch.from_numpy(scores_row[None].copy()))[0].numpy()


def _top_p_tie_ok(got, want, what):
    """Our top-p keeps a superset of transformers' tokens, the extra ones tied with transformers' smallest kept
    score (its unstable sort may cut through a run of equal scores)."""
    kept_g, kept_w = np.isfinite(got), np.isfinite(want)
    assert np.all(kept_g >= kept_w), what
    extra = kept_g & ~kept_w
    if extra.any():
        assert np.all(got[extra] == want[kept_w].min()), what
    np.testing.assert_array_equal(got[kept_w], want[kept_w], err_msg=what)


@pytest.mark.parametrize("kind,seed", [("normal", 0), ("normal", 1), ("ties", 2), ("ties", 3)])
def test_each_processor_matches_transformers(kind, seed):
    """Per row its own settings (one batch, one call each); every stage compared on the same input."""
    x = _logits(kind, seed)
    seen, ids = _seen(seed)
    st = _state(ids)
    np.testing.assert_array_equal(st.seen, seen)

    ours_rep = np.asarray(jax.jit(S.apply_repetition_penalty)(x, st.seen, st.repetition_penalty))
    ours_t = np.asarray(jax.jit(S.apply_temperature)(ours_rep, st.temperature))
    ours_k = np.asarray(jax.jit(S.apply_top_k)(ours_t, st.top_k))
    ours_p = np.asarray(jax.jit(S.apply_top_p)(ours_k, st.top_p_cut))
    fused = np.asarray(jax.jit(S.apply_top_k_top_p)(ours_t, st.top_k, st.top_p_cut))
    for i in range(B):
        rep = _torch_row(RepetitionPenaltyLogitsProcessor(REP[i]), ids[i], x[i])
        _same(ours_rep[i], rep, f"repetition penalty row {i}")
        t = _torch_row(TemperatureLogitsWarper(TEMPS[i]), ids[i], rep)
        _same(ours_t[i], t, f"temperature row {i}")
        k = _torch_row(TopKLogitsWarper(TOPK[i]), ids[i], t) if TOPK[i] > 0 else t
        _same(ours_k[i], k, f"top-k row {i}")
        p = _torch_row(TopPLogitsWarper(TOPP[i]), ids[i], k) if TOPP[i] < 1 else k
        if kind == "normal":
            _same(ours_p[i], p, f"top-p row {i}")
        else:
            _top_p_tie_ok(ours_p[i], p, f"top-p row {i}")
        _same(fused[i], ours_p[i], f"fused top-k/top-p row {i}")  # one sort == the two warpers in sequence


@functools.lru_cache(maxsize=None)
def _tiny_hf_model():
    cfg = Qwen3Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind,seed", [("normal", 4), ("ties", 5)])
def test_generate_order_matches_transformers(kind, seed):
    """process_logits == the processor list `generate` builds (its own order), row by row, sampling and greedy."""
    x = _logits(kind, seed)
    _, ids = _seen(seed)
    do_sample = [True] * (B - 2) + [False, False]
    st = _state(ids, do_sample=do_sample)
    got = np.asarray(jax.jit(S.process_logits)(jnp.asarray(x), st))
    model = _tiny_hf_model()
    for i in range(B):
        gc = GenerationConfig(do_sample=do_sample[i], temperature=TEMPS[i], top_k=TOPK[i], top_p=TOPP[i],
                              repetition_penalty=REP[i])
        procs = model._get_logits_processor(gc, input_ids_seq_length=ids.shape[1], device="cpu",
                                            model_kwargs={"attention_mask": torch.ones(1, ids.shape[1])})
        want = procs(torch.from_numpy(ids[i][None]), torch.from_numpy(x[i][None].copy()))[0].numpy()
        if kind == "normal":
            _same(got[i], want, f"row {i}")
        else:
            _top_p_tie_ok(got[i], want, f"row {i}")
    # greedy rows: the argmax of the penalised scores, as transformers' greedy search takes
    toks = np.asarray(jax.jit(S.pick)(jnp.asarray(x), st, jax.random.key(0)))
    for i in (B - 2, B - 1):
        rep = _torch_row(RepetitionPenaltyLogitsProcessor(REP[i]), ids[i], x[i])
        assert toks[i] == int(np.argmax(rep))


def test_top_p_hand_cases():
    """Worked by hand. Row 0: probabilities .1 .2 .3 .4, top_p .75: ascending cumulative .1 .3 .6 1.0, removed where
    <= .25, so only the .1 token goes. Row 1: four equal scores, top_p .5: cumulative .25 .5 .75 1, so transformers
    removes two of the four (which two depends on its sort); we keep all four, tied with the smallest kept one."""
    x = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]], np.float32))
    got = np.asarray(S.apply_top_p(jnp.asarray(x), jnp.asarray([np.float32(1 - 0.75), np.float32(1 - 0.5)])))
    np.testing.assert_array_equal(np.isfinite(got), [[False, True, True, True], [True, True, True, True]])
    want = TopPLogitsWarper(0.5)(None, torch.from_numpy(x[1:].copy()))[0].numpy()
    assert np.isfinite(want).sum() == 2
    # top-k keeps ties with the k-th value (transformers: scores < kth are removed): k=2 over 3, 5, 5, 1 keeps both 5s
    got = np.asarray(S.apply_top_k(jnp.asarray([[3.0, 5.0, 5.0, 1.0]]), jnp.asarray([2])))
    np.testing.assert_array_equal(np.isfinite(got), [[False, True, True, False]])


def test_temperature_zero_is_greedy_and_padding_never_picked():
    """temperature 0 means greedy; padded vocab columns (here given the highest scores of all) never win."""
    b, vocab, padded = 4, 50, 64
    x = np.random.default_rng(0).normal(0, 1, (b, padded)).astype(np.float32)
    x[:, vocab:] = 100.0
    st = S.make_state(b, vocab_size=vocab, padded_vocab_size=padded, temperature=[0.0, 1.0, 0.0, 5.0],
                      top_k=0, top_p=1.0)
    np.testing.assert_array_equal(st.greedy, [True, False, True, False])
    f = jax.jit(S.pick)
    for step in range(50):
        toks = np.asarray(f(jnp.asarray(x), st, S.row_keys(jnp.arange(b), step)))
        assert np.all(toks < vocab)
        np.testing.assert_array_equal(toks[[0, 2]], np.argmax(x[[0, 2], :vocab], -1))


def test_sampled_frequencies_follow_processed_distribution():
    """Draws for one row setting (temperature 0.8, top_k 6, top_p 0.9, penalty 1.3) follow softmax(processed);
    filtered tokens are never drawn."""
    v, n = 12, 6000
    x = np.random.default_rng(7).normal(0, 1.5, (1, v)).astype(np.float32)
    st = S.make_state(1, vocab_size=v, temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.3,
                      prompt_ids=np.array([[0, 3, 5]]))
    proc = np.asarray(S.process_logits(jnp.asarray(x), st))[0]
    p = np.exp(proc - proc[np.isfinite(proc)].max())
    p /= p.sum()
    keys = jax.random.split(jax.random.key(3), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: S.pick(jnp.asarray(x), st, k[None])[0]))(keys))
    counts = np.bincount(draws, minlength=v)
    assert counts[p == 0].sum() == 0
    # every kept token within 4.5 standard deviations of its expected count
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4.5 * sd + 1e-9), (counts, n * p)


def test_rows_independent_of_batch_and_mark_seen():
    """With per-row keys a row draws the same token alone or in a batch; mark_seen only marks active rows."""
    x = _logits("normal", 9)
    _, ids = _seen(9)
    st = _state(ids)
    keys = S.row_keys(jnp.arange(B) + 11, 3)
    pick = jax.jit(S.pick)
    full = np.asarray(pick(jnp.asarray(x), st, keys))
    for i in (0, 3, 6):
        one = jax.tree.map(lambda a: a[i:i + 1], st)
        assert int(pick(jnp.asarray(x[i:i + 1]), one, keys[i:i + 1])[0]) == full[i]
    # set_row: slot 2 takes row 5's settings and seen mask
    moved = jax.jit(S.set_row)(st, 2, jax.tree.map(lambda a: a[5:6], st))
    for f in ("temperature", "top_k", "top_p_cut", "repetition_penalty", "do_sample", "seen"):
        np.testing.assert_array_equal(getattr(moved, f)[2], getattr(st, f)[5])
        np.testing.assert_array_equal(getattr(moved, f)[1], getattr(st, f)[1])
    tok = jnp.asarray(np.arange(B) * 7 % V, jnp.int32)
    active = jnp.asarray(np.arange(B) % 2 == 0)
    st2 = S.mark_seen(st.replace(seen=jnp.zeros_like(st.seen)), tok, active)
    want = np.zeros((B, V), bool)
    want[np.arange(B)[::2], np.asarray(tok)[::2]] = True
    np.testing.assert_array_equal(st2.seen, want)
    mask = np.arange(12)[None] < np.array([12, 3, 0, 7, 12, 1, 5, 9])[:, None]
    ref = S.make_state(B, vocab_size=V, prompt_ids=ids, prompt_mask=mask).seen
    np.testing.assert_array_equal(S.seen_from_ids(jnp.asarray(ids), jnp.asarray(mask), V), ref)


def test_while_loop_one_compile_for_any_settings():
    """A decode-style while_loop with pick + mark_seen compiles once; new per-row settings reuse it."""
    b, v, steps = 3, 32, 6

    @jax.jit
    def run(logits, st, seeds):
        def body(c):
            t, st, out = c
            tok = S.pick(logits + t.astype(jnp.float32) * 0.1, st, S.row_keys(seeds, t))
            return t + 1, S.mark_seen(st, tok), out.at[:, t].set(tok)
        return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, st, jnp.zeros((b, steps), jnp.int32)))[2]

    x = jnp.asarray(np.random.default_rng(0).normal(0, 2, (b, v)).astype(np.float32))
    counts, outs = [], []
    for kw in [dict(temperature=0.0, repetition_penalty=1.5), dict(temperature=[0.5, 1.0, 0.0], top_k=[3, 0, 0]),
               dict(top_p=[0.9, 0.5, 1.0], repetition_penalty=[1.0, 2.0, 1.2], do_sample=[True, False, True])]:
        st = S.make_state(b, vocab_size=v, **kw)
        with count_compilations() as c:
            outs.append(np.asarray(run(x, st, jnp.arange(b))))
        counts.append(c.count)
    assert counts[0] >= 1 and counts[1:] == [0, 0], counts
    # the all-greedy run against a plain numpy loop of transformers' rule (penalise seen tokens, take the argmax)
    xs, seen = np.asarray(x), np.zeros((b, v), bool)
    for t in range(steps):
        s = xs + np.float32(t * 0.1)
        s = np.where(seen, np.where(s < 0, s * np.float32(1.5), s / np.float32(1.5)), s)
        tok = s.argmax(-1)
        np.testing.assert_array_equal(outs[0][:, t], tok)
        seen[np.arange(b), tok] = True


def test_make_state_validates():
    with pytest.raises(ValueError):
        S.make_state(2, vocab_size=8, top_p=1.5)
    with pytest.raises(ValueError):
        S.make_state(2, vocab_size=8, repetition_penalty=0.0)
    with pytest.raises(ValueError):
        S.make_state(2, vocab_size=8, temperature=[1.0, 2.0, 3.0])
    st = S.from_generation_config({"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                                   "repetition_penalty": 1.0}, 2, vocab_size=8)
    np.testing.assert_allclose(st.temperature, 0.7)
    assert np.all(st.do_sample) and np.all(st.top_k == 0) and np.all(st.top_p_cut == 0)
    # top_p 0.9: the cut is float32(1 - 0.9 in float64) = float32(0.09999999999999998), not 1 - float32(0.9)
    st = S.make_state(1, vocab_size=8, top_p=0.9)
    assert st.top_p_cut[0] == np.float32(1 - 0.9) != np.float32(1) - np.float32(0.9)
