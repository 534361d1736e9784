"""Beam search over the full model (uhd_jax.infer.beam_generate) against transformers'
`MiniCPMV4_6ForConditionalGeneration.generate(num_beams=3, do_sample=False, repetition_penalty=1.2)`, token for
token, on a tiny random hybrid model with images (built, saved and loaded as in tests/test_engine.py); and the
engine's sampling picker (infer/sampler.py) with greedy + repetition_penalty against generate(do_sample=False,
repetition_penalty=1.2)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.convert_ref import hf_model, save_hf
from tests.data_utils import make_model_dir, random_image, reference_processor
from uhd_jax.config import tiny_config
from uhd_jax.convert import load_hf
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.processor import Processor
from uhd_jax.infer.beam_generate import BeamGenerator
from uhd_jax.infer.engine import Generator
from uhd_jax.infer.sampler import make_pick_fn, request_params, stack_params
from uhd_jax.model.minicpmv import MiniCPMV

IM = "<|image_pad|>"
SLICE = dict(scale_resolution=112, max_slice_nums=4)
PACK = dict(tokens_per_view=160, views_per_row=12)
PAD = 7  # not 0: transformers fills short hypotheses with pad_token_id
MAX_NEW = 8


def user(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(insert_layer_id=1)
    cfg = cfg.replace(text=cfg.text.replace(vocab_size=248320), image_token_id=248056, video_token_id=248057)
    model_dir = str(tmp_path_factory.mktemp("beam") / "model")
    ref = hf_model(cfg, seed=5)
    save_hf(ref, model_dir, side_files=False)
    make_model_dir(model_dir, **SLICE)
    loaded_cfg, params = load_hf(model_dir)
    model = MiniCPMV(loaded_cfg, attention_impl="xla")
    return dict(dir=model_dir, ref=ref, rp=reference_processor(model_dir, **SLICE), model=model,
                params=jax.tree.map(jnp.asarray, params), proc=Processor.from_pretrained(model_dir))


def _cut(tokens, eos):
    hits = np.flatnonzero(np.isin(tokens, eos))
    return tokens if not len(hits) else tokens[:hits[0] + 1]


def _reference(m, raw, images, eos):
    """(prompt ids, the 3 hypotheses best first, each cut after its eos) of transformers' beam search alone."""
    enc = m["rp"](text=[raw], images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = m["ref"].generate(**enc, num_beams=3, do_sample=False, repetition_penalty=1.2, max_new_tokens=MAX_NEW,
                                eos_token_id=list(eos), pad_token_id=PAD, length_penalty=1.0, early_stopping=False,
                                num_return_sequences=3)
    new = out[:, enc["input_ids"].shape[1]:].numpy()
    return enc["input_ids"][0].numpy(), [_cut(h, eos) for h in new]


def test_beam_generation_matches_transformers(tiny):
    """Two prompts in one batch (an image sliced into several views; text only), each against transformers run
    alone; with the real eos ids, then with a token of the reference's output added to them so a beam ends
    early (the random model never emits the real eos)."""
    m = tiny
    cases = [(user(f"{IM}\nDescribe this image in detail."), [random_image(40, 400, seed=2)]),
             (user("What is written on the sign? The sign says hello world."), [])]
    eos = tuple(m["proc"].eos_token_ids)
    first = [_reference(m, raw, ims, eos) for raw, ims in cases]
    # a late token of the best hypothesis (not earlier in it): ending there scores close to the full-length ones
    best = first[0][1][0]
    extra = int(best[MAX_NEW - 2])
    assert extra not in best[:MAX_NEW - 2]
    samples = [m["proc"](raw, ims)[0] for raw, ims in cases]
    batch = Packer(m["proc"], PackerConfig(batch_size=2, seq_buckets=(128,), **PACK)).pack(samples)
    for stops in (eos, eos + (extra,)):
        refs = first if stops == eos else [_reference(m, raw, ims, stops) for raw, ims in cases]
        gen = BeamGenerator(m["model"], num_beams=3, eos_token_ids=stops, pad_token_id=PAD, repetition_penalty=1.2)
        got = gen.generate(m["params"], batch, max_new_tokens=MAX_NEW)
        for r, (s, (ids, want)) in enumerate(zip(samples, refs)):
            np.testing.assert_array_equal(s.input_ids, ids)  # same prompt in
            for j in range(3):  # every hypothesis, in transformers' order
                np.testing.assert_array_equal(got.hypotheses[r][j], want[j], err_msg=f"row {r} beam {j} {stops}")
            np.testing.assert_array_equal(got.tokens[r], want[0])
            assert got.finish_reasons[r] == ("stop" if want[0][-1] in stops else "length")
    # the extra stop id ended a hypothesis early
    assert any(len(h) < MAX_NEW and h[-1] == extra for hyps in got.hypotheses for h in hyps)
    assert len(samples[0].views) > 1


def test_greedy_repetition_penalty_matches_transformers(tiny):
    """The Generator with the sampler's picker, greedy with repetition_penalty 1.2 (prompt ids, image placeholders
    included, and generated tokens penalised), against transformers run alone on each prompt."""
    m = tiny
    cases = [(user(f"{IM}\nDescribe this image in detail."), [random_image(40, 400, seed=2)]),
             (user("What is written on the sign? The sign says hello world."), [])]
    eos = tuple(m["proc"].eos_token_ids)
    samples = [m["proc"](raw, ims)[0] for raw, ims in cases]
    batch = Packer(m["proc"], PackerConfig(batch_size=2, seq_buckets=(128,), **PACK)).pack(samples)
    gen = Generator(m["model"], stop_ids=eos, pick_fn=make_pick_fn(m["model"].config.text))
    got = gen.generate(m["params"], batch, max_new_tokens=MAX_NEW,
                       sampling_params=stack_params([request_params(do_sample=False, repetition_penalty=1.2)] * 2))
    plain = Generator(m["model"], stop_ids=eos).generate(m["params"], batch, max_new_tokens=MAX_NEW)
    for r, (raw, ims) in enumerate(cases):
        enc = m["rp"](text=[raw], images=ims or None, return_tensors="pt")
        with torch.no_grad():
            out = m["ref"].generate(**enc, do_sample=False, repetition_penalty=1.2, max_new_tokens=MAX_NEW,
                                    eos_token_id=list(eos), pad_token_id=PAD)
        np.testing.assert_array_equal(got.tokens[r], _cut(out[0, enc["input_ids"].shape[1]:].numpy(), eos))
    assert any(not np.array_equal(a, b) for a, b in zip(got.tokens, plain.tokens))  # the penalty changed something
