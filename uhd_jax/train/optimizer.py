"""The optimizer: optax AdamW with warm-up + cosine or linear decay, global-norm clipping of the trainable
gradients, no weight decay on norms / biases / embeddings, per-module learning-rate multipliers and freezing.

    opt = make_optimizer(3e-5, warmup_steps=100, total_steps=10_000, weight_decay=0.1,
                         lr_multipliers=(("vision/.*", 0.1),), frozen=FREEZE_VISION)
    schedule = make_schedule(3e-5, warmup_steps=100, total_steps=10_000)  # the lr of each step, for logging

Parameters are selected by regular expressions over their paths: the dict keys from the root of the params tree
joined by "/" (`flax.traverse_util` style), e.g. "vision/vision_tower/layers_pre/layers/mlp/fc1/kernel" or
"text/layers/layer_0/self_attn/q_proj/kernel". A pattern must match the whole path (`re.fullmatch`). Within each
list the first matching pattern wins. Every pattern must select at least one parameter when the optimizer state is
created (`init`), else a ValueError names it: a typo never silently trains (or decays) everything. Scanned layer
stacks are one array each, so a pattern selects a whole stack (all its layers), never single layers.

Frozen parameters go through `optax.set_to_zero` under `optax.multi_transform`: they carry no optimizer state at
all, and clipping sees only the trainable gradients. `train.step.make_train_step(..., frozen=...)` with the same
patterns also leaves them out of differentiation (no backward work for their weight gradients) and keeps them
bit-identical.

Weight decay (decoupled, AdamW) skips `DEFAULT_NO_DECAY`: biases, the scales of every norm (SigLIP LayerNorm,
Qwen RMSNorm, the gated DeltaNet norm; every `scale` in our tree belongs to a norm), the token embedding (also the
tied lm_head; an untied `lm_head/kernel` is decayed like any projection), the ViT position table, and the Gated
DeltaNet's per-head `A_log` / `dt_bias` (decay-rate parameters, not weights, as in Mamba). Decay is
`lr x multiplier x weight_decay x param`, as in per-group PyTorch AdamW.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Sequence

import jax
import optax
from flax.core.meta import AxisMetadata

# Every pattern below matches in both LLM variants (dense Qwen3, hybrid Qwen3.5), so the "must match" rule holds.
DEFAULT_NO_DECAY = (
    r".*/(bias|scale|A_log|dt_bias)",  # biases, norm scales, DeltaNet decay-rate parameters
    r"(.*/)?(embed_tokens|position_embedding)",  # token embeddings (and tied lm_head), ViT position table
)
# ms-swift's default for MiniCPM-V: the ViT and both mergers frozen, the LLM trained.
FREEZE_VISION = ("vision/.*",)
# The official MiniCPM-V fine-tuning with the LLM frozen: ViT and mergers trained.
FREEZE_LLM = ("text/.*",)

SCHEDULES = ("cosine", "linear", "constant")

_FROZEN, _TRAIN = "frozen", "train"


def path_string(keypath) -> str:
    """A jax key path -> "a/b/c". The `value` field of an `nn.Partitioned` box is not part of the path, so boxed
    and plain trees give the same strings."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_paths(tree) -> list[str]:
    """The "a/b/c" path of every leaf (array) of a params tree, boxed or plain."""
    return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    if isinstance(patterns, str):  # ("vision/.*") without the comma is a string, not a tuple
        raise TypeError(f"{what} must be a sequence of patterns, got the string {patterns!r} (write ({patterns!r},))")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: invalid regular expression {p!r}: {e}") from None
    return out


def _first_match(path: str, compiled: Sequence[re.Pattern]) -> int:
    """Index of the first pattern matching the whole path, or -1."""
    for i, c in enumerate(compiled):
        if c.fullmatch(path):
            return i
    return -1


def check_patterns(paths: Sequence[str], patterns: Sequence[str], what: str) -> None:
    """ValueError naming every pattern of `patterns` that selects no path (none matches, or every path it matches
    is taken by an earlier pattern)."""
    compiled = _compile(patterns, what)
    won = [0] * len(compiled)
    for path in paths:
        i = _first_match(path, compiled)
        if i >= 0:
            won[i] += 1
    bad = []
    for i, (p, c) in enumerate(zip(patterns, compiled)):
        if won[i]:
            continue
        if any(c.fullmatch(path) for path in paths):
            bad.append(f"{p!r} (every parameter it matches is taken by an earlier pattern)")
        else:
            bad.append(f"{p!r}")
    if bad:
        sample = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise ValueError(f"{what}: pattern(s) {', '.join(bad)} match no parameter (patterns must match the whole "
                         f"\"a/b/c\" path, e.g. {sample})")


def _is_box(x) -> bool:
    return isinstance(x, AxisMetadata)


def _map_paths(fn: Callable[[str], Any], tree):
    """A tree of fn(path) over the leaves of `tree`, boxes (`nn.Partitioned`) taken as leaves: a prefix of a boxed
    tree, so optax masks a frozen parameter's whole box (its state holds a bare MaskedNode, no box around it)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_string(p)), tree, is_leaf=_is_box)


def frozen_mask(params, frozen: Sequence[str]):
    """A tree of bools, True where a parameter is frozen by `frozen` (patterns checked as in `make_optimizer`)."""
    if not frozen:
        return jax.tree.map(lambda _: False, params)
    check_patterns(param_paths(params), frozen, "frozen")
    compiled = _compile(frozen, "frozen")
    return _map_paths(lambda s: _first_match(s, compiled) >= 0, params)


def make_schedule(learning_rate: float, *, schedule: str | None = None, warmup_steps: int = 0,
                  total_steps: int | None = None, end_lr_ratio: float = 0.1) -> optax.Schedule:
    """The learning rate as a function of the step (0-based: the lr of the update that step applies).

    Linear warm-up from 0 over `warmup_steps`, then `schedule`: "cosine" or "linear" decay to
    `end_lr_ratio` x peak at `total_steps` (constant after), or "constant". schedule=None: "cosine" when
    `total_steps` is given, else "constant"."""
    kind = schedule if schedule is not None else ("constant" if total_steps is None else "cosine")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
    if not (isinstance(warmup_steps, numbers.Integral) and warmup_steps >= 0):
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if kind == "constant":
        if not warmup_steps:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                     optax.constant_schedule(learning_rate)], [warmup_steps])
    if total_steps is None:
        raise ValueError(f"schedule {kind!r} decays to step total_steps; total_steps is None")
    if not (isinstance(total_steps, numbers.Integral) and total_steps > warmup_steps):
        raise ValueError(f"total_steps ({total_steps!r}) must be an integer > warmup_steps ({warmup_steps})")
    if not 0.0 <= end_lr_ratio <= 1.0:
        raise ValueError(f"end_lr_ratio must be in [0, 1], got {end_lr_ratio!r}")
    end = learning_rate * end_lr_ratio
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps, end_value=end)
    decay = optax.linear_schedule(learning_rate, end, total_steps - warmup_steps)
    if not warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


def make_optimizer(learning_rate: float = 1e-5, *, schedule: str | None = None, warmup_steps: int = 0,
                   total_steps: int | None = None, end_lr_ratio: float = 0.1, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0,
                   no_decay: Sequence[str] = DEFAULT_NO_DECAY,
                   lr_multipliers: Sequence[tuple[str, float]] = (),
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
    """AdamW with the lr of `make_schedule(learning_rate, schedule=..., warmup_steps=..., total_steps=...,
    end_lr_ratio=...)`, global-norm clipping at `clip_norm` (None or 0: none) of the trainable gradients,
    decoupled `weight_decay` on every trainable parameter except those matching `no_decay`, the lr (and decay)
    of parameters matching `lr_multipliers` ((pattern, factor), ...) scaled by their factor, and parameters
    matching `frozen` neither updated nor given optimizer state. Patterns: see the module docstring; `init`
    raises if one selects no parameter. Works on plain and on `nn.Partitioned`-boxed parameter trees (the
    moments then carry their parameters' logical names)."""
    sched = make_schedule(learning_rate, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps,
                          end_lr_ratio=end_lr_ratio)
    pairs = tuple(lr_multipliers)
    bad = [x for x in pairs if not (isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], str))]
    if bad:
        raise TypeError(f"lr_multipliers must be ((pattern, factor), ...); got the item(s) {bad!r}")
    mult_patterns, factors = tuple(p for p, _ in pairs), tuple(float(m) for _, m in pairs)
    for p, m in zip(mult_patterns, factors):
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"lr_multipliers: factor {m!r} of {p!r} must be > 0 (freeze with `frozen` instead)")
    no_decay_c, mult_c, frozen_c = (_compile(no_decay, "no_decay"), _compile(mult_patterns, "lr_multipliers"),
                                    _compile(frozen, "frozen"))
    no_decay, frozen = tuple(no_decay), tuple(frozen)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if clip_norm is not None and clip_norm < 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")

    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        decays = lambda tree: _map_paths(lambda s: _first_match(s, no_decay_c) < 0, tree)
        chain.append(optax.add_decayed_weights(weight_decay, mask=decays))
    if any(m != 1.0 for m in factors):
        # stateless per-group scaling: one Adam state for all trainable parameters whatever their group
        groups = {str(i): optax.scale(m) for i, m in enumerate(factors)}
        groups["default"] = optax.identity()

        def group(path):
            i = _first_match(path, mult_c)
            return "default" if i < 0 or factors[i] == 1.0 else str(i)

        chain.append(optax.multi_transform(groups, lambda tree: _map_paths(group, tree)))
    chain.append(optax.scale_by_learning_rate(sched))
    tx = optax.chain(*chain)  # = clip + optax.adamw(sched, b1, b2, eps, weight_decay, mask) when no multipliers
    if frozen:
        frozen_label = lambda s: _FROZEN if _first_match(s, frozen_c) >= 0 else _TRAIN
        tx = optax.multi_transform({_FROZEN: optax.set_to_zero(), _TRAIN: tx},
                                   lambda tree: _map_paths(frozen_label, tree))

    def init(params):
        paths = param_paths(params)
        check_patterns(paths, no_decay, "no_decay")
        check_patterns(paths, mult_patterns, "lr_multipliers")
        check_patterns(paths, frozen, "frozen")
        if frozen and all(_first_match(s, frozen_c) >= 0 for s in paths):
            raise ValueError(f"frozen {frozen!r} freezes every parameter: nothing to train")
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)
