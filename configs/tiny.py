"""Tiny random model on built-in data: the CPU smoke run and the README's first command (about a minute).

    python3 -m uhd_jax.train --config configs/tiny.py --workdir /tmp/uhd_tiny
    python3 -m uhd_jax.train --config configs/tiny.py:text_model=qwen3 --config.train.steps=20

Variants (`:arg`, comma separated key=value): text_model=qwen3_5_text|qwen3, mode=16x|4x,
data=random|synthetic_ocr. `random` (default): random images and a cycling text target that the tiny model learns
in ~40 steps (loss 6.2 -> < 1); `synthetic_ocr`: the built-in OCR task (rendered text, the tiny byte tokenizer,
the grain pipeline), which needs far longer runs to learn (60 steps: 6.2 -> 4.0) and ~2 s per step here.
"""

from uhd_jax.train.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, text_model="qwen3_5_text", mode="16x", data="random")
    c = base_config()
    c.model.name = "tiny"
    c.model.text_model = args.text_model
    c.model.downsample_mode = args.mode
    c.model.dtype = "float32"

    c.data.source = args.data
    c.data.seq_len = 128
    c.data.views_per_row = 2
    c.data.tokens_per_view = 64
    if args.data == "synthetic_ocr":  # the tiny processor: up to 5 views of <= 320 patches per image
        c.data.seq_len = 256
        c.data.views_per_row = 5
        c.data.tokens_per_view = 320

    c.train.steps = 60
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.checkpoint_every = 30
    c.train.eval_every = 30
    c.train.eval_batches = 2

    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 5
    c.optimizer.clip_norm = 1.0
    c.mesh.fsdp = -1
    return c
