"""Packing several samples into one row (PackerConfig.pack / data.pack): the packer's rows, and a packed row computing
at each sample's positions what the sample computes alone (full attention, DeltaNet conv and recurrent state reset
at every sample start), the loss, and a trainer run. Each equality test has a twin that removes one reset
(monkeypatching its mask) and must then see a difference, so none of them can pass vacuously."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.data_utils import random_image
from uhd_jax.config import tiny_config
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.processor import Processor, SampleRequest
from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir
from uhd_jax.model import gated_deltanet as gdn
from uhd_jax.model import text_model as tm
from uhd_jax.model.gated_deltanet import ChunkOptions, chunk_gated_delta_rule, recurrent_gated_delta_rule
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement
from uhd_jax.model.segments import segment_positions, segment_runs
from uhd_jax.train.step import loss_fn

CHUNK = 8  # DeltaNet chunk: every sample spans several chunks and every boundary falls inside one
TPV, VPR, SEQ = 96, 4, 128  # small views (scale_resolution 112: 8x8 and 8x12 patches) keep the models quick
FIELDS = ("input_ids", "attention_mask", "positions", "visual_index", "visual_mask", "loss_mask")


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    p = Processor.from_pretrained(write_tiny_model_dir(tmp_path_factory.mktemp("tiny"), tiny_config()))
    return Processor(p.tokenizer, p.slice_config.replace(scale_resolution=112), p.tokens)


def _chat(proc, images, q, a, name):
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": q}]
    return proc.encode_chat([{"role": "user", "content": parts}, {"role": "assistant", "content": a}], name=name)


@pytest.fixture(scope="module")
def samples(proc):
    """Text only; one image (1 view); one larger image (thumbnail + 2 slices, other grids). The last sample is
    trained on from its first token, so a target crossing into it from the previous sample would count."""
    text = _chat(proc, [], "2+2?", "4.", "text")
    small = _chat(proc, [random_image(60, 90, 1)], "Why?", "No.", "small")
    big = _chat(proc, [random_image(120, 200, 2)], "Why?", "No.", "big")
    assert [s.num_views for s in (text, small, big)] == [0, 1, 3] and len(set(big.view_grids)) == 2
    big = dataclasses.replace(big, loss_mask=big.loss_mask | (big.input_ids != proc.image_token_id))
    assert big.loss_mask[0]
    return [text, small, big]


def _packer(proc, **kw):
    return Packer(proc, PackerConfig(**{"seq_buckets": (SEQ,), "tokens_per_view": TPV, "views_per_row": VPR, **kw}))


def _offsets(samples):
    return np.cumsum([0] + [len(s) for s in samples])[:-1]


# ---------------------------------------------------------------------------------------------------- packer
def test_packer_rows_by_hand(proc, samples):
    """Next-fit, contents written out by hand: each sample's tokens, loss mask, positions from 0, segment number,
    and its views in the row's next view slots with visual_index shifted by them."""
    text, small, big = samples
    extra = _chat(proc, [random_image(120, 200, 3)], "Again?", "Yes.", "extra")  # 3 views
    p = _packer(proc, batch_size=3, pack=True)
    seq = [text, small, big, extra, text]
    # by hand: row 0 = text + small + big (0 + 1 + 3 views fill its 4 slots, the tokens fit 128); extra's 3 views
    # do not fit -> row 1 = extra + text (3 + 0 views); row 2 empty
    assert len(text) + len(small) + len(big) <= SEQ and small.num_views + big.num_views + extra.num_views > VPR
    assert p.assign_rows(seq) == [0, 0, 0, 1, 1]
    b = p.pack(seq)
    check_visual_placement(b, proc.image_token_id)
    assert b.input_ids.shape == (3, SEQ) and b.segment_ids.shape == (3, SEQ) and b.segment_ids.dtype == np.int32
    unpacked = _packer(proc, batch_size=5).pack(seq)  # the same samples one per row: the per-sample reference
    tpo = TPV // 16
    for row, members in ((0, [0, 1, 2]), (1, [3, 4]), (2, [])):
        o = slot0 = 0
        for k, i in enumerate(members):
            s, L = seq[i], len(seq[i])
            np.testing.assert_array_equal(b.input_ids[row, o:o + L], s.input_ids)
            np.testing.assert_array_equal(b.loss_mask[row, o:o + L], s.loss_mask)
            np.testing.assert_array_equal(b.positions[row, o:o + L], np.arange(L))
            assert (b.segment_ids[row, o:o + L] == k + 1).all() and b.attention_mask[row, o:o + L].all()
            # visual tokens: the sample's own index shifted by its first view slot; its views in those slots
            vm = unpacked.visual_mask[i, :L]
            np.testing.assert_array_equal(b.visual_mask[row, o:o + L], vm)
            np.testing.assert_array_equal(b.visual_index[row, o:o + L][vm], unpacked.visual_index[i, :L][vm]
                                          + slot0 * tpo)
            for f in ("patches", "pos_ids", "num_tokens", "grid"):
                np.testing.assert_array_equal(getattr(b.vision, f)[row, slot0:slot0 + s.num_views],
                                              getattr(unpacked.vision, f)[i, :s.num_views], err_msg=f)
            o, slot0 = o + L, slot0 + s.num_views
        assert not b.attention_mask[row, o:].any() and (b.segment_ids[row, o:] == 0).all()
        assert (b.positions[row, o:] == 0).all() and (b.input_ids[row, o:] == proc.pad_token_id).all()
        assert (b.vision.num_tokens[row, slot0:] == 0).all()
    with pytest.raises(ValueError, match="more than batch_size=3 rows"):
        p.pack(seq + [extra, extra])


def test_pack_off_unchanged(proc, samples):
    """pack=False: one sample per row, no segment_ids; the streaming batcher groups batch_size samples."""
    p = _packer(proc, batch_size=2)
    b = p.pack(samples[:2])
    assert b.segment_ids is None
    for r, s in enumerate(samples[:2]):
        np.testing.assert_array_equal(b.input_ids[r, :len(s)], s.input_ids)
        np.testing.assert_array_equal(b.positions[r, :len(s)], np.arange(len(s)))
        assert not b.attention_mask[r, len(s):].any()
    assert p.assign_rows(samples[:2]) == [0, 1]
    assert [x.segment_ids for x in p.batches(samples)] == [None, None]
    # the same rows as packing each sample alone
    for r, s in enumerate(samples[:2]):
        alone = _packer(proc, batch_size=1, pack=True).pack([s])
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(b, f)[r], getattr(alone, f)[0], err_msg=f)


class _TextSource:
    """Text-only records of varied lengths; the answer names the record."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return SampleRequest(messages=[{"role": "user", "content": "q" * (5 + (7 * i) % 40)},
                                       {"role": "assistant", "content": f"answer {i}"}], name=f"t{i}")


def _answers(proc, batch):
    import re

    out = []
    for r in range(batch.input_ids.shape[0]):
        for k in range(1, int(batch.segment_ids[r].max()) + 1):
            toks = batch.input_ids[r][batch.segment_ids[r] == k]
            out.append(int(re.search(r"answer (\d+)", proc.decode(toks))[1]))
    return out


def test_streaming_and_pipeline_resume(proc):
    """Packer.batches and the grain pipeline pack the same stream the same way (next-fit over the rows of a
    batch); the pipeline's state after a batch whose last sample did not fit (it was read, and is held for the
    next batch) resumes exactly."""
    from uhd_jax.data.pipeline import make_batches

    src = _TextSource()
    cfg = PackerConfig(seq_buckets=(128,), tokens_per_view=TPV, views_per_row=0, pack=True)
    want = list(Packer(proc, dataclasses.replace(cfg, batch_size=2)).batches(proc.build(src[i]) for i in range(23)))
    assert sum(int(b.segment_ids.max(axis=1).sum()) for b in want) == 23
    assert max(int(b.segment_ids.max()) for b in want) >= 3  # rows do hold several samples
    it = make_batches(src, proc, cfg, batch_size_per_host=2, shuffle=False, num_epochs=1)
    got = list(it)
    assert [_answers(proc, b) for b in got] == [_answers(proc, b) for b in want]
    assert sorted(a for b in got for a in _answers(proc, b)) == list(range(23))
    for a, b in zip(got, want):
        for f in FIELDS + ("segment_ids",):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    # resume after every batch
    it = make_batches(src, proc, cfg, batch_size_per_host=2, shuffle=False, num_epochs=1)
    for k in range(len(want) - 1):
        next(it)
        state = it.get_state()
        again = make_batches(src, proc, cfg, batch_size_per_host=2, shuffle=False, num_epochs=1)
        again.set_state(state)
        assert [_answers(proc, b) for b in again] == [_answers(proc, b) for b in want[k + 1:]], k


# ---------------------------------------------------------------------------------------------------- DeltaNet
_chunked = jax.jit(chunk_gated_delta_rule, static_argnames=("chunk_size", "state_pass", "solver"))
_recurrent = jax.jit(recurrent_gated_delta_rule)


def _segments(lengths, total):
    seg = np.zeros(total, np.int32)
    o = 0
    for i, n in enumerate(lengths):
        seg[o:o + n] = i + 1
        o += n
    return seg


def _deltanet_inputs(seed, s, hk=2, hv=4, dk=8, dv=8):
    r = np.random.default_rng(seed)
    f = lambda *shape: r.standard_normal(shape).astype(np.float32)
    g = -np.exp(f(2, s, hv)) * 0.3
    beta = 1 / (1 + np.exp(-f(2, s, hv)))
    return f(2, s, hk, dk), f(2, s, hk, dk), f(2, s, hv, dv), g.astype(np.float32), beta.astype(np.float32)


# row 0: boundaries inside chunks of 4 and 8, a 1-token sample, padding (its own segment); row 1: a boundary on a
# chunk edge (16) and samples spanning several chunks
ROWS = [[5, 11, 1, 9, 4], [16, 13, 10]]
S_ROWS = 39


@pytest.fixture(scope="module")
def deltanet_case():
    q, k, v, g, beta = _deltanet_inputs(0, S_ROWS)
    seg = np.stack([_segments(r, S_ROWS) for r in ROWS])
    alone = []  # each sample run alone from a zero state
    for b, lengths in enumerate(ROWS):
        o = 0
        for n in lengths:
            sl = (slice(b, b + 1), slice(o, o + n))
            alone.append(((b, o, n), np.asarray(_recurrent(*(x[sl] for x in (q, k, v, g, beta)))[0])))
            o += n
    return (q, k, v, g, beta), seg, alone


def _close_to_alone(out, alone):
    return max(float(np.abs(np.asarray(out)[b, o:o + n] - want[0]).max()) for (b, o, n), want in alone)


@pytest.mark.parametrize("chunk,state_pass,solver", [(4, "transition", "blocked"), (8, "direct", "triangular_solve")])
def test_deltanet_segments_chunked_recurrent_alone(deltanet_case, chunk, state_pass, solver):
    """Chunks of 4 and 8: boundaries inside chunks and on a chunk edge, samples over several chunks, a 1-token
    sample; both state passes and both solvers. (Each reset removed: test_each_reset_is_needed.)"""
    args, seg, alone = deltanet_case
    out_r, st_r = _recurrent(*args, segment_ids=seg)
    out_c, st_c = _chunked(*args, segment_ids=seg, chunk_size=chunk, state_pass=state_pass, solver=solver)
    assert _close_to_alone(out_r, alone) < 1e-5
    assert _close_to_alone(out_c, alone) < 1e-5
    np.testing.assert_allclose(out_c, out_r, atol=1e-5)
    np.testing.assert_allclose(st_c, st_r, atol=1e-5)  # the final state: the last sample's (row 0: padding's)
    last = _recurrent(*(x[1:, 16 + 13:] for x in args))[1]
    np.testing.assert_allclose(st_c[1:], last, atol=1e-5)


def _ablate_chunk_masks(which):
    real = gdn._chunk_segment_masks

    def fake(segment_ids, c, pad):
        same, carry, tail = real(segment_ids, c, pad)
        if which == "intra_chunk":  # decay / attention inside a chunk not cut at a boundary
            same = jnp.ones_like(same)
        else:  # the carried state not cut
            carry, tail = jnp.ones_like(carry), jnp.ones_like(tail)
        return same, carry, tail

    return fake


def test_recurrent_without_the_reset_differs(deltanet_case, monkeypatch):
    """The twin of the test above for the recurrent form (the chunked form's: test_each_reset_is_needed)."""
    args, seg, alone = deltanet_case
    monkeypatch.setattr(gdn, "segment_starts", lambda s: jnp.zeros(np.shape(s), bool))
    out = jax.jit(lambda *a: recurrent_gated_delta_rule(*a, segment_ids=seg))(*args)[0]  # a new function: traced anew
    assert _close_to_alone(out, alone) > 1e-2


def test_segment_helpers():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_runs(seg), [[0, 0, 1, 1, 1, 2, 3, 3], [0] * 8])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 0, 1, 2, 0, 0, 1], list(range(8))])
    masks = gdn.conv_segment_masks(seg, 4)
    assert not masks[0][0].any()  # 3 tokens back: never the same sample in row 0
    np.testing.assert_array_equal(masks[1][0], [0, 0, 0, 0, 1, 0, 0, 0])  # 2 back
    np.testing.assert_array_equal(masks[2][0], [0, 1, 0, 1, 1, 0, 0, 1])  # 1 back
    assert all(m[1][k:].all() for k, m in zip((3, 2, 1, 0), masks))
    assert masks[3].all()
    # packed rows take no cache: a cache holds one sequence per row
    model = tm.TextModel(tiny_config().text)
    with pytest.raises(ValueError, match="segment_ids"):
        model.init(jax.random.key(0), seg, segment_ids=seg, cache=tm.init_cache(model.config, 2, 8))


# ---------------------------------------------------------------------------------------------------- full model
# Tolerances (relative L2 per sample; seen: 6e-7 dense, 6e-6 hybrid). The hybrid's chunked DeltaNet sums the log
# decays from the chunk start, so its float32 rounding depends on where a sample sits in its chunks; with the
# reference's decay rates (up to 16 per token) the tiny random model amplifies that to ~1e-4 in the logits (the same
# unpacked samples with chunk 4 vs 8 differ as much). The models here decay slower (rates 0.05..1: a leak across a
# boundary would last, so a missing reset shows) and agree to 1e-4. Each reset removed: > 1e-2 (the twin tests).
TOL = {"qwen3": 1e-5, "qwen3_5_text": 1e-4}


def _random_params(model, inputs, seed=0, decay_rates=(1.0, 16.0)):
    """Random parameters by name and shape, without compiling an init: kernels N(0, 1/fan_in), norm scales
    1 + N(0, 0.1), biases N(0, 0.02), DeltaNet decay rates exp(A_log) in `decay_rates` (default [1, 16], as the
    reference draws them), dt_bias 1."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs)["params"])
    rng = np.random.default_rng(seed)

    def one(path, sd):
        name, shape = jax.tree_util.keystr(path), sd.shape
        if name.endswith("['A_log']"):
            x = np.log(rng.uniform(*decay_rates, shape))
        elif name.endswith("['dt_bias']"):
            x = np.ones(shape)
        elif name.endswith("['scale']"):
            x = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("['bias']") or len(shape) < 2:
            x = 0.02 * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape) / np.sqrt(shape[-2])
        return x.astype(sd.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


@pytest.fixture(scope="module", params=["qwen3_5_text", "qwen3"])
def model_case(request, proc, samples):
    """(model, packed batch (one row), its outputs, the separate batch's outputs (one sample per row)).
    Outputs: (logits, hidden states by name, (loss, target tokens) of the trainer's loss_fn)."""
    cfg = tiny_config(text_model=request.param)
    model = MiniCPMV(cfg, attention_impl="xla", chunk=ChunkOptions(chunk_size=CHUNK))
    packed = _packer(proc, batch_size=1, pack=True).pack(samples)
    separate = _packer(proc, batch_size=3).pack(samples)
    check_visual_placement(packed, proc.image_token_id)
    params = _random_params(model, packed, decay_rates=(0.05, 1.0))

    @jax.jit
    def run(p, b):
        _, out = model.apply({"params": p}, b, compute_logits=False)
        logits = jnp.einsum("bsd,vd->bsv", out["norm"], p["text"]["embed_tokens"])  # tied: lm_head = embedding
        hidden = {k: v for k, v in out.items() if k == "norm" or k.startswith("layer_")}
        loss, aux = loss_fn(model, p, b)
        return logits, hidden, (loss, aux["tokens"])

    assert cfg.text.tie_word_embeddings
    return model, packed, jax.device_get(run(params, packed)), jax.device_get(run(params, separate))


def _mismatch(samples, packed_out, separate_out):
    """Largest relative L2 difference, over samples and outputs (logits, every layer's hidden states, the final
    norm), between a packed row at each sample's positions and the sample's own row."""
    (logits, hidden, _), (ref_logits, ref_hidden, _) = packed_out, separate_out
    worst = 0.0
    for i, (s, o) in enumerate(zip(samples, _offsets(samples))):
        L = len(s)
        pairs = [(logits[0, o:o + L], ref_logits[i, :L])]
        pairs += [(hidden[k][0, o:o + L], ref_hidden[k][i, :L]) for k in ref_hidden]
        for a, b in pairs:
            worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return worst


def test_packed_row_equals_samples_alone(model_case, samples):
    """A packed row of a text-only, a 1-view and a 3-view sample gives, at each sample's positions, the logits and
    every layer's hidden states of the sample alone; and the trainer's loss (sum over target tokens / their number
    over the whole batch) of the separate batch."""
    model, packed, packed_out, separate_out = model_case
    assert all(o % CHUNK for o in _offsets(samples)[1:])  # boundaries inside DeltaNet chunks
    assert all(len(s) > 2 * CHUNK for s in samples)  # every sample spans several chunks
    assert len(packed_out[1]) == model.config.text.num_hidden_layers + 1
    tol = TOL[model.config.text.model_type]
    assert _mismatch(samples, packed_out, separate_out) < tol
    (loss_p, tokens_p), (loss_s, tokens_s) = packed_out[2], separate_out[2]
    assert int(tokens_p) == int(tokens_s) == sum(int(s.loss_mask[1:].sum()) for s in samples)
    np.testing.assert_allclose(float(loss_p), float(loss_s), rtol=tol)


def test_no_target_crosses_a_sample_boundary(samples, proc):
    """The last sample is trained on from its first token: only the boundary cut keeps the token before it (the
    previous sample's last) from predicting it."""
    from uhd_jax.train import step as step_mod
    from uhd_jax.train.loss import next_token_targets

    packed = _packer(proc, batch_size=1, pack=True).pack(samples)
    o = _offsets(samples)[2]
    w = np.asarray(next_token_targets(packed.input_ids, packed.loss_mask, packed.segment_ids)[1])
    w_uncut = np.asarray(next_token_targets(packed.input_ids, packed.loss_mask)[1])
    assert w_uncut[0, o - 1] and not w[0, o - 1]
    np.testing.assert_array_equal(np.delete(w, o - 1, axis=1), np.delete(w_uncut, o - 1, axis=1))
    assert int(step_mod.target_tokens(packed)) == int(w.sum()) == sum(int(s.loss_mask[1:].sum()) for s in samples)


# ---------------------------------------------------------------------------------------------------- each reset
# The twins of the test above, on one period of the hybrid LLM (a DeltaNet layer and a full-attention layer) so that
# each removed reset costs one small compile: packed == alone, and with any one reset removed, far from it.
LENGTHS = (21, 1, 26, 13)  # boundaries at 21, 22 (inside chunks of 8) and 48 (a chunk edge), a 1-token sample
ABLATIONS = {
    "attention": (tm, "same_segment_mask", lambda runs: jnp.ones((runs.shape[0], 1) + runs.shape[1:] * 2, bool)),
    "conv": (gdn, "conv_segment_masks", lambda seg, k: [jnp.ones(np.shape(seg), bool)] * k),
    "state": (gdn, "_chunk_segment_masks", _ablate_chunk_masks("carried_state")),
    "intra_chunk": (gdn, "_chunk_segment_masks", _ablate_chunk_masks("intra_chunk")),
}


@pytest.fixture(scope="module")
def period_case():
    text = dataclasses.replace(tiny_config().text, num_hidden_layers=2,
                               layer_types=("linear_attention", "full_attention"))
    model = tm.TextModel(text, attention_impl="xla", chunk=ChunkOptions(chunk_size=CHUNK))
    n, s = len(LENGTHS), 64
    ids = np.random.default_rng(0).integers(0, 500, (1, s)).astype(np.int32)
    seg = np.zeros((1, s), np.int32)
    sep_ids, sep_mask = np.zeros((n, s), np.int32), np.zeros((n, s), bool)
    for i, (o, L) in enumerate(zip(np.cumsum((0,) + LENGTHS), LENGTHS)):
        seg[0, o:o + L] = i + 1
        sep_ids[i, :L], sep_mask[i, :L] = ids[0, o:o + L], True
    params = _random_params(model, ids, decay_rates=(0.02, 0.2))  # slow decay: a state leak would last

    def run(ids, mask, seg):  # traced anew each call: the twins patch what tracing reads
        def f(p):
            logits, out = model.apply({"params": p}, ids, attention_mask=mask, segment_ids=seg)
            return logits, {k: out[k] for k in ("layer_00", "layer_01")}, None
        return jax.device_get(jax.jit(f)(params))

    packed = (ids, seg > 0, seg)
    return run, packed, run(sep_ids, sep_mask, None)


@pytest.mark.parametrize("which", [None] + list(ABLATIONS))
def test_each_reset_is_needed(period_case, monkeypatch, which):
    run, packed, separate_out = period_case
    samples = [np.zeros(L) for L in LENGTHS]
    if which is None:
        assert _mismatch(samples, run(*packed), separate_out) < 1e-4
    else:
        monkeypatch.setattr(*ABLATIONS[which])
        assert _mismatch(samples, run(*packed), separate_out) > 1e-2


# ---------------------------------------------------------------------------------------------------- trainer
def test_segment_ids_sharded_like_input_ids(proc, samples):
    """global_batch places segment_ids like input_ids (rows over the batch axes); a batch without them still goes."""
    from uhd_jax.parallel.mesh import global_batch, make_mesh

    mesh = make_mesh({"fsdp": -1})
    packed = global_batch(_packer(proc, batch_size=1, pack=True).pack(samples), mesh)
    assert packed.segment_ids.sharding == packed.input_ids.sharding
    assert global_batch(_packer(proc, batch_size=1).pack(samples[:1]), mesh).segment_ids is None


def test_config_key():
    from uhd_jax.train.config import base_config, check_config

    c = base_config()
    assert c.data.pack is False
    c.data.source, c.data.path = "jsonl", "x.jsonl"
    c.data.pack = True
    check_config(c)
    c.data.source = "random"
    with pytest.raises(ValueError, match="data.pack"):
        check_config(c)


def test_trainer_step_with_data_pack(tmp_path, monkeypatch):
    """One trainer step with --config.data.pack=True on a small JSONL set: the batches that reach the compiled step
    hold several samples per row (segment_ids), and the step runs. Text only (views_per_row=0) to keep it quick: the
    packed view slots are tested above (packer, pipeline, the full model)."""
    import importlib.util
    import json
    import os

    from uhd_jax.train import loop

    recs = [{"conversations": [{"role": "user", "content": "question " + "?" * i},
                               {"role": "assistant", "content": f"answer {i}"}]} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(root, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("text_model=qwen3")
    c.data.source, c.data.path, c.data.pack = "jsonl", str(tmp_path / "d.jsonl"), True
    c.data.seq_len, c.data.views_per_row = 128, 0
    c.train.steps, c.train.batch_size, c.train.eval_every, c.optimizer.warmup_steps = 1, 2, 0, 0

    seen = []
    real = loop.make_train_step

    def spy(*a, **kw):
        step = real(*a, **kw)

        def wrapped(state, batch):
            seen.append(None if batch.segment_ids is None else np.asarray(batch.segment_ids))
            return step(state, batch)
        return wrapped

    monkeypatch.setattr(loop, "make_train_step", spy)
    summary = loop.train(c, str(tmp_path / "run"))
    assert summary["steps"] == 1 and np.isfinite(summary["last_loss"])
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (2, 128)
    assert seen[0].max() >= 2  # a row holds several samples
