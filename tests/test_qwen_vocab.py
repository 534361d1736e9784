"""The real MiniCPM-V 4.6 vocabulary rebuilt offline (uhd_jax.data.qwen_vocab) encodes exactly as tiktoken does
with the same ranks, has the 248,094 tokens of config.json, and serves the processor and the trainer."""

from __future__ import annotations

import random
import unicodedata

import pytest

tiktoken = pytest.importorskip("tiktoken")

from uhd_jax.config import reference_config  # noqa: E402
from uhd_jax.data import qwen_vocab  # noqa: E402


@pytest.fixture(scope="module")
def vocab():
    ranks = qwen_vocab.load_ranks()
    specials = {t["content"]: t["id"] for t in qwen_vocab.added_tokens()}
    oracle = tiktoken.Encoding("qwen3_5", pat_str=qwen_vocab.QWEN3_5_PATTERN, mergeable_ranks=ranks,
                               special_tokens=specials)
    return qwen_vocab.build_tokenizer(ranks), oracle


def _texts():
    fixed = ["Hello world!  How are you?\n\n", "naïve café — 東京タワー 123456 x=3.14159",
             "<|im_start|>user\n<image>./</image>\nWhat is written?<|im_end|>\n<|im_start|>assistant\n",
             "def f(x):\n    return x**2  # ok\r\n\t", "combining: e\u0301 a\u0308 (NFC joins them)", "😀👍🏽 emoji",
             "ملف عربي", "   lots   of   spaces   ", "I'M here, you'LL see; they'd've", ""]
    rng = random.Random(0)
    alphabet = [chr(c) for c in list(range(32, 127)) + list(range(0x400, 0x450)) + list(range(0x4E00, 0x4E40))
                + [0x301, 0x308, 0x1F600, 10, 9, 13]]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400))) for _ in range(60)]


def test_encodes_as_tiktoken(vocab):
    tok, oracle = vocab
    for s in _texts():
        ours = tok.encode(s, add_special_tokens=False).ids
        want = oracle.encode(unicodedata.normalize("NFC", s), allowed_special="all")
        assert ours == want, repr(s[:60])
        assert tok.decode(ours, skip_special_tokens=False) == unicodedata.normalize("NFC", s)


def test_vocabulary_matches_the_model(vocab):
    tok, _ = vocab
    cfg = reference_config()
    assert tok.get_vocab_size() == cfg.text.vocab_size == qwen_vocab.VOCAB_SIZE
    assert tok.token_to_id("<|image_pad|>") == cfg.image_token_id
    assert tok.token_to_id("<|im_end|>") == 248046 and tok.token_to_id("</timestamp>") == 248093


def test_processor_reads_the_written_directory(tmp_path):
    import numpy as np

    from uhd_jax.data.processor import Processor

    qwen_vocab.write_reference_model_dir(str(tmp_path))
    proc = Processor.from_pretrained(str(tmp_path))
    assert proc.eos_token_ids == (248044, 248046)
    from PIL import Image

    image = Image.fromarray(np.zeros((600, 900, 3), np.uint8))
    sample = proc.encode_chat([{"role": "user", "content": "<|image_pad|>\nRead it."},
                               {"role": "assistant", "content": "HELLO"}], images=[image])
    ids = np.asarray(sample.input_ids)
    plan = proc.plan((600, 900))
    assert plan.num_views > 1  # the real preprocessor config slices a 900 px image
    assert (ids == 248056).sum() == sum(plan.view_tokens)
    assert ids.max() < qwen_vocab.VOCAB_SIZE
    assert "HELLO" in proc.decode(ids[np.asarray(sample.loss_mask)])
