"""Fine-tune with the visual-computation savings active ("Treat Visual Tokens as Text?"), as the paper does: from a
converted MiniCPM-V 4.6 checkpoint (or a `from-separate` LLaVA-UHD v4 model) and a calibrated head mask.

    python3 -m uhd_jax.yopo calibrate --checkpoint ckpt/minicpmv46 --data calib.jsonl --target-heads 4 \\
        --first-layer 8 --out heads.npz
    python3 -m uhd_jax.train --config configs/yopo_finetune.py:mask=heads.npz \\
        --config.init.checkpoint=ckpt/minicpmv46 --config.data.path=train.jsonl --workdir runs/yopo

Variants (`:arg`, comma separated), the paper's combination by default: window=5 (cut 1: each visual query sees a
5x5 window of its view's tokens + the text before it; 0: off) | mask=PATH (cut 2: the calibration's active-head
mask; "": off) | drop=0.5 (cut 3: visual tokens leave the LLM at half its depth; 0: off) | ffn=2 (cut 4: visual
tokens use half the FFN neurons; 1: off) | mode=16x|4x | freeze=vision|llm|none (as minicpmv46_sft.py).
The paper's schedule: one epoch of the stage-2 data, learning rate 2e-5 with cosine decay and 3% warm-up.
JSONL lines as for minicpmv46_sft.py.
"""

from uhd_jax.train.config import minicpmv46_finetune_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, window=5, mask="", drop=0.5, ffn=2, mode="16x", freeze="vision")
    c = minicpmv46_finetune_config(args.freeze, args.mode)
    c.model.cuts.window = args.window
    c.model.cuts.head_mask = args.mask
    c.model.cuts.drop_fraction = args.drop
    c.model.cuts.ffn_ratio = args.ffn

    c.optimizer.learning_rate = 2e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 30  # ~3% of the steps
    c.optimizer.weight_decay = 0.0
    c.train.steps = 1000
    c.train.checkpoint_every = 250
    c.train.eval_every = 250
    return c
