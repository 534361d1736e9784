"""Run in a subprocess with 8 forced CPU devices (tests/test_sharding.py): one train step of the tiny model on
several meshes, compared with the same step on one device. Prints one JSON line of measured differences."""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from uhd_jax.config import tiny_config  # noqa: E402
from uhd_jax.data.synthetic import random_batch  # noqa: E402
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement  # noqa: E402
from uhd_jax.parallel.mesh import bytes_per_device, global_batch, make_mesh  # noqa: E402
from uhd_jax.train.optimizer import make_optimizer  # noqa: E402
from uhd_jax.train.step import init_train_state, make_train_step  # noqa: E402

MESHES = {"data8": {"data": 8}, "fsdp8": {"fsdp": 8}, "tensor2_fsdp4": {"tensor": 2, "fsdp": -1},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
# rows with 0, 1 and 2 images of different grids (views_per_row=2)
VIEWS = [[(8, 8), (4, 8)], [], [(8, 4)], [], [(8, 8)], [(4, 4), (4, 4)], [], [(4, 8)]]


def setup(text_model="qwen3_5_text"):
    """(cfg, model, batch, params0). params0: the fresh parameters with moderate DeltaNet decays (A = 0.5): with
    the reference's initial A up to 16 the float32 chunked form's gradient is itself ~1e-2 off its float64 value,
    and any change of summation order (any other split of the batch) moves it by ~1e-3."""
    cfg = tiny_config(text_model=text_model)
    batch = random_batch(cfg, batch_size=8, seq_len=64, views=VIEWS, views_per_row=2, tokens_per_view=64, seed=1)
    check_visual_placement(batch, cfg.image_token_id)
    model = MiniCPMV(cfg, attention_impl="xla")
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    calm = lambda path, a: jnp.full_like(a, np.log(0.5)) if jax.tree_util.keystr(path).endswith("['A_log']") else a
    return cfg, model, batch, jax.tree.map(np.asarray, jax.tree_util.tree_map_with_path(calm, params))


def run(mesh, model, opt, batch, params=None, local_rows=None):
    """(state, loss, grad_norm, updated params as numpy (single process)) for one step on `mesh`."""
    state, shardings = init_train_state(model, opt, batch, mesh, jax.random.key(0), params=params)
    step = make_train_step(model, opt, shardings, mesh)
    feed = batch if local_rows is None else jax.tree.map(lambda a: a[local_rows], batch)
    state, metrics = step(state, global_batch(feed, mesh))
    params = jax.tree.map(np.asarray, state.params) if jax.process_count() == 1 else None  # else not addressable
    return state, float(metrics["loss"]), float(metrics["grad_norm"]), params


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def fresh_params(mesh, model, batch):
    state, _ = init_train_state(model, make_optimizer(1e-3), batch, mesh, jax.random.key(0))
    return jax.tree.map(np.asarray, state.params)


def main():
    text_model = sys.argv[1] if len(sys.argv) > 1 else "qwen3_5_text"
    cfg, model, batch, params0 = setup(text_model)
    meshes = sys.argv[2].split(",") if len(sys.argv) > 2 else list(MESHES)
    devices = jax.devices()
    assert len(devices) == 8, devices
    # SGD makes the update linear in the gradient, so the parameter check measures the gradients themselves
    # (Adam's first step is lr * sign(g): entries with |g| at rounding level could flip either way).
    sgd = optax.sgd(1.0)
    one = make_mesh({"data": 1}, devices[:1])
    _, loss1, gn1, params1 = run(one, model, sgd, batch, params0)
    init1 = fresh_params(one, model, batch) if "fsdp8" in meshes else None
    result = {"loss_1dev": loss1, "grad_norm_1dev": gn1, "update_scale": max_diff(params1, params0)}
    for name in meshes:
        sizes = MESHES[name]
        mesh = make_mesh(sizes)
        state, loss, gn, params = run(mesh, model, sgd, batch, params0)
        result[name] = {"loss": loss, "grad_norm": gn, "param_diff": max_diff(params, params1)}
        if name == "fsdp8":
            result[name]["init_diff"] = max_diff(fresh_params(mesh, model, batch), init1)
            adam = make_optimizer(1e-3)
            state, _, _, _ = run(mesh, model, adam, batch, params0)
            result[name]["param_bytes_total"] = sum(x.nbytes for x in jax.tree.leaves(params1))
            result[name]["param_bytes_per_device"] = sorted(bytes_per_device(state.params).values())
            result[name]["opt_bytes_per_device"] = sorted(bytes_per_device(state.opt_state).values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
