"""One of two processes (tests/test_sharding.py): `jax.distributed.initialize` on localhost with CPU collectives,
4 CPU devices each, a (data=2, fsdp=4) mesh over all 8; each process feeds only its own 4 rows of the batch and
runs the train step of tests/sharding_check.py. Process 0 writes the loss and the gathered parameters to OUT.
Usage: python -m tests.multiprocess_check PORT PROCESS_ID OUT [TEXT_MODEL]"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from uhd_jax.parallel.mesh import initialize_distributed, make_mesh  # noqa: E402


def main():
    port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    text_model = sys.argv[4] if len(sys.argv) > 4 else "qwen3"
    initialize_distributed(f"localhost:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4

    import optax
    from jax.experimental import multihost_utils

    from tests.sharding_check import run, setup

    cfg, model, batch, params0 = setup(text_model)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    rows = np.arange(4 * pid, 4 * pid + 4)  # this process's rows only
    state, loss, gn, _ = run(mesh, model, optax.sgd(1.0), batch, params0, local_rows=rows)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if pid == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, loss=loss, grad_norm=gn, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
