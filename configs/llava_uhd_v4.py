"""LLaVA-UHD v4 as the paper sets it up: a SigLIP2 ViT with the intra-ViT window merger and a Qwen3 dense LLM,
built by `convert from-separate`, trained in stages, on a TPU pod (e.g. v5p-64: 32 chips, fsdp over all).

    python3 -m uhd_jax.convert from-separate --vision-dir siglip2-so400m --llm-dir Qwen3-8B --out ckpt/uhdv4
    python3 -m uhd_jax.train --config configs/llava_uhd_v4.py:stage=align \\
        --config.init.checkpoint=ckpt/uhdv4 --config.data.path=pretrain.jsonl --workdir gs://bucket/uhdv4_align

Stages (`:stage=`): align (only the two mergers train: the window merger and the post-ViT merger, the ViT
blocks and the LLM frozen), pretrain (ViT and mergers train, LLM frozen), sft (everything trains). `mode=4x`
skips the intra-ViT merger (the paper's ablation).
"""

from uhd_jax.train.config import base_config, parse_arg

STAGES = {
    # (frozen parameter patterns, peak lr)
    "align": ((r"vision/vision_tower/(?!vit_merger/).*", "text/.*"), 1e-3),
    "pretrain": (("text/.*",), 2e-5),
    "sft": ((), 1e-5),
}


def get_config(arg=None):
    args = parse_arg(arg, stage="sft", mode="16x")
    if args.stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {args.stage!r}")
    frozen, lr = STAGES[args.stage]
    c = base_config()
    c.model.name = "dir"
    c.model.downsample_mode = args.mode
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"

    c.data.source = "jsonl"
    c.data.seq_len = 4096
    c.data.views_per_row = 10
    c.data.tokens_per_view = 1152 if args.mode == "16x" else 1160
    c.data.num_workers = 16

    c.optimizer.learning_rate = lr
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.0 if args.stage == "align" else 0.1
    c.optimizer.frozen = frozen

    c.train.steps = 20000 if args.stage != "sft" else 10000
    c.train.batch_size = 256
    c.train.checkpoint_every = 1000
    c.train.eval_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1  # v5p-64: 32 chips -> fsdp=32
    c.mesh.tensor = 1
    return c
