"""Sharding is part of correctness: one train step on 8 forced CPU devices (several meshes) and on 2 processes
equals the step on one device. The multi-device runs happen in subprocesses (the device count is fixed when a
process starts); tests/sharding_check.py and tests/multiprocess_check.py hold their code."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from uhd_jax.parallel.axes import LOGICAL_AXIS_RULES, fit_spec, mesh_axes_of
from uhd_jax.parallel.mesh import make_mesh, param_shardings, resolve_mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = jax.sharding.PartitionSpec


def _python(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT
    # the session's compilation cache (tests/conftest.py): the 8-device runs here and test_train_step's share
    # programs (the tiny qwen3 init and the one-device step on the same batch)
    if jax.config.jax_compilation_cache_dir:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _check(text_model, meshes):
    r = _python("-m", "tests.sharding_check", text_model, ",".join(meshes))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_step_on_8_devices_equals_one_device():
    """Vision + dense Qwen3 LLM, rows with 0, 1 and 2 images: loss, gradient norm and SGD-updated parameters on
    (data=8), (fsdp=8), (tensor=2, fsdp=4), (data=2, fsdp=2, tensor=2) equal one device's to float32 rounding."""
    res = _check("qwen3", ["data8", "fsdp8", "tensor2_fsdp4", "data2_fsdp2_tensor2"])
    for name in ("data8", "fsdp8", "tensor2_fsdp4", "data2_fsdp2_tensor2"):
        r = res[name]
        assert abs(r["loss"] - res["loss_1dev"]) <= 1e-6 * res["loss_1dev"], (name, r)
        assert abs(r["grad_norm"] - res["grad_norm_1dev"]) <= 1e-5 * res["grad_norm_1dev"], (name, r)
        # measured ~1e-6 of the update: summation order only
        assert r["param_diff"] <= 2e-5 * res["update_scale"], (name, r, res["update_scale"])
    fsdp = res["fsdp8"]
    assert fsdp["init_diff"] == 0.0  # a fresh sharded init is the one-device init, bit for bit
    # each device holds about 1/8 of the parameters and of the optimizer state (norms, biases replicated)
    total = fsdp["param_bytes_total"]
    assert max(fsdp["param_bytes_per_device"]) <= 1.15 * total / 8, fsdp
    assert max(fsdp["opt_bytes_per_device"]) <= 1.15 * 2 * total / 8 + 64, fsdp


def test_hybrid_step_on_8_devices_matches_one_device():
    """Vision + Qwen3.5 hybrid (Gated DeltaNet) LLM. The loss matches to rounding; the gradients differ by up to
    ~3e-4 of their scale because the float32 chunked DeltaNet gradient is itself ~2e-4 off its float64 value
    (measured; reordering any sum moves it that much), so the bound here is that, not a sharding error."""
    res = _check("qwen3_5_text", ["fsdp8", "data2_fsdp2_tensor2"])
    for name in ("fsdp8", "data2_fsdp2_tensor2"):
        r = res[name]
        assert abs(r["loss"] - res["loss_1dev"]) <= 1e-6 * res["loss_1dev"], (name, r)
        assert abs(r["grad_norm"] - res["grad_norm_1dev"]) <= 2e-4 * res["grad_norm_1dev"], (name, r)
        assert r["param_diff"] <= 1e-3 * res["update_scale"], (name, r, res["update_scale"])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    """Two processes (jax.distributed on localhost, CPU collectives), each feeding only its own 4 rows to a
    (data=2, fsdp=4) mesh over both, give the one-process step's loss and parameters."""
    import optax

    from tests.sharding_check import run, setup

    out = str(tmp_path / "mp.npz")
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_check", port, str(i), out], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    cfg, model, batch, params0 = setup("qwen3")
    _, loss, gn, params = run(make_mesh({"data": 1}), model, optax.sgd(1.0), batch, params0)
    got = np.load(out)
    assert abs(float(got["loss"]) - loss) <= 1e-6 * loss
    assert abs(float(got["grad_norm"]) - gn) <= 1e-5 * gn
    scale = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)))
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_allclose(got[jax.tree_util.keystr(path)], a, rtol=0, atol=2e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_mesh_shape_resolution():
    assert resolve_mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert resolve_mesh_shape({"data": 8}, 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="need 4 devices, there are 8"):
        resolve_mesh_shape({"data": 2, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        resolve_mesh_shape({"tensor": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        resolve_mesh_shape({"model": 2}, 8)


def test_fit_spec_keeps_only_dividing_axes():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    assert fit_spec((8, 64), (("data", "fsdp"), None), sizes) == P(("data", "fsdp"), None)
    assert fit_spec((2, 64), (("data", "fsdp"), None), sizes) == P("data", None)  # 2 rows: fsdp cannot split
    assert fit_spec((1, 64), (("data", "fsdp"), None), sizes) == P(None, None)  # a decode batch of 1
    assert fit_spec((64, 6), ("fsdp", "tensor"), sizes) == P("fsdp", "tensor")
    assert fit_spec((64, 3), ("fsdp", "tensor"), sizes) == P("fsdp", None)
    assert fit_spec((64, 64), ("tensor", "tensor"), sizes) == P("tensor", None)  # a mesh axis used once
    assert mesh_axes_of(("embed", "vocab")) == ("fsdp", "tensor")
    with pytest.raises(KeyError, match="no rule"):
        mesh_axes_of(("nonsense",))
    assert {name for name, _ in LOGICAL_AXIS_RULES} >= {"activation_batch", "activation_views", "embed"}


def test_param_shardings_report_unshardable_dims():
    import flax.linen as nn

    mesh = make_mesh({"data": 1})
    tree = {"w": nn.Partitioned(jax.ShapeDtypeStruct((6, 4), np.float32), ("embed", "mlp")),
            "scalar": jax.ShapeDtypeStruct((), np.int32)}
    sh = param_shardings(tree, mesh)
    assert sh["w"].spec == P("fsdp", "tensor") and sh["scalar"].spec == P()
    # on the abstract sizes of a bigger mesh the same rule cannot split 6 rows four ways
    assert fit_spec((6, 4), mesh_axes_of(("embed", "mlp")), {"fsdp": 4, "tensor": 2}) == P(None, "tensor")
