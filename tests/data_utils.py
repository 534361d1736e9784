"""Test helpers for the data pipeline: a small BPE tokenizer that carries MiniCPM-V 4.6's real special tokens
at their real ids, a model directory holding it, and (test-only) the transformers reference processor."""

from __future__ import annotations

import functools
import io
import json
import os
import types

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DIR = os.path.join(REPO, "configs", "reference", "minicpm-v-4.6")

SPECIAL_NAMES = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}

CORPUS = [
    "Describe this image in detail.",
    "What is written on the sign? The sign says hello world.",
    "user assistant system: You are a helpful assistant.",
    "A cat sits on a red mat next to 3 dogs, 42 birds and 1000 fish.",
    "How many slices? Answer with a number: 0 1 2 3 4 5 6 7 8 9 10.",
    "Ünïcödé テキスト 中文 emoji 🙂 tabs\tand\nnewlines\n\n",
]


def added_tokens():
    with open(os.path.join(REF_DIR, "added_tokens.json")) as f:
        return json.load(f)["added_tokens"]


@functools.lru_cache(maxsize=None)
def tokenizer_json() -> str:
    """A byte-level BPE (trained here on a few sentences) whose vocabulary also holds the real added tokens
    at their real ids (248044..248093)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    d = json.loads(tok.to_str())
    d["added_tokens"] = []
    for t in added_tokens():
        d["model"]["vocab"][t["content"]] = t["id"]
        d["added_tokens"].append(dict(id=t["id"], content=t["content"], single_word=False, lstrip=False,
                                      rstrip=False, normalized=False, special=t["special"]))
    return json.dumps(d)


def make_model_dir(path, **preprocessor_overrides) -> str:
    """A HF-style model dir: tokenizer.json, tokenizer_config.json, preprocessor_config.json,
    generation_config.json (the last two copied from configs/reference, with overrides)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(tokenizer_json())
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "model_max_length": 1 << 30, "extra_special_tokens": SPECIAL_NAMES}, f)
    with open(os.path.join(REF_DIR, "preprocessor_config.json")) as f:
        pre = json.load(f)
    pre.update(preprocessor_overrides)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f)
    with open(os.path.join(REF_DIR, "generation_config.json")) as f:
        gen = f.read()
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        f.write(gen)
    return path


def reference_image_processor(**kw):
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    with open(os.path.join(REF_DIR, "preprocessor_config.json")) as f:
        pre = json.load(f)
    args = {k: pre[k] for k in ("max_slice_nums", "scale_resolution", "patch_size", "slice_mode", "image_mean",
                                "image_std", "use_image_id")}
    args.update(kw)
    return MiniCPMV4_6ImageProcessorPil(**args)


def reference_processor(model_dir, **image_kw):
    """transformers' MiniCPMV4_6Processor over the test tokenizer (loaded by transformers from model_dir)."""
    from transformers import AutoTokenizer
    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor

    class _RefProcessor(MiniCPMV4_6Processor):
        # the video processor class check needs torchvision; the video path is not used here
        def check_argument_for_proper_class(self, name, arg):
            return None

    tok = AutoTokenizer.from_pretrained(model_dir)
    ip = reference_image_processor(**image_kw)
    vp = types.SimpleNamespace(slice_mode=True, downsample_mode="16x")
    return _RefProcessor(image_processor=ip, video_processor=vp, tokenizer=tok)


def reference_views(pixel_values: np.ndarray, target_sizes, patch_size: int = 14):
    """Splits the reference's NaViT-packed pixel_values [1, C, P, N*P] into per-view [C, H, W] arrays."""
    pv = np.asarray(pixel_values)[0]
    c = pv.shape[0]
    out, off = [], 0
    for h, w in np.asarray(target_sizes).tolist():
        n = h * w * patch_size
        chunk = pv[:, :, off:off + n]  # [C, P, h*w*P]: (c, row-in-patch, patch index, col-in-patch)
        v = chunk.reshape(c, patch_size, h, w, patch_size).transpose(0, 2, 1, 3, 4).reshape(c, h * patch_size,
                                                                                          w * patch_size)
        out.append(v)
        off += n
    assert off == pv.shape[-1], (off, pv.shape)
    return out


def reference_plan(ref, h, w, mode, slice_mode, msn, scale_resolution=448):
    """The reference image processor `ref`'s own _preprocess with the pixel work stubbed out: (grid, target_sizes)
    for an image of any size, instantly."""
    img = np.broadcast_to(np.zeros((3, 1, 1), np.uint8), (3, h, w))
    orig = ref.resize
    ref.resize = lambda image, size, resample=None, **k: np.zeros((3, size.height, size.width), np.uint8)
    try:
        out = ref._preprocess([img], do_resize=True, resample=ref.resample, do_rescale=False, rescale_factor=1.0,
                              do_normalize=False, image_mean=None, image_std=None, max_slice_nums=msn,
                              scale_resolution=scale_resolution, patch_size=14, slice_mode=slice_mode,
                              downsample_mode=mode)
    finally:
        ref.resize = orig
    return out["grids"][0], out["target_sizes"].tolist()


def random_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A cheap non-trivial test image: smooth gradients plus a little noise (size h x w)."""
    rs = np.random.RandomState(seed)
    yy = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    xx = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    base = np.stack([yy + 0 * xx, xx + 0 * yy, (yy + xx) / 2], -1)
    noise = rs.randint(-40, 40, size=(min(h, 64), min(w, 64), 3)).astype(np.float32)
    base += np.tile(noise, (-(-h // noise.shape[0]), -(-w // noise.shape[1]), 1))[:h, :w]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=quality, **kw)
    return b.getvalue()
