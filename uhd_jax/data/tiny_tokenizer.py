"""A tokenizer and model directory for `tiny_config()` (vocab 512), which cannot use the real 248k vocabulary.

Byte-level: ids 0..255 are the 256 bytes (GPT-2 byte alphabet, no merges), so any text encodes and every id
is < 256; the special tokens the Processor needs sit at fixed ids (`<|image_pad|>` = 500, `<|video_pad|>` =
501, as `tiny_config()` says; the rest 502..510); 256..499 and 511 are reserved special tokens, so every id a
tiny random model can emit decodes. Deterministic: no training, the same JSON every time.

`write_tiny_model_dir(path, cfg)` writes what `Processor.from_pretrained` reads (tokenizer.json,
tokenizer_config.json, preprocessor_config.json with a small `scale_resolution`, generation_config.json) plus
cfg's config.json.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from uhd_jax.config import ModelConfig
from uhd_jax.data.processor import DEFAULT_SPECIAL_TOKENS

VOCAB_SIZE = 512
IMAGE_PAD_ID = 500
VIDEO_PAD_ID = 501

# id of every special token (name in DEFAULT_SPECIAL_TOKENS -> id); image/video pads as tiny_config() has them
SPECIAL_IDS = {
    "image_token": IMAGE_PAD_ID,
    "video_token": VIDEO_PAD_ID,
    "image_start_token": 502,
    "image_end_token": 503,
    "slice_start_token": 504,
    "slice_end_token": 505,
    "image_id_start_token": 506,
    "image_id_end_token": 507,
    "im_start_token": 508,
    "im_end_token": 509,
    "pad_token": 510,
}

# small views: a 800 px image gives a thumbnail + 4 slices of ~224 px (<= 16x16 patches of 14 px)
TINY_PREPROCESSOR = {
    "image_processor_type": "MiniCPMV4_6ImageProcessor",
    "processor_class": "MiniCPMV4_6Processor",
    "max_slice_nums": 4,
    "scale_resolution": 224,
    "use_image_id": True,
    "slice_mode": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _special_tokens() -> dict[int, str]:
    out = {tid: DEFAULT_SPECIAL_TOKENS[name] for name, tid in SPECIAL_IDS.items()}
    for tid in range(256, VOCAB_SIZE):
        out.setdefault(tid, f"<|reserved_{tid}|>")
    return out


def tiny_tokenizer_json() -> str:
    """tokenizer.json text of the byte-level tiny tokenizer (ids < 512)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _BYTE_OF[c])
    vocab = {c: i for i, c in enumerate(alphabet)}  # id == the byte's value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    d = json.loads(tok.to_str())
    d["added_tokens"] = []
    for tid, content in sorted(_special_tokens().items()):
        d["model"]["vocab"][content] = tid
        d["added_tokens"].append(dict(id=tid, content=content, single_word=False, lstrip=False, rstrip=False,
                                      normalized=False, special=True))
    return json.dumps(d)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (what the ByteLevel pre-tokenizer maps each byte to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_of() -> dict[str, int]:
    """The inverse table, character -> byte (the order ByteLevel.alphabet() does not keep)."""
    return {c: b for b, c in byte_alphabet().items()}


_BYTE_OF = _byte_of()


def tiny_tokenizer() -> Tokenizer:
    """The byte-level tokenizer for tiny_config(): every id < 512, `<|image_pad|>` = 500, `<|video_pad|>` = 501."""
    return Tokenizer.from_str(tiny_tokenizer_json())


def write_tiny_model_dir(path: str | os.PathLike, cfg: ModelConfig, **preprocessor_overrides) -> str:
    """Writes a model directory for `cfg` (a tiny config) that `Processor.from_pretrained` reads; returns the path.

    `preprocessor_overrides`: preprocessor_config.json entries replacing TINY_PREPROCESSOR's (e.g.
    scale_resolution=112). Refuses a config whose image/video token ids or vocabulary disagree with this
    tokenizer."""
    if cfg.image_token_id != IMAGE_PAD_ID or cfg.video_token_id != VIDEO_PAD_ID:
        raise ValueError(f"the tiny tokenizer has <|image_pad|>={IMAGE_PAD_ID}, <|video_pad|>={VIDEO_PAD_ID} but the "
                         f"config says image_token_id={cfg.image_token_id}, video_token_id={cfg.video_token_id}")
    if cfg.text.vocab_size < VOCAB_SIZE:
        raise ValueError(f"the tiny tokenizer needs vocab_size >= {VOCAB_SIZE}, config has {cfg.text.vocab_size}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    names = {name: DEFAULT_SPECIAL_TOKENS[name] for name in SPECIAL_IDS}
    pre = dict(TINY_PREPROCESSOR, patch_size=cfg.vision.patch_size, **preprocessor_overrides)
    files = {
        "tokenizer.json": tiny_tokenizer_json(),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "TokenizersBackend", "eos_token": names["im_end_token"],
            "pad_token": names["pad_token"], "model_max_length": 1 << 30,
            "extra_special_tokens": {k: v for k, v in names.items() if k not in ("pad_token",)}}, indent=2),
        "preprocessor_config.json": json.dumps(pre, indent=2),
        # as the real model: bos = <|im_start|>, eos = <|endoftext|> and <|im_end|>
        "generation_config.json": json.dumps({
            "bos_token_id": SPECIAL_IDS["im_start_token"],
            "eos_token_id": [SPECIAL_IDS["pad_token"], SPECIAL_IDS["im_end_token"]],
            "do_sample": False}, indent=2),
    }
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    cfg.to_json(os.path.join(path, "config.json"))
    return path
