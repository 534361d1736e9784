"""One training step under a mesh: next-token loss, gradients, optax update; parameters created already sharded.

    mesh = make_mesh({"data": 2, "fsdp": -1})
    state, shardings = init_train_state(model, optimizer, example_batch, mesh, jax.random.key(0))
    step = make_train_step(model, optimizer, shardings, mesh)
    state, metrics = step(state, global_batch(batch, mesh))

Master weights and optimizer state are float32 (`model.param_dtype`); the forward/backward computes in
`model.dtype` (bf16 on accelerators). The state is donated: the step updates it in place. The loss is the mean
over the whole global batch's target tokens, so it does not depend on how the batch is split.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uhd_jax.data.batch import ModelBatch
from uhd_jax.model.minicpmv import MiniCPMV
from uhd_jax.model.text_model import lm_head_table
from uhd_jax.parallel.axes import mesh_axes_of
from uhd_jax.parallel.mesh import BATCH_AXES, param_shardings
from uhd_jax.train.loss import chunked_cross_entropy, next_token_targets


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any  # float32 master weights (plain arrays)
    opt_state: Any


def loss_fn(model: MiniCPMV, params, batch: ModelBatch, *, chunk_tokens: int = 1024):
    """Mean next-token cross-entropy over the batch's loss-mask tokens (never forms the full logits).
    Returns (loss, aux) with aux["tokens"] the number of target tokens."""
    _, out = model.apply({"params": params}, batch, compute_logits=False)
    targets, weights = next_token_targets(batch.input_ids, batch.loss_mask)
    table = lm_head_table(params["text"], model.config.text)
    loss = chunked_cross_entropy(out["norm"], table, targets, weights, valid_vocab=model.config.text.vocab_size,
                                 chunk_tokens=chunk_tokens, compute_dtype=model.dtype)
    return loss, {"tokens": jnp.sum(weights.astype(jnp.int32))}


def _boxed_state(model: MiniCPMV, optimizer, example_batch: ModelBatch, rng):
    params = model.init(rng, example_batch)["params"]  # nn.Partitioned leaves carry logical names
    # optax maps over the boxes, so its moments carry the same names as their parameters
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def state_shardings(model: MiniCPMV, optimizer, example_batch: ModelBatch, mesh: Mesh, report: list | None = None):
    """NamedShardings of the TrainState (parameters and moments by their logical names, scalars replicated),
    from shapes alone: nothing is allocated."""
    boxed = jax.eval_shape(lambda r: _boxed_state(model, optimizer, example_batch, r), jax.random.key(0))
    return param_shardings(boxed, mesh, report)


def init_train_state(model: MiniCPMV, optimizer, example_batch: ModelBatch, mesh: Mesh, rng,
                     params=None) -> tuple[TrainState, TrainState]:
    """A fresh TrainState created directly in its shards (never whole on one device), and its shardings.
    `params` (e.g. a converted checkpoint, host arrays) replaces the random initialisation; it is placed
    shard by shard and the optimizer state is created around it."""
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
                    *, chunk_tokens: int = 1024) -> Callable[[TrainState, ModelBatch], tuple[TrainState, dict]]:
    """The jitted step `(state, batch) -> (state, metrics)`: state in and out with `shardings` (donated), batch
    rows over the batch mesh axes, metrics (loss, grad_norm, tokens) replicated."""
    rows = NamedSharding(mesh, PartitionSpec(mesh_axes_of(BATCH_AXES)[0]))  # every batch array: rows split
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: ModelBatch):
        grad_fn = jax.value_and_grad(lambda p: loss_fn(model, p, batch, chunk_tokens=chunk_tokens), has_aux=True)
        (loss, aux), grads = grad_fn(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": aux["tokens"]}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(step, in_shardings=(shardings, rows), out_shardings=(shardings, replicated), donate_argnums=0)

    def run(state: TrainState, batch: ModelBatch):
        with jax.set_mesh(mesh):  # activation constraints (parallel.axes.constrain) see the mesh while tracing
            return jitted(state, batch)

    run.jitted = jitted
    return run
