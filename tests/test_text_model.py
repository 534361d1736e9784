"""The LLM decoders (Qwen3.5 hybrid, Qwen3 dense) against transformers, layer by layer; padding; decode; compiles."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta

from tests.text_ref_utils import reference_llm, rel_err, text_params_from_torch
from uhd_jax.compile_counter import count_compilations
from uhd_jax.config import tiny_config
from uhd_jax.model.gated_deltanet import ChunkOptions
from uhd_jax.model.text_model import TextModel, init_cache, layer_period
from uhd_jax.parallel.axes import LOGICAL_AXIS_RULES

TOL = 1e-4


def _config(model_type, **kw):
    cfg = tiny_config(text_model=model_type).text
    if model_type == "qwen3_5_text":  # head_dim 32 -> 8 rotary dims (4 frequencies) instead of 2
        kw.setdefault("head_dim", 32)
    return dataclasses.replace(cfg, **kw)


@functools.lru_cache(maxsize=None)
def _setup(model_type, chunk_size=16, **kw):
    cfg = _config(model_type, **dict(kw))
    ref = reference_llm(cfg)
    params = text_params_from_torch(ref.state_dict(), cfg)
    model = TextModel(cfg, chunk=ChunkOptions(chunk_size))
    return cfg, ref, params, model


def _ref_forward(ref, ids, mask=None):
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                output_hidden_states=True)
    return r.logits.numpy(), [h.numpy() for h in r.hidden_states]


def _check_layers(cfg, out, ref_hidden, rows=slice(None), upto=None):
    """Reference hidden_states: embeddings, then each layer's output, the last one after the final norm."""
    sl = (rows, slice(None, upto))
    errs = {"embeds": rel_err(out["embeds"][sl], ref_hidden[0][sl])}
    for i in range(cfg.num_hidden_layers - 1):
        errs[f"layer_{i:02d}"] = rel_err(out[f"layer_{i:02d}"][sl], ref_hidden[i + 1][sl])
    errs["norm"] = rel_err(out["norm"][sl], ref_hidden[-1][sl])
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, bad
    return max(errs.values())


@pytest.mark.parametrize("model_type,seq", [("qwen3_5_text", 5), ("qwen3_5_text", 64), ("qwen3_5_text", 75),
                                            ("qwen3", 9), ("qwen3", 75)])
def test_matches_reference(model_type, seq):
    """Non-multiples of the DeltaNet chunk (16 here) included; 64 spans several chunks exactly."""
    cfg, ref, params, model = _setup(model_type)
    ids = np.random.default_rng(seq).integers(0, cfg.vocab_size, (2, seq))
    want, hidden = _ref_forward(ref, ids)
    logits, out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert rel_err(logits, want) < TOL
    _check_layers(cfg, out, hidden)


def test_untied_head_and_attention_bias():
    cfg, ref, params, model = _setup("qwen3", tie_word_embeddings=False, attention_bias=True)
    assert "lm_head" in params and "bias" in params["layers"]["layer_0"]["self_attn"]["q_proj"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
    want, hidden = _ref_forward(ref, ids)
    logits, out = model.apply({"params": params}, jnp.asarray(ids))
    assert rel_err(logits, want) < TOL
    _check_layers(cfg, out, hidden)


@pytest.mark.parametrize("chunk", [ChunkOptions(), ChunkOptions(64, "direct", "triangular_solve")])
def test_chunk_options_and_inputs_embeds(chunk):
    """The default options and the reference's chunk size 64, fed through inputs_embeds, 140 tokens."""
    cfg, ref, params, _ = _setup("qwen3_5_text")
    model = TextModel(cfg, chunk=chunk)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 140))
    want, _ = _ref_forward(ref, ids)
    embeds = jnp.asarray(params["embed_tokens"])[ids]
    logits, _ = model.apply({"params": params}, inputs_embeds=embeds)
    assert rel_err(logits, want) < TOL


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3"])
def test_right_padded_batch(model_type):
    """Each row's real tokens match the reference run with the same padding mask; pad content is irrelevant."""
    cfg, ref, params, model = _setup(model_type)
    s, lengths = 40, np.array([40, 17, 33])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (3, s))
    mask = np.arange(s)[None] < lengths[:, None]
    want, hidden = _ref_forward(ref, ids, mask)
    noisy = np.where(mask, ids, rng.integers(0, cfg.vocab_size, ids.shape))
    logits, out = jax.jit(model.apply)({"params": params}, jnp.asarray(noisy), attention_mask=jnp.asarray(mask))
    for i, n in enumerate(lengths):
        assert rel_err(logits[i, :n], want[i, :n]) < TOL, i
        _check_layers(cfg, out, hidden, rows=i, upto=n)


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3"])
def test_decode_matches_prefill(model_type):
    """Prefill a right-padded batch into the cache, then decode token by token: the logits equal a full forward."""
    cfg, _, params, model = _setup(model_type)
    rng = np.random.default_rng(2)
    b, s, steps, max_len = 3, 21, 5, 32
    lengths = np.array([21, 9, 14])
    full_len = lengths + steps
    seqs = rng.integers(0, cfg.vocab_size, (b, s + steps))
    full_mask = np.arange(s + steps)[None] < full_len[:, None]
    want, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(seqs), attention_mask=jnp.asarray(full_mask))

    mask = np.arange(s)[None] < lengths[:, None]
    cache = init_cache(cfg, b, max_len, jnp.float32)
    prefill = jax.jit(functools.partial(model.apply, last_logits_only=True))
    last, out = prefill({"params": params}, jnp.asarray(seqs[:, :s]), attention_mask=jnp.asarray(mask),
                        cache=cache)
    for i, n in enumerate(lengths):
        assert rel_err(last[i, 0], want[i, n - 1]) < TOL
    cache = out["cache"]
    np.testing.assert_array_equal(cache["lengths"], lengths)
    step = jax.jit(functools.partial(model.apply, decode=True))
    got, compiles = [], []
    for t in range(steps):
        tok = jnp.asarray(seqs[np.arange(b), lengths + t][:, None])
        with count_compilations() as c:
            logits, out = step({"params": params}, tok, cache=cache)
        compiles.append(c.count)
        cache = out["cache"]
        got.append(np.asarray(logits)[:, 0])
    for t in range(steps):
        for i, n in enumerate(lengths):
            assert rel_err(got[t][i], want[i, n + t]) < TOL, (t, i)
    assert compiles[0] == 1 and sum(compiles[1:]) == 0, compiles  # later steps reuse the first compile
    if cfg.is_hybrid:
        states = [v["state"] for v in cache["layers"].values() if "state" in v]
        assert states and all(x.dtype == jnp.float32 for x in states)


def test_no_recompile_same_shapes():
    cfg, _, params, model = _setup("qwen3_5_text")
    f = jax.jit(model.apply)
    rng = np.random.default_rng(0)
    calls = []
    for lengths in ([24, 24], [24, 13], [5, 20]):  # same shapes, different tokens and padding
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)))
        mask = jnp.asarray(np.arange(24)[None] < np.array(lengths)[:, None])
        with count_compilations() as c:
            f({"params": params}, ids, attention_mask=mask)[0].block_until_ready()
        calls.append(c.count)
    assert calls == [1, 0, 0], calls


def test_gradients_match_reference_and_remat():
    """d(sum(logits * w))/d(params) against torch autograd, with and without rematerialisation."""
    cfg, ref, params, _ = _setup("qwen3_5_text")
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.vocab_size, (2, 23))
    w = rng.standard_normal((2, 23, cfg.vocab_size)).astype(np.float32)
    ref.zero_grad()
    (ref(torch.from_numpy(ids)).logits * torch.from_numpy(w)).sum().backward()
    tgrads = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    want = text_params_from_torch(tgrads, cfg)
    for policy in ("none", "full"):
        model = TextModel(cfg, chunk=ChunkOptions(16), remat_policy=policy)
        loss = lambda p: jnp.sum(model.apply({"params": p}, jnp.asarray(ids))[0] * w)
        got = jax.jit(jax.grad(loss))(params)
        errs = jax.tree.map(rel_err, got, want)
        worst = max(jax.tree.leaves(errs))
        assert worst < 1e-3, (policy, {k: v for k, v in jax.tree_util.tree_flatten_with_path(errs)[0] if v > 1e-3})


def test_parameters_carry_known_logical_axes():
    names = {r[0] for r in LOGICAL_AXIS_RULES}
    for mt in ("qwen3_5_text", "qwen3"):
        cfg = _config(mt)
        variables = jax.eval_shape(lambda: TextModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
        leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, meta.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, meta.Partitioned), leaf
            assert set(leaf.names) <= names and len(leaf.names) == leaf.value.ndim, leaf.names
        period = layer_period(cfg.layer_types)
        assert period == (4 if mt == "qwen3_5_text" else 1)
        stacked = variables["params"]["layers"]["layer_0"]["mlp"]["up_proj"]["kernel"]
        assert stacked.names[0] == "layers" and stacked.value.shape[0] == cfg.num_hidden_layers // period


def test_flops_formula_matches_xla_cost_analysis():
    """One scanned block (3 DeltaNet + 1 attention layer) at the real widths, forward and backward, on CPU where
    XLA's cost analysis sees every dot; the formula the benchmark reports must agree."""
    from uhd_jax.config import reference_config
    from uhd_jax.model.text_flops import text_forward_flops
    from uhd_jax.model.text_layers import rope_cos_sin
    from uhd_jax.model.text_model import DecoderBlock

    cfg = reference_config().text
    b, s = 1, 256
    block = DecoderBlock(cfg, cfg.layer_types[:4], attention_impl="xla")

    def ctx():
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(s), (b, s)), cfg.rotary_dim, cfg.rope_theta)
        return {"cos": cos, "sin": sin, "mask": None, "lengths": None, "index": None}

    x = jax.ShapeDtypeStruct((b, s, cfg.hidden_size), jnp.float32)
    params = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), None, ctx()))
    fwd = lambda p, x: block.apply(p, x, None, ctx())[0]
    f = text_forward_flops(cfg, b, s)
    per_block = (f["total"] - f["lm_head"]) / (cfg.num_hidden_layers // 4)
    # the xla attention path computes the full square; the formula counts the causal half
    full_square = 2 * 2 * cfg.num_attention_heads * cfg.head_dim * s * s - f["attn_scores"] / (cfg.num_hidden_layers // 4)
    for fn, mult in ((fwd, 1), (jax.grad(lambda p, x: jnp.sum(fwd(p, x)), argnums=(0, 1)), 3)):
        ca = jax.jit(fn).lower(params, x).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        ratio = ca["flops"] / (mult * (per_block + full_square))
        assert 0.97 < ratio < 1.05, (mult, ratio)


@pytest.mark.parametrize("model_type,tied", [("qwen3_5_text", True), ("qwen3", False)])
def test_padded_vocab_logits(model_type, tied):
    """Vocab 500 padded to 768 in our parameters: real logits are the reference's; padded columns hold the most
    negative float32, so softmax gives them exactly 0 and logsumexp is the unpadded model's; the argmax never lands
    in the padding, even with padded rows that would win every position if they counted (prefill and decode)."""
    cfg, ref, params, model = _setup(model_type, vocab_size=500, vocab_pad_multiple=384, tie_word_embeddings=tied)
    v, vp = cfg.vocab_size, cfg.padded_vocab_size
    assert vp == 768 and params["embed_tokens"].shape == (vp, cfg.hidden_size)
    ids = np.random.default_rng(6).integers(0, v, (2, 13))
    want, _ = _ref_forward(ref, ids)
    logits, out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert logits.shape == (2, 13, vp) and rel_err(logits[..., :v], want) < TOL
    assert np.all(np.asarray(logits[..., v:]) == np.finfo(np.float32).min)

    unpadded_cfg = cfg.replace(vocab_pad_multiple=1)
    unpadded = dict(params, embed_tokens=params["embed_tokens"][:v])
    if not tied:
        unpadded["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :v]}
    plain, _ = jax.jit(TextModel(unpadded_cfg, chunk=ChunkOptions(16)).apply)({"params": unpadded}, jnp.asarray(ids))
    assert plain.shape == (2, 13, v) and rel_err(logits[..., :v], plain) < 1e-6
    probs = jax.nn.softmax(logits, axis=-1)
    assert np.all(np.asarray(probs[..., v:]) == 0) and rel_err(probs[..., :v], jax.nn.softmax(plain, -1)) < 1e-6
    assert rel_err(jax.nn.logsumexp(logits, -1), jax.nn.logsumexp(plain, -1)) < 1e-6

    # padded rows pointing along each position's hidden state, 100x longer: unmasked, they would always win
    h = np.asarray(out["norm"]).reshape(-1, cfg.hidden_size)
    poison = np.zeros((vp - v, cfg.hidden_size), np.float32)
    poison[:h.shape[0]] = 100 * h
    poisoned = dict(params)
    if tied:
        poisoned["embed_tokens"] = np.concatenate([params["embed_tokens"][:v], poison])
    else:
        poisoned["lm_head"] = {"kernel": np.concatenate([params["lm_head"]["kernel"][:, :v], poison.T], 1)}
    table = np.asarray(poisoned["embed_tokens"] if tied else poisoned["lm_head"]["kernel"].T)
    assert np.all((h @ table.T).argmax(-1) >= v)
    logits, _ = jax.jit(model.apply)({"params": poisoned}, jnp.asarray(ids))
    assert np.all(np.asarray(logits.argmax(-1)) < v) and rel_err(logits[..., :v], want) < TOL
    cache = init_cache(cfg, 2, 16, jnp.float32)
    last, out = model.apply({"params": poisoned}, jnp.asarray(ids), cache=cache, last_logits_only=True)
    step, _ = model.apply({"params": poisoned}, last.argmax(-1).astype(jnp.int32), cache=out["cache"], decode=True)
    assert np.all(np.asarray(last.argmax(-1)) < v) and np.all(np.asarray(step.argmax(-1)) < v)
    assert np.all(np.asarray(step[..., v:]) == np.finfo(np.float32).min)
