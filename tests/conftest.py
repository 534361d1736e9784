import os

# Tests run on CPU in float32 with exact matmuls; the reference comparisons need it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
