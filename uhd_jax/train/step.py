"""One training step under a mesh: next-token loss, gradients (optionally accumulated over micro-batches), optax
update; parameters created already sharded.

    mesh = make_mesh({"data": 2, "fsdp": -1})
    opt = make_optimizer(1e-4, warmup_steps=100, total_steps=10_000, frozen=FREEZE_VISION)
    state, shardings = init_train_state(model, opt, example_batch, mesh, jax.random.key(0))
    step = make_train_step(model, opt, shardings, mesh, frozen=FREEZE_VISION, grad_accum=4,
                           schedule=make_schedule(1e-4, warmup_steps=100, total_steps=10_000))
    state, metrics = step(state, global_batch(batch, mesh))

Master weights and optimizer state are float32 (`model.param_dtype`); the forward/backward computes in
`model.dtype` (bf16 on accelerators). The state is donated: the step updates it in place.

The loss is the sum of the per-token cross-entropies over the whole global batch (all micro-batches, all hosts)
divided by the global batch's number of target tokens, so a token weighs the same however the batch is split into
micro-batches or over devices. With grad_accum=k the B rows are split into k micro-batches of B/k rows (micro-batch
j = rows j, j+k, j+2k, ...: every device's contiguous block of rows holds rows of every micro-batch, so nothing
moves between devices), run one after another by a `lax.scan` that accumulates float32 gradients.

Frozen parameters (`frozen`, the same patterns as `make_optimizer(frozen=...)`) are not differentiated at all (as
under `lax.stop_gradient`: XLA computes none of their weight gradients) and come out bit-identical.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uhd_jax.data.batch import ModelBatch
from uhd_jax.model.minicpmv import MiniCPMV
from uhd_jax.model.text_model import lm_head_table
from uhd_jax.parallel.axes import constrain
from uhd_jax.parallel.mesh import BATCH_AXES, batch_rows_divisor, batch_sharding, param_shardings
from uhd_jax.train.loss import chunked_cross_entropy, next_token_targets
from uhd_jax.train.optimizer import frozen_mask


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any  # float32 master weights (plain arrays)
    opt_state: Any


def loss_sum(model: MiniCPMV, params, batch: ModelBatch, *, chunk_tokens: int = 1024):
    """(sum of the next-token cross-entropies over the batch's loss-mask tokens, number of those tokens)."""
    _, out = model.apply({"params": params}, batch, compute_logits=False)
    targets, weights = next_token_targets(batch.input_ids, batch.loss_mask, batch.segment_ids)
    table = lm_head_table(params["text"], model.config.text)
    total = chunked_cross_entropy(out["norm"], table, targets, weights, valid_vocab=model.config.text.vocab_size,
                                  chunk_tokens=chunk_tokens, compute_dtype=model.dtype, reduction="sum")
    return total, jnp.sum(weights.astype(jnp.int32))


def loss_fn(model: MiniCPMV, params, batch: ModelBatch, *, chunk_tokens: int = 1024):
    """Mean next-token cross-entropy over the batch's loss-mask tokens (never forms the full logits).
    Returns (loss, aux) with aux["tokens"] the number of target tokens."""
    total, tokens = loss_sum(model, params, batch, chunk_tokens=chunk_tokens)
    return total / jnp.maximum(tokens, 1).astype(jnp.float32), {"tokens": tokens}


def target_tokens(batch: ModelBatch):
    """Number of target tokens of a (global) batch: int32 scalar."""
    return jnp.sum(next_token_targets(batch.input_ids, batch.loss_mask, batch.segment_ids)[1].astype(jnp.int32))


def split_micro_batches(batch: ModelBatch, k: int, rows_divisor: int = 1) -> ModelBatch:
    """[B, ...] arrays -> [k, B/k, ...]: micro-batch j holds rows j, j+k, j+2k, ... `rows_divisor` is the product
    of the batch mesh axes: each device's B/rows_divisor contiguous rows must split into whole groups of k, so
    that every micro-batch has the same rows on every device and the split moves nothing between devices."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    if k < 1:
        raise ValueError(f"grad_accum must be >= 1, got {k}")
    if rows % (k * rows_divisor):
        raise ValueError(f"grad_accum={k}: the global batch of {rows} rows over {rows_divisor} batch shard(s) "
                         f"({rows // rows_divisor if rows % rows_divisor == 0 else rows / rows_divisor} rows each) "
                         f"does not split into {k} micro-batches of whole rows per shard; batch_size must be a "
                         f"multiple of grad_accum x data x fsdp = {k * rows_divisor}")

    def one(a):
        a = a.reshape((rows // k, k) + a.shape[1:]).swapaxes(0, 1)  # [k, B/k, ...]; row i*k + j -> [j, i]
        return constrain(a, (None,) + BATCH_AXES + (None,) * (a.ndim - 2))  # rows stay split over the batch axes

    return jax.tree.map(one, batch)


def _partition(params, frozen: Sequence[str]):
    """(leaves, treedef, indices of the trainable leaves)."""
    mask = jax.tree.leaves(frozen_mask(params, frozen))
    leaves, treedef = jax.tree.flatten(params)
    return leaves, treedef, [i for i, m in enumerate(mask) if not m]


def loss_and_grads(model: MiniCPMV, params, batch: ModelBatch, *, frozen: Sequence[str] = (), grad_accum: int = 1,
                   chunk_tokens: int = 1024, rows_divisor: int = 1):
    """(loss, tokens, grads): the mean next-token loss over the whole batch's target tokens, their number, and its
    gradients w.r.t. `params` (frozen parameters: zeros, never computed), over `grad_accum` micro-batches
    (float32 accumulation). Any grad_accum gives the same loss and gradients up to float rounding."""
    leaves, treedef, train_idx = _partition(params, frozen)
    tokens = target_tokens(batch)  # the whole global batch's: every micro-batch divides by it
    denom = jnp.maximum(tokens, 1).astype(jnp.float32)

    def micro_loss(trainable, micro):
        merged = list(leaves)
        for i, t in zip(train_idx, trainable):
            merged[i] = t
        total, _ = loss_sum(model, jax.tree.unflatten(treedef, merged), micro, chunk_tokens=chunk_tokens)
        return total / denom

    trainable = [leaves[i] for i in train_idx]
    grad_fn = jax.value_and_grad(micro_loss)
    if grad_accum == 1:
        loss, grads = grad_fn(trainable, batch)
    else:
        micro = split_micro_batches(batch, grad_accum, rows_divisor)

        def body(carry, mb):
            loss_acc, grad_acc = carry
            loss_j, g = grad_fn(trainable, mb)
            return (loss_acc + loss_j, [a + b.astype(jnp.float32) for a, b in zip(grad_acc, g)]), None

        zeros = [jnp.zeros(t.shape, jnp.float32) for t in trainable]
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
        grads = [g.astype(t.dtype) for g, t in zip(grads, trainable)]
    full = [jnp.zeros_like(x) for x in leaves]  # frozen: zeros (the optimizer's set_to_zero never reads them)
    for i, g in zip(train_idx, grads):
        full[i] = g
    return loss, tokens, jax.tree.unflatten(treedef, full)


def _boxed_state(model: MiniCPMV, optimizer, example_batch: ModelBatch, rng):
    params = model.init(rng, example_batch)["params"]  # nn.Partitioned leaves carry logical names
    # optax maps over the boxes, so its moments carry the same names as their parameters
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def state_shardings(model: MiniCPMV, optimizer, example_batch: ModelBatch, mesh: Mesh, report: list | None = None):
    """NamedShardings of the TrainState (parameters and moments by their logical names, scalars replicated),
    from shapes alone: nothing is allocated."""
    boxed = jax.eval_shape(lambda r: _boxed_state(model, optimizer, example_batch, r), jax.random.key(0))
    return param_shardings(boxed, mesh, report)


def abstract_train_state(model: MiniCPMV, optimizer, example_batch: ModelBatch, mesh: Mesh) -> TrainState:
    """The TrainState as jax.ShapeDtypeStructs that carry their shardings (`.sharding`): the target a checkpoint
    is restored into, on any mesh. Nothing is allocated."""
    boxed = jax.eval_shape(lambda r: _boxed_state(model, optimizer, example_batch, r), jax.random.key(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                        param_shardings(boxed, mesh))


def init_train_state(model: MiniCPMV, optimizer, example_batch: ModelBatch, mesh: Mesh, rng,
                     params=None, shardings: TrainState | None = None) -> tuple[TrainState, TrainState]:
    """A fresh TrainState created directly in its shards (never whole on one device), and its shardings.
    `params` (e.g. a converted checkpoint, host arrays) replaces the random initialisation; it is placed
    shard by shard and the optimizer state is created around it. `shardings`: `state_shardings(...)` when the
    caller has them already."""
    if shardings is None:
        shardings = state_shardings(model, optimizer, example_batch, mesh)

    def fresh(r):
        return nn.unbox(_boxed_state(model, optimizer, example_batch, r))

    with jax.set_mesh(mesh):
        if params is None:
            state = jax.jit(fresh, out_shardings=shardings)(rng)
        else:
            params = jax.device_put(params, shardings.params)
            state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                 opt_state=optimizer.init(p)),
                            out_shardings=shardings)(params)  # not donated: the caller may still hold `params`
    return state, shardings


def make_train_step(model: MiniCPMV, optimizer: optax.GradientTransformation, shardings: TrainState, mesh: Mesh,
                    *, chunk_tokens: int = 1024, grad_accum: int = 1, frozen: Sequence[str] = (),
                    schedule: Callable | None = None,
                    skip_nonfinite: bool = False) -> Callable[[TrainState, ModelBatch], tuple[TrainState, dict]]:
    """The jitted step `(state, batch) -> (state, metrics)`: state in and out with `shardings` (donated), batch
    rows over the batch mesh axes, metrics replicated:
      loss       mean cross-entropy over the global batch's target tokens (float32)
      grad_norm  global norm of the trainable gradients, before clipping
      tokens     number of target tokens of the global batch (int32)
      finite     loss and every trainable gradient finite (bool)
      lr         `schedule(state.step)`, the lr of this update (only when `schedule` is given)
    grad_accum: micro-batches per step (the batch's rows must be a multiple of grad_accum x data x fsdp).
    frozen: the `frozen` patterns given to `make_optimizer`: those parameters are not differentiated and stay
    bit-identical (with fewer patterns than the optimizer's, the step differentiates parameters the optimizer then
    ignores: wasted work, and grad_norm counts them). skip_nonfinite: when not `finite`, return the input state unchanged (step not advanced)
    instead of applying the update; off by default (the loop stops the run on a non-finite step instead)."""
    rows = batch_sharding(mesh, 1)  # a prefix for every batch array: rows split, the other dims whole
    replicated = NamedSharding(mesh, PartitionSpec())
    divisor = batch_rows_divisor(mesh)
    frozen = tuple(frozen)
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

    def step(state: TrainState, batch: ModelBatch):
        loss, tokens, grads = loss_and_grads(model, state.params, batch, frozen=frozen, grad_accum=grad_accum,
                                             chunk_tokens=chunk_tokens, rows_divisor=divisor)
        is_frozen = jax.tree.leaves(frozen_mask(state.params, frozen))
        trainable = [g for g, f in zip(jax.tree.leaves(grads), is_frozen) if not f]
        finite = jnp.isfinite(loss)
        for g in trainable:
            finite = finite & jnp.all(jnp.isfinite(g))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # frozen: the old arrays themselves (p + 0 would turn -0.0 into +0.0, and costs a pass over them)
        params = jax.tree.unflatten(jax.tree.structure(params), [
            old if f else new for old, new, f in zip(jax.tree.leaves(state.params), jax.tree.leaves(params),
                                                     is_frozen)])
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        if skip_nonfinite:
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(trainable), "tokens": tokens, "finite": finite}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new, metrics

    jitted = jax.jit(step, in_shardings=(shardings, rows), out_shardings=(shardings, replicated), donate_argnums=0)

    def run(state: TrainState, batch: ModelBatch):
        with jax.set_mesh(mesh):  # activation constraints (parallel.axes.constrain) see the mesh while tracing
            return jitted(state, batch)

    run.jitted = jitted
    return run
