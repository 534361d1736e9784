import os

import pytest

# Tests run on CPU in float32 with exact matmuls; the reference comparisons need it. A platform chosen by the
# caller (JAX_PLATFORMS=cuda for the gpu-marked tests) is kept.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

PLATFORMS = ("cpu", "gpu", "tpu")


def pytest_configure(config):
    # `-m gpu` on a machine whose backend is not a GPU would skip everything and pass: refuse instead
    want = (config.option.markexpr or "").strip()
    if want in PLATFORMS and jax.default_backend() != want:
        raise pytest.UsageError(f"-m {want} selects {want}-only tests but jax's backend is "
                                f"{jax.default_backend()!r} (JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}); "
                                f"set JAX_PLATFORMS={'cuda' if want == 'gpu' else want}")


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        for platform in PLATFORMS:
            if item.get_closest_marker(platform) is not None and backend != platform:
                item.add_marker(pytest.mark.skip(reason=f"needs the {platform} backend (this run: {backend})"))
