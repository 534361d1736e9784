"""The optimizer: optax AdamW with warm-up + cosine decay and global-norm clipping.

(The trainer adds parameter freezing and per-group learning-rate multipliers on top of this.)
"""

from __future__ import annotations

import optax


def make_optimizer(learning_rate: float = 1e-5, *, warmup_steps: int = 0, total_steps: int | None = None,
                   end_lr_ratio: float = 0.1, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW; lr warms up linearly over `warmup_steps`, then decays by a cosine to `end_lr_ratio` x peak at
    `total_steps` (constant after warm-up when total_steps is None)."""
    if total_steps is None:
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else learning_rate
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, 1),
                                                      end_value=learning_rate * end_lr_ratio)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*chain)
