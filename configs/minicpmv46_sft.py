"""Fine-tune a converted MiniCPM-V 4.6 checkpoint on a JSONL conversation dataset.

    python3 -m uhd_jax.convert hf-to-jax --hf-dir MiniCPM-V-4_6 --out ckpt/minicpmv46
    python3 -m uhd_jax.train --config configs/minicpmv46_sft.py:freeze=vision \\
        --config.init.checkpoint=ckpt/minicpmv46 --config.data.path=train.jsonl --workdir runs/sft

Variants (`:arg`, comma separated): freeze=vision (default: ViT and both mergers frozen, the LLM trained, as
ms-swift does for MiniCPM-V) | llm (the LLM frozen, ViT and mergers trained, as the official MiniCPM-V
fine-tuning code does) | none (everything trained); mode=16x|4x.
JSONL lines: {"id", "image": path | {"<image_00>": path, ...}, "conversations": [{"role": "user", "content":
"<image>\\n..."}, {"role": "assistant", "content": "..."}]} with image paths relative to the file.
"""

from uhd_jax.train.config import base_config, parse_arg
from uhd_jax.train.optimizer import FREEZE_LLM, FREEZE_VISION

FREEZE = {"vision": FREEZE_VISION, "llm": FREEZE_LLM, "none": ()}


def get_config(arg=None):
    args = parse_arg(arg, freeze="vision", mode="16x")
    if args.freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {sorted(FREEZE)}, got {args.freeze!r}")
    c = base_config()
    c.model.name = "dir"  # the architecture comes from init.checkpoint's config.json
    c.model.downsample_mode = args.mode
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"

    c.data.source = "jsonl"
    c.data.seq_len = 2048
    c.data.views_per_row = 10  # thumbnail + up to 9 slices (max_slice_nums 9)
    c.data.tokens_per_view = 1152 if args.mode == "16x" else 1160  # every view of an image with aspect < 9:1
    c.data.num_workers = 8

    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.1
    c.optimizer.frozen = FREEZE[args.freeze]

    c.train.steps = 3000
    c.train.batch_size = 32
    c.train.checkpoint_every = 500
    c.train.eval_every = 500
    c.mesh.fsdp = -1
    return c
