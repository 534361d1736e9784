import atexit
import os
import shutil
import tempfile

import pytest

# Tests run on CPU in float32 with exact matmuls; the reference comparisons need it. A platform chosen by the
# caller (JAX_PLATFORMS=cuda for the gpu-marked tests) is kept.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A persistent compilation cache for this test session: the same program compiled again (the same model built by
# several tests or files, a jit of a fresh function object, a fixture rebuilt per parametrized case) is loaded
# instead of recompiled. XLA's executable is the same one, so no result changes; only compiles over
# jax_persistent_cache_min_compile_time_secs (1 s) are stored. A fresh directory per session (removed at exit)
# unless the caller chose one with JAX_COMPILATION_CACHE_DIR; os.environ is left alone, so subprocesses the tests
# start behave as before.
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
else:
    _CACHE_DIR = tempfile.mkdtemp(prefix="uhd_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)

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
