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

from uhd_jax.train.config import minicpmv46_finetune_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, freeze="vision", mode="16x")
    c = minicpmv46_finetune_config(args.freeze, args.mode)
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.1
    c.train.steps = 3000
    c.train.checkpoint_every = 500
    c.train.eval_every = 500
    return c
