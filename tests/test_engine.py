"""The inference engine (uhd_jax.infer) against transformers' `generate(do_sample=False)`.

Tiny random MiniCPM-V 4.6 models (float32, CPU) are saved like real checkpoints with the test tokenizer (real
special-token ids, so the real vocabulary size) and loaded back with `load_hf`; prompts go through our Processor
and Packer and through transformers' MiniCPMV4_6Processor. Every greedy generation must be token-for-token the
reference's. Also: the two silent errors of issue 11 (left padding; decoding past the cache), continued prefill,
continuous batching and its compilations.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.convert_ref import hf_model, save_hf
from tests.data_utils import make_model_dir, random_image, reference_processor
from uhd_jax.compile_counter import count_compilations
from uhd_jax.config import tiny_config
from uhd_jax.convert import load_hf
from uhd_jax.data.batch import ModelBatch
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.processor import Processor
from uhd_jax.infer.engine import (CacheCapacityError, Generator, Request, SlotEngine, greedy, row_keys,
                                  serving_params)
from uhd_jax.model.gated_deltanet import ChunkOptions
from uhd_jax.model.minicpmv import MiniCPMV

IM = "<|image_pad|>"
SLICE = dict(scale_resolution=112, max_slice_nums=4)  # views of at most 8x8 patches: a fast reference on CPU
PACK = dict(tokens_per_view=160, views_per_row=12)


def user(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def prompts():
    """(raw text, images): one image; three images of different sizes (> 128 tokens: the DeltaNet chunk); text."""
    tiny, wide, big = random_image(20, 30, seed=1), random_image(40, 1000, seed=2), random_image(1344, 1344, seed=3)
    return [(user(f"{IM}\nDescribe this image in detail."), [wide]),
            ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             + user(f"{IM}\n{IM}\n{IM}\nWhat is written on the sign? The sign says hello world. Describe this image in "
                    "detail."), [tiny, wide, big]),
            (user("How many slices? Answer with a number."), [])]


def _saved(tmp_path_factory, text_model, served=False):
    cfg = tiny_config(insert_layer_id=1, text_model=text_model)
    cfg = cfg.replace(text=cfg.text.replace(vocab_size=248320), image_token_id=248056, video_token_id=248057)
    model_dir = str(tmp_path_factory.mktemp(f"engine_{text_model}") / "model")
    ref = hf_model(cfg, seed=11)
    save_hf(ref, model_dir, side_files=False)
    make_model_dir(model_dir, **SLICE)
    loaded_cfg, params = load_hf(model_dir)
    model = MiniCPMV(loaded_cfg, attention_impl="xla")
    proc = Processor.from_pretrained(model_dir)
    params = jax.tree.map(jnp.asarray, params)
    if served:  # the serving layout (every layer stack split per layer), what the CLIs generate with
        params = serving_params(model, params)
    return dict(dir=model_dir, ref=ref, rp=reference_processor(model_dir, **SLICE), cfg=loaded_cfg, model=model,
                params=params, proc=proc, gen=Generator(model, stop_ids=proc.eos_token_ids))


# Most hybrid tests share one compiled generation program: 3 rows of a 160-token bucket with 12 view slots, a
# 10-token output buffer and a cache of 170 slots (stop ids are an argument of the program, not part of it).
ROWS, BUCKET, BUFFER, CAPACITY = 3, 160, 10, 170


def pack(m, samples, mode="16x"):
    proc = m["proc"] if mode == "16x" else Processor.from_pretrained(m["dir"], downsample_mode=mode)
    return Packer(proc, PackerConfig(batch_size=ROWS, seq_buckets=(BUCKET,), **PACK)).pack(samples)


def generate(m, batch, max_new, **kw):
    assert max(max_new) == BUFFER  # the shared program
    kw.setdefault("capacity", None if "cache" in kw else CAPACITY)
    return m["gen"].generate(m["params"], batch, max_new_tokens=max_new, **kw)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return _saved(tmp_path_factory, "qwen3_5_text", served=True)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _saved(tmp_path_factory, "qwen3")


def reference(m, raw, images, mode, max_new, eos):
    """transformers' greedy generation of one prompt alone: (prompt ids, new tokens cut after the first stop)."""
    enc = m["rp"](text=[raw], images=images or None, downsample_mode=mode, return_tensors="pt")
    with torch.no_grad():
        out = m["ref"].generate(**enc, do_sample=False, max_new_tokens=max_new, eos_token_id=list(eos),
                                pad_token_id=0, downsample_mode=mode)
    return enc["input_ids"][0].numpy(), cut(out[0, enc["input_ids"].shape[1]:].numpy(), eos)


def cut(tokens, stops):
    """Greedy tokens up to and including the first stop id (what generate returns with those eos ids)."""
    hits = np.flatnonzero(np.isin(tokens, stops))
    return tokens if not len(hits) else tokens[:hits[0] + 1]


def stop_token(outputs):
    """A token first appearing at index >= 2 of some reference output: a stop id that ends that row early (the
    random models never emit the real eos ids)."""
    for tokens in outputs:
        for i in range(2, len(tokens) - 1):
            if tokens[i] not in tokens[:i]:
                return int(tokens[i])
    raise AssertionError(f"no stop token candidate in {outputs}")


def generate_vs_reference(m, mode, rows, max_new):
    """Our batch against the reference run on each prompt alone. The reference runs with the real eos ids; the
    extra stop id taken from its outputs ends its rows where its greedy tokens first hit it."""
    cases = [prompts()[r] for r in rows]
    eos = m["proc"].eos_token_ids
    refs = [reference(m, *c, mode, k, eos) for c, k in zip(cases, max_new)]
    stops = tuple(eos) + (stop_token([t for _, t in refs]),)
    proc = Processor.from_pretrained(m["dir"], downsample_mode=mode)
    samples = [proc(raw, images)[0] for raw, images in cases]
    got = generate(m, pack(m, samples, mode), max_new + [BUFFER] * (ROWS - len(rows)), stop_ids=stops)
    for r, (s, (ids, ref)) in enumerate(zip(samples, refs)):
        want = cut(ref, stops)
        np.testing.assert_array_equal(s.input_ids, ids)  # same prompt in
        np.testing.assert_array_equal(got.tokens[r], want, err_msg=f"row {r}")
        assert got.finish_reasons[r] == ("stop" if want[-1] in stops else "length")
    assert "stop" in got.finish_reasons[:len(rows)]
    assert got.finish_reasons[len(rows):] == [None] * (ROWS - len(rows))  # rows without a prompt: skipped
    return samples, got


def test_generate_matches_reference_16x(hybrid):
    """One batch: one image; three images of different sizes (a prompt longer than the DeltaNet chunk); text only.
    Rows of different prompt lengths and budgets, some ending on a stop token."""
    samples, _ = generate_vs_reference(hybrid, "16x", [0, 1, 2], [8, 6, 10])
    assert len(samples[1]) > ChunkOptions().chunk_size and len({len(s) for s in samples}) == 3


def test_generate_matches_reference_4x(hybrid):
    samples, _ = generate_vs_reference(hybrid, "4x", [0, 2], [10, 7])
    assert len(samples[0]) > ChunkOptions().chunk_size


def test_generate_matches_reference_qwen3_dense(dense):
    generate_vs_reference(dense, "16x", [2, 0], [10, 6])


def _shift_right(batch: ModelBatch) -> ModelBatch:
    """The same rows left-padded: every per-token array moved to the end of its row."""
    mask = np.asarray(batch.attention_mask)
    s = mask.shape[1]
    out = {}
    for f in ("input_ids", "attention_mask", "positions", "visual_index", "visual_mask", "loss_mask"):
        a = np.asarray(getattr(batch, f))
        b = np.zeros_like(a)
        for r, n in enumerate(mask.sum(-1)):
            b[r, s - n:] = a[r, :n]
        out[f] = b
    return batch.replace(**out)


def test_left_and_right_padding_match_reference(hybrid):
    """Issue 11's first silent error: a left-padded batch gave wrong logits. transformers' own batched generation
    (left padding) and ours on the same rows left- and right-padded give the same tokens; with an image row too,
    and the forward logits of the two layouts agree position by position."""
    m = hybrid
    proc, eos = m["proc"], m["proc"].eos_token_ids
    texts = [user("What is written on the sign? The sign says hello world."), user("Hi")]
    rp = m["rp"]
    rp.tokenizer.padding_side = "left"
    enc = rp(text=texts, return_tensors="pt", padding=True)
    assert not enc["attention_mask"][1, 0]  # really left-padded
    with torch.no_grad():
        ref = m["ref"].generate(**enc, do_sample=False, max_new_tokens=BUFFER, eos_token_id=list(eos),
                                pad_token_id=0)[:, enc["input_ids"].shape[1]:].numpy()

    raw, images = prompts()[0]
    right = pack(m, [proc(t)[0] for t in texts] + [proc(raw, images)[0]])
    left = _shift_right(right)
    for batch in (right, left):
        got = generate(m, batch, [BUFFER] * 3)
        for r in range(2):
            np.testing.assert_array_equal(got.tokens[r], ref[r])
        np.testing.assert_array_equal(got.tokens[2], reference(m, raw, images, "16x", BUFFER, eos)[1])

    holey = np.asarray(left.attention_mask).copy()
    holey[0, -3] = False  # a gap inside row 0's tokens: no processor makes this; refused before anything runs
    with pytest.raises(ValueError, match=r"rows \[0\] have padding between real tokens"):
        generate(m, left.replace(attention_mask=holey), [BUFFER] * 3)

    fwd = jax.jit(m["model"].apply)
    lr, _ = fwd({"params": m["params"]}, right)
    ll, _ = fwd({"params": m["params"]}, left)
    n = np.asarray(right.attention_mask).sum(-1)
    for r in range(3):
        a, b = np.asarray(lr[r, :n[r]]), np.asarray(ll[r, ll.shape[1] - n[r]:])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), r


def _with_ids(sample, ids, views=(), plans=()):
    ids = np.asarray(ids, np.int32)
    return dataclasses.replace(sample, input_ids=ids, loss_mask=np.zeros(ids.shape, bool),
                               views=list(sample.views) + list(views), plans=list(sample.plans) + list(plans))


def test_continued_prefill_equals_one_prefill(hybrid):
    """Two conversations of different lengths: turn 1 generated, then turn 2 (a new image in one row) prefilled on
    the cache (KV appended at each row's length, DeltaNet continued from its state) and decoded: the same tokens
    as one prefill of the whole history (turn 1 + answer + turn 2) decoded from scratch."""
    m = hybrid
    proc = m["proc"]
    raw0, images0 = prompts()[0]
    turn1 = [proc(raw0, images0)[0], proc(prompts()[2][0])[0]]
    first = generate(m, pack(m, turn1), [5, 10, 10])
    assert [len(t) for t in first.tokens] == [5, 10, 0]

    new_image = random_image(300, 200, seed=7)
    turn2 = [proc("\n" + user(f"{IM}\nAnd this one?"), [new_image])[0], proc("\n" + user("Why?"))[0]]
    # the cache holds turn 1 and the answer but its last token, which opens turn 2
    turn2 = [_with_ids(t, np.concatenate([a[-1:], t.input_ids])) for t, a in zip(turn2, first.tokens)]
    assert np.array_equal(np.asarray(first.cache.lengths), [len(turn1[0]) + 4, len(turn1[1]) + 9, 0])
    cont = generate(m, pack(m, turn2), [10, 6, 10], cache=first.cache)

    whole = [_with_ids(t1, np.concatenate([t1.input_ids, a[:-1], t2.input_ids]), t2.views, t2.plans)
             for t1, a, t2 in zip(turn1, first.tokens, turn2)]
    once = generate(m, pack(m, whole), [10, 6, 10])
    for r in range(2):
        np.testing.assert_array_equal(cont.tokens[r], once.tokens[r])
    np.testing.assert_array_equal(np.asarray(cont.cache.lengths), np.asarray(once.cache.lengths))
    assert len(whole[0]) != len(whole[1]) and len(turn2[0].plans) == 1 and len(turn2[0].views) > 1


def test_cache_overflow_is_refused_or_stopped(hybrid):
    """Issue 11's second silent error: decoding past the cache clamped onto the last slot. Now: the host refuses
    a request that cannot fit; the decode loop stops a row whose cache is full with reason "cache_full" after the
    tokens that fit (an uncapped run's); a decode step at capacity writes nothing and flags the row overflowed."""
    m = hybrid
    proc = m["proc"]
    samples = [proc(prompts()[2][0])[0], proc(user("Hi"))[0]]
    n = np.array([len(s) for s in samples] + [0])
    batch = pack(m, samples)
    with pytest.raises(CacheCapacityError, match=f"row 0: 0 cached \\+ {n[0]} prompt \\+ 10 new tokens > "
                                                 f"capacity {n[0] + 9}"):
        generate(m, batch, [BUFFER] * 3, capacity=n[0] + 9)
    full = generate(m, batch, [BUFFER] * 3)
    assert full.finish_reasons == ["length", "length", None]

    # the loop, past the host check: a cache of n0 + 3 slots holds the prompt and 3 fed tokens: row 0 stops after
    # 4 tokens; row 1 (shorter) runs to its budget
    g = m["gen"]
    st = g._generate(m["params"], batch, g.new_cache(ROWS, n[0] + 3), jnp.full((ROWS,), BUFFER), row_keys(0, ROWS),
                     None, jnp.asarray(g.stop_ids), max_new_tokens=BUFFER)
    assert np.asarray(st.reason).tolist() == [3, 2, 0] and np.asarray(st.num_tokens).tolist() == [4, 10, 0]
    np.testing.assert_array_equal(np.asarray(st.tokens[0, :4]), full.tokens[0][:4])
    np.testing.assert_array_equal(np.asarray(st.tokens[1]), full.tokens[1])

    # by hand: one more step on the full row
    cache = st.cache
    assert np.asarray(cache.lengths).tolist() == [n[0] + 3, n[1] + 9, 0] and not cache.overflowed.any()
    step = jax.jit(lambda c, t: m["model"].apply({"params": m["params"]}, t, c, method=MiniCPMV.decode_step))
    _, over = step(cache, jnp.asarray([full.tokens[0][4], 0, 0]))
    assert np.asarray(over.overflowed).tolist() == [True, False, False]
    for a, b in zip(jax.tree.leaves(cache.layers), jax.tree.leaves(over.layers)):
        if a.ndim == 5 and a.shape[2] == n[0] + 3:  # KV [G, B, T, K, H]: row 0 not overwritten anywhere
            np.testing.assert_array_equal(np.asarray(a[:, 0]), np.asarray(b[:, 0]))


def test_slot_engine_matches_alone_without_recompiling(hybrid):
    """Continuous batching: 2 slots, requests of two prompt buckets, with and without images, different budgets; a
    finished row's slot takes the next request while the other keeps decoding. Each request gets the tokens it
    gets alone, and a second wave of requests compiles nothing."""
    m = hybrid
    proc = m["proc"]
    (raw0, im0), _, (raw2, _) = prompts()
    tiny = random_image(60, 80, seed=4)
    wave1 = [(raw2, [], 7), (raw0, im0, 3), (user("Hi"), [], 5), (user(f"{IM}\nWhat is it?"), [tiny], 9)]
    wave2 = [(user("Describe a cat."), [], 4), (user(f"{IM} and text"), [tiny], 6), (raw0, im0, 8)]
    engine = SlotEngine(m["model"], m["params"], proc, slots=2, capacity=70, max_new_tokens=BUFFER,
                        prompt_buckets=(32, 64), steps_per_sync=4, **PACK)

    def requests(wave, first_id):
        return [Request(proc(raw, images)[0], max_new_tokens=k, id=first_id + i)
                for i, (raw, images, k) in enumerate(wave)]

    inserts = []  # (slot, the other slot's (running, tokens so far)) at each insertion
    insert = engine._insert

    def watched(st, row, slot):
        other = 1 - int(slot)
        inserts.append((int(slot), (not bool(st.done[other]), int(st.num_tokens[other]))))
        return insert(st, row, slot)

    engine._insert = watched
    for r in requests(wave1, 0):
        engine.submit(r)
    res = engine.run()
    assert len(inserts) == 4 and any(running and n > 0 for _, (running, n) in inserts[2:]), inserts
    with count_compilations() as c:
        for r in requests(wave2, 10):
            engine.submit(r)
        res.update(engine.run())
    assert c.count == 0, c.count

    for r in requests(wave1, 0) + requests(wave2, 10):  # alone: the only prompt of its batch
        alone = generate(m, pack(m, [r.sample]), [r.max_new_tokens, BUFFER, BUFFER])
        np.testing.assert_array_equal(res[r.id].tokens, alone.tokens[0], err_msg=str(r.id))
        assert res[r.id].finish_reason == "length" and len(res[r.id].tokens) == r.max_new_tokens

    with pytest.raises(CacheCapacityError, match="61 prompt \\+ 10 new tokens > capacity 70"):
        engine.submit(Request(proc(raw0, im0)[0], max_new_tokens=10))


def test_float32_logits_and_streaming():
    """A bfloat16 model still hands float32 logits to the picker, not rounded bf16 ones (prefill and decode
    steps); a stream callback sees every token of every row in order."""
    cfg = tiny_config()
    ids = np.random.default_rng(0).integers(0, 400, (2, 12)).astype(np.int32)
    mask = np.arange(12)[None] < np.array([[12], [7]])
    z = np.zeros_like(ids)
    batch = ModelBatch(input_ids=ids, attention_mask=mask, positions=z, visual_index=z, visual_mask=z > 0,
                       loss_mask=mask)
    model = MiniCPMV(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl="xla")
    params = jax.jit(model.init)(jax.random.key(0), batch)["params"]

    logits_seen, streamed = [], []

    def pick(logits, ctx):
        assert logits.dtype == jnp.float32 and logits.shape == (2, cfg.text.padded_vocab_size)
        jax.debug.callback(lambda x: logits_seen.append(np.asarray(x)), logits, ordered=True)
        return greedy(logits, ctx)

    g = Generator(model, stop_ids=(), pick_fn=pick, stream=lambda tok, took: streamed.append((tok, took)))
    out = g.generate(params, batch, max_new_tokens=np.array([5, 3]))
    assert len(logits_seen) == 5 and [len(t) for t in out.tokens] == [5, 3]
    for x in logits_seen:
        real = x[:, :cfg.text.vocab_size]
        assert (real != real.astype(jnp.bfloat16).astype(np.float32)).mean() > 0.5
    for r in range(2):
        np.testing.assert_array_equal(np.array([t[r] for t, took in streamed if took[r]]), out.tokens[r])
