"""The sampling pick_fn (uhd_jax.infer.sampler) in the engine: greedy settings pick what `greedy` picks; a seeded
sampled request gets the same tokens whatever slot, batch position or company it runs in (SlotEngine, both orders)
as when it runs alone through the Generator; the repetition penalty counts prompt + generated tokens."""

import jax
import numpy as np
import pytest

from tests.cli_utils import make_checkpoint
from tests.data_utils import random_image
from uhd_jax.convert.checkpoint import load_checkpoint
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.processor import Processor
from uhd_jax.infer.engine import Generator, Request, SlotEngine
from uhd_jax.infer.sampler import make_pick_fn, params_from_generation_config, request_params, stack_params
from uhd_jax.model.minicpmv import MiniCPMV

BUCKET, VIEWS, TPV, NEW = 96, 3, 80, 8
ROWS = 4  # every Generator call packs 4 rows (missing rows are empty and skipped): one compiled program


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_checkpoint(str(tmp_path_factory.mktemp("sampling") / "ckpt"), seed=3)
    cfg, params = load_checkpoint(d)
    proc = Processor.from_pretrained(d)
    model = MiniCPMV(cfg, attention_impl="xla")
    samples = [proc(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", ims)[0] for q, ims in [
        ("<|image_pad|>\nWhat is it?", [random_image(40, 60, seed=1)]), ("Hello there", []),
        ("Count: 1 2 3 4 5 6", []), ("<|image_pad|>\nAnd this?", [random_image(90, 50, seed=2)])]]
    return dict(cfg=cfg, params=jax.tree.map(jax.numpy.asarray, params), proc=proc, model=model, samples=samples,
                pick=make_pick_fn(cfg.text), gen=Generator(model, stop_ids=(), pick_fn=make_pick_fn(cfg.text)))


def _batch(m, samples):
    return Packer(m["proc"], PackerConfig(batch_size=ROWS, seq_buckets=(BUCKET,), views_per_row=VIEWS,
                                          tokens_per_view=TPV)).pack(samples)


def test_greedy_settings_pick_like_greedy(tiny):
    """temperature 0, do_sample False and top_k 1 (with any temperature / top_p) all give greedy's tokens; a high
    temperature does not."""
    m = tiny
    batch = _batch(m, m["samples"])
    want = Generator(m["model"], stop_ids=()).generate(m["params"], batch, max_new_tokens=NEW).tokens
    settings = [request_params(temperature=0.0, top_p=0.5), request_params(do_sample=False, temperature=5.0),
                request_params(temperature=3.0, top_k=1, top_p=0.3), request_params(temperature=0.0, top_k=7)]
    got = m["gen"].generate(m["params"], batch, max_new_tokens=NEW, key=[1, 2, 3, 4],
                            sampling_params=stack_params(settings)).tokens
    for r in range(4):
        np.testing.assert_array_equal(got[r], want[r], err_msg=str(r))
    hot = m["gen"].generate(m["params"], batch, max_new_tokens=NEW, key=[1, 2, 3, 4],
                            sampling_params=stack_params([request_params(temperature=50.0)] * 4)).tokens
    assert any(not np.array_equal(h, w) for h, w in zip(hot, want))
    # generation_config.json's values; a flag's temperature 0 overrides do_sample
    p = params_from_generation_config({"do_sample": True, "temperature": 0.7, "top_k": 0}, temperature=0.0)
    assert float(p["temperature"]) == 0.0 and int(p["top_k"]) == 0


def _repetition_reference(m, sample, penalty, n):
    """Greedy with the penalty by hand: full forward passes over prompt + tokens so far (no cache), the penalty
    on every distinct token of that sequence (transformers' RepetitionPenaltyLogitsProcessor)."""
    v = m["cfg"].text.vocab_size
    fwd = jax.jit(m["model"].apply)
    toks = []
    for _ in range(n):
        s = sample.__class__(**{**sample.__dict__, "input_ids": np.concatenate([sample.input_ids, toks]).astype(
            np.int32), "loss_mask": np.zeros(len(sample) + len(toks), bool)})
        b = _batch(m, [s])
        logits, _ = fwd({"params": m["params"]}, b)
        x = np.array(logits[0, len(s) - 1, :v], np.float32)
        seen = np.unique(s.input_ids)
        x[seen] = np.where(x[seen] < 0, x[seen] * np.float32(penalty), x[seen] / np.float32(penalty))
        toks.append(int(np.argmax(x)))
    return np.array(toks)


def test_repetition_penalty_over_prompt_and_generated(tiny):
    m = tiny
    sample = m["samples"][2]
    want = _repetition_reference(m, sample, 1.5, NEW)
    got = m["gen"].generate(m["params"], _batch(m, [sample, m["samples"][1]]), max_new_tokens=NEW,
                            sampling_params=stack_params([request_params(do_sample=False, repetition_penalty=1.5)]
                                                         + [request_params(do_sample=False)] * 3)).tokens[0]
    np.testing.assert_array_equal(got, want)


def test_seeded_sampling_is_reproducible_in_any_slot(tiny):
    """Four requests (sampled with different settings and seeds, one greedy) through a 2-slot SlotEngine, in two
    submission orders: each gets the tokens it gets alone (Generator, batch of one, its seed)."""
    m = tiny
    settings = [(11, request_params(temperature=1.0)), (12, request_params(temperature=0.7, top_p=0.9)),
                (13, request_params(temperature=1.3, top_k=20, repetition_penalty=1.2)), (14, request_params(
                    do_sample=False))]
    engine = SlotEngine(m["model"], m["params"], m["proc"], slots=2, capacity=BUCKET + NEW, max_new_tokens=NEW,
                        prompt_buckets=(BUCKET,), views_per_row=VIEWS, tokens_per_view=TPV, stop_ids=(),
                        pick_fn=m["pick"], sampling_defaults=request_params(), steps_per_sync=3)
    runs = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        for i in order:
            seed, p = settings[i]
            engine.submit(Request(m["samples"][i], max_new_tokens=NEW, seed=seed, sampling=p, id=i))
        runs.append({k: f.tokens for k, f in engine.run().items()})
    for i, (seed, p) in enumerate(settings):
        alone = m["gen"].generate(m["params"], _batch(m, [m["samples"][i]]), max_new_tokens=NEW,
                                  key=[seed, 0, 0, 0], sampling_params=stack_params([p] * ROWS)).tokens[0]
        for run in runs:
            np.testing.assert_array_equal(run[i], alone, err_msg=str(i))
    other = m["gen"].generate(m["params"], _batch(m, [m["samples"][0]]), max_new_tokens=NEW, key=[99, 0, 0, 0],
                              sampling_params=stack_params([settings[0][1]] * ROWS)).tokens[0]
    assert not np.array_equal(other, runs[0][0])  # the seed matters
