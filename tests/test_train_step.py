"""The train step (uhd_jax.train.step): gradient accumulation equals one big batch, loss normalised by the global
batch's target tokens, frozen parameters (not differentiated, bit-identical), metrics, skipping non-finite steps,
and accumulation on a sharded mesh (8 forced CPU devices, in a subprocess). CPU, tiny config, float32 with
"highest" matmul precision. Measured errors are in the comments."""

import json
import os
import subprocess
import sys

if __name__ == "__main__":  # the 8-device subprocess: the device count is fixed when jax starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from uhd_jax.config import tiny_config  # noqa: E402
from uhd_jax.data.synthetic import random_batch  # noqa: E402
from uhd_jax.model.minicpmv import MiniCPMV  # noqa: E402
from uhd_jax.parallel.mesh import global_batch, make_mesh  # noqa: E402
from uhd_jax.train.optimizer import FREEZE_LLM, FREEZE_VISION, make_optimizer, make_schedule  # noqa: E402
from uhd_jax.train.step import (init_train_state, loss_and_grads, loss_fn, make_train_step,  # noqa: E402
                                split_micro_batches)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# rows with 0, 1 and 2 images of different grids
VIEWS = [[(8, 8), (4, 8)], [], [(8, 4)], [], [(8, 8)], [(4, 4), (4, 4)], [], [(4, 8)]]


@pytest.fixture(autouse=True, scope="module")
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def setup(text_model, seed=1):
    cfg = tiny_config(text_model=text_model)
    batch = random_batch(cfg, batch_size=8, seq_len=64, views=VIEWS, views_per_row=2, tokens_per_view=64, seed=seed)
    model = MiniCPMV(cfg, attention_impl="xla")
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    return cfg, model, batch, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def dense():
    return setup("qwen3")


def reference(model, params, batch):
    """The unsplit batch's loss and gradients, straight from loss_fn (the mean over its target tokens)."""
    (loss, aux), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, batch), has_aux=True))(params)
    return float(loss), int(aux["tokens"]), jax.tree.map(np.asarray, grads)


def max_abs(tree):
    return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                  jax.tree.leaves(b)))


def one_device():
    return make_mesh({"data": 1}, jax.devices()[:1])


def test_grad_accum_equals_one_batch(dense):
    """grad_accum = 1, 2, 4 through the whole jitted step (SGD with lr 1, so the update is the gradient itself;
    Adam's first step is ~lr * sign(g), which rounding-level gradients would flip): the loss, the gradient norm
    and the updated parameters equal those of the unsplit batch's loss_fn gradients. Measured: loss exact (k=1, 2)
    / 7.7e-8 relative (k=4); gradient norm exact; parameters exact (k=1) / within 1.4e-6 of the largest gradient
    entry (k=2, 4)."""
    _, model, batch, params0 = dense
    loss0, tokens0, g0 = reference(model, params0, batch)
    want = jax.tree.map(lambda p, g: p - g, params0, g0)
    gnorm0 = float(optax.tree.norm(g0))
    scale = max_abs(g0)
    sgd = optax.sgd(1.0)
    for k in (1, 2, 4):
        state, shardings = init_train_state(model, sgd, batch, one_device(), jax.random.key(0), params=params0)
        step = make_train_step(model, sgd, shardings, one_device(), grad_accum=k)
        state, m = step(state, global_batch(batch, one_device()))
        assert int(m["tokens"]) == tokens0 and bool(m["finite"]) and int(state.step) == 1
        assert abs(float(m["loss"]) - loss0) <= 1e-6 * loss0, (k, float(m["loss"]), loss0)
        assert abs(float(m["grad_norm"]) - gnorm0) <= 1e-5 * gnorm0, (k, float(m["grad_norm"]), gnorm0)
        assert max_diff(state.params, want) <= 5e-6 * scale, (k, max_diff(state.params, want) / scale)


def test_hybrid_grad_accum_matches_loosely():
    """The Qwen3.5 hybrid: the chunked Gated DeltaNet's float32 gradient is itself ~1e-4 noisy (any change of
    summation order moves it; see test_sharding), so the bound is that. Measured: loss within 1.5e-7 relative,
    gradients within 7.4e-5 of the largest entry for k = 2 and 4 on this batch (5.4e-4 on another random batch:
    the noise depends on the data, so the bound has room)."""
    _, model, batch, params = setup("qwen3_5_text")
    loss0, tokens0, g0 = reference(model, params, batch)
    loss, tokens, g = jax.jit(lambda p, b: loss_and_grads(model, p, b, grad_accum=4))(params, batch)
    assert int(tokens) == tokens0
    assert abs(float(loss) - loss0) <= 1e-6 * loss0
    assert max_diff(g, g0) <= 2e-3 * max_abs(g0), max_diff(g, g0) / max_abs(g0)


def test_per_token_normalisation_with_uneven_rows(dense):
    """Rows with very different numbers of target tokens (47, 1, 2, 1, 47, 3, 2, 1): the loss with grad_accum=4
    (micro-batch j = rows j, j+4) is the mean over all 104 target tokens of the global batch, computed here
    independently from the full logits, and its gradients equal grad_accum=1's; the mean of per-micro-batch means
    (what normalising each micro-batch by its own tokens would give) is far from it. Measured: loss 15.7769 within
    1.3e-7 relative of the float64 full-logits mean (the mean of micro-batch means is 16.85); gradients within
    8.3e-7 of the largest entry."""
    cfg, model, _, params = dense
    params = jax.tree.map(np.copy, params)
    params["text"]["norm"]["scale"] *= 30.0  # sharper logits: per-token losses vary, so normalisations differ
    views = [[(8, 8)], [], [], [(4, 4)], [], [(4, 8)], [], []]
    batch = random_batch(cfg, batch_size=8, seq_len=96, views=views, views_per_row=1, tokens_per_view=64,
                         seed=3, text_tokens=24)
    lm = np.array(batch.loss_mask)
    for b, n in enumerate([None, 1, 2, 1, None, 3, 2, 1]):
        if n is None:  # long rows: the first text run becomes target text too
            lm[b, 1:24] = True
        else:  # short rows: only the first n target tokens (a target token is predicted by the position before)
            lm[b, np.flatnonzero(lm[b])[n:]] = False
    batch = batch.replace(loss_mask=lm)

    logits, _ = jax.jit(lambda p: model.apply({"params": p}, batch))(params)
    z = np.asarray(logits, np.float64)[..., :cfg.text.vocab_size]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.sum(np.exp(logp), -1, keepdims=True))  # float64 log-softmax
    ids = np.asarray(batch.input_ids)
    per_row, counts = [], []
    for b in range(8):
        s = np.flatnonzero(lm[b, 1:])  # positions s with a target at s + 1
        per_row.append(-np.sum(logp[b, s, ids[b, s + 1]]))
        counts.append(len(s))
    assert counts == [47, 1, 2, 1, 47, 3, 2, 1], counts
    mean = sum(per_row) / sum(counts)
    micro_means = [(per_row[j] + per_row[j + 4]) / (counts[j] + counts[j + 4]) for j in range(4)]
    assert abs(np.mean(micro_means) - mean) > 0.05 * mean  # the test can tell the two normalisations apart

    fn = lambda k: jax.jit(lambda p, b: loss_and_grads(model, p, b, grad_accum=k))(params, batch)
    loss1, tokens1, g1 = fn(1)
    loss4, tokens4, g4 = fn(4)
    assert int(tokens1) == int(tokens4) == sum(counts)
    assert abs(float(loss4) - mean) <= 1e-6 * mean and abs(float(loss1) - mean) <= 1e-6 * mean
    assert max_diff(g4, g1) <= 5e-6 * max_abs(g1), max_diff(g4, g1) / max_abs(g1)


def test_frozen_parameters_are_not_differentiated(dense):
    """Frozen parameters get exactly zero gradients and the others the unfrozen gradients (another XLA program:
    measured within 1.5e-6 of the largest entry); XLA does less work (compiled flops)."""
    _, model, batch, params = dense

    def compiled(frozen):
        f = jax.jit(lambda p, b: loss_and_grads(model, p, b, frozen=frozen, grad_accum=2))
        c = f.lower(params, batch).compile()
        cost = c.cost_analysis()
        return c(params, batch), (cost[0] if isinstance(cost, list) else cost)["flops"]

    (loss0, _, g0), flops0 = compiled(())
    for frozen, part, other in ((FREEZE_VISION, "vision", "text"), (FREEZE_LLM, "text", "vision")):
        (loss, _, g), flops = compiled(frozen)
        assert float(loss) == float(loss0)
        assert max_abs(g[part]) == 0.0
        err = max_diff(g[other], g0[other]) / max_abs(g0[other])
        assert err <= 1e-5, (frozen, err)
        assert flops < flops0, (frozen, flops, flops0)


def test_step_with_frozen_vision_adamw_and_lr(dense):
    """Two AdamW steps (weight decay on, lr multiplier on the LLM's MLPs) with the ViT and mergers frozen and
    grad_accum=2: the frozen parameters are bit-identical, every trainable one moved, the optimizer state holds
    moments of the LLM only, lr is the schedule's at each step, tokens/grad_norm as loss_and_grads says."""
    _, model, batch, params0 = dense
    kw = dict(warmup_steps=1, total_steps=10)
    opt = make_optimizer(1e-3, weight_decay=0.1, lr_multipliers=(("text/.*/mlp/.*", 2.0),), frozen=FREEZE_VISION,
                         **kw)
    mesh = one_device()
    state, shardings = init_train_state(model, opt, batch, mesh, jax.random.key(0), params=params0)
    text_bytes = sum(x.nbytes for x in jax.tree.leaves(params0["text"]))
    assert sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) == 2 * text_bytes + 8
    schedule = make_schedule(1e-3, **kw)
    step = make_train_step(model, opt, shardings, mesh, frozen=FREEZE_VISION, schedule=schedule, grad_accum=2)
    _, _, g = jax.jit(lambda p, b: loss_and_grads(model, p, b, frozen=FREEZE_VISION))(params0, batch)
    gnorm = float(optax.tree.norm(g["text"]))
    lrs = []
    for i in range(3):
        state, m = step(state, global_batch(batch, mesh))
        lrs.append(float(m["lr"]))
        assert bool(m["finite"]) and int(state.step) == i + 1
        if i == 0:
            assert abs(float(m["grad_norm"]) - gnorm) <= 1e-5 * gnorm
    np.testing.assert_allclose(lrs, [float(schedule(i)) for i in range(3)], rtol=1e-6)  # in-jit float32 cosine
    assert lrs[0] == 0.0 and lrs[1] == np.float32(1e-3)
    bits = lambda a: np.asarray(a).view(np.uint32)
    for p, a, b in zip(jax.tree_util.tree_leaves_with_path(params0["vision"]), jax.tree.leaves(params0["vision"]),
                       jax.tree.leaves(state.params["vision"])):
        assert np.array_equal(bits(a), bits(b)), p[0]
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(params0["text"]), jax.tree.leaves(params0["text"]),
                          jax.tree.leaves(state.params["text"])):
        assert np.any(np.asarray(a) != np.asarray(b)), path[0]


def test_skip_nonfinite(dense):
    """skip_nonfinite=True: a step whose loss/gradients are NaN reports finite=False and returns the state as it
    was (bit for bit, step not advanced); a finite step then proceeds. (Default off: the loop stops instead.)"""
    _, model, batch, params0 = dense
    opt = make_optimizer(1e-3)
    mesh = one_device()
    bad = jax.tree.map(np.copy, params0)
    bad["text"]["norm"]["scale"][3] = np.nan
    state, shardings = init_train_state(model, opt, batch, mesh, jax.random.key(0), params=bad)
    before = jax.tree.map(lambda x: np.array(x, copy=True), state)  # the step donates `state`
    step = make_train_step(model, opt, shardings, mesh, skip_nonfinite=True)
    state, m = step(state, global_batch(batch, mesh))
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    after = jax.tree.map(np.asarray, state)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert np.array_equal(a, b, equal_nan=True)
    state, _ = init_train_state(model, opt, batch, mesh, jax.random.key(0), params=params0)
    state, m = step(state, global_batch(batch, mesh))
    assert bool(m["finite"]) and int(state.step) == 1


def test_micro_batch_split_order_and_errors():
    """Micro-batch j = rows j, j+k, ...; a split that does not give every batch shard whole groups of k rows is
    refused naming the numbers."""
    rows = {"x": np.arange(8)[:, None] * np.ones((1, 3))}
    parts = split_micro_batches(rows, 4)
    assert parts["x"].shape == (4, 2, 3)
    assert [list(parts["x"][j, :, 0]) for j in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert split_micro_batches(rows, 2, rows_divisor=4)["x"].shape == (2, 4, 3)  # 2 rows per shard: 1 group of 2
    with pytest.raises(ValueError, match=r"grad_accum=3: the global batch of 8 rows .* multiple of grad_accum x "
                                         r"data x fsdp = 3"):
        split_micro_batches(rows, 3)
    with pytest.raises(ValueError, match=r"grad_accum=4: the global batch of 8 rows over 4 batch shard\(s\) "
                                         r"\(2 rows each\).* = 16"):
        split_micro_batches(rows, 4, rows_divisor=4)


def test_grad_accum_on_a_sharded_mesh():
    """grad_accum=2 on 8 forced CPU devices, mesh (data=2, fsdp=2, tensor=2), equals grad_accum=1 on one device:
    loss, gradient norm, SGD-updated parameters (measured: loss 7.7e-8 relative, gradient norm exact, parameters
    2.3e-6 of the update: summation order only)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT
    # the session's compilation cache (tests/conftest.py), shared with tests/sharding_check.py's 8-device runs
    if jax.config.jax_compilation_cache_dir:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    r = subprocess.run([sys.executable, "-m", "tests.test_train_step"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(res["loss"] - res["loss_1dev"]) <= 1e-6 * res["loss_1dev"], res
    assert abs(res["grad_norm"] - res["grad_norm_1dev"]) <= 1e-5 * res["grad_norm_1dev"], res
    assert res["param_diff"] <= 2e-5 * res["update_scale"], res


def _sharded_main():
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 8
    _, model, batch, params0 = setup("qwen3")
    sgd = optax.sgd(1.0)
    out = {}
    for name, mesh, k in (("1dev", one_device(), 1), ("sharded", make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), 2)):
        state, shardings = init_train_state(model, sgd, batch, mesh, jax.random.key(0), params=params0)
        state, m = make_train_step(model, sgd, shardings, mesh, grad_accum=k)(state, global_batch(batch, mesh))
        out[name] = (float(m["loss"]), float(m["grad_norm"]), jax.tree.map(np.asarray, state.params))
    (l1, g1, p1), (l2, g2, p2) = out["1dev"], out["sharded"]
    print(json.dumps({"loss_1dev": l1, "grad_norm_1dev": g1, "loss": l2, "grad_norm": g2,
                      "param_diff": max_diff(p2, p1), "update_scale": max_diff(p1, params0)}))


if __name__ == "__main__":
    _sharded_main()
