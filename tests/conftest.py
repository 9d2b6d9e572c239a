"""Test setup: 8 CPU devices, the `gpu` marker, hypothesis profiles, a
compilation cache shared by the run's workers."""

import atexit
import os
import shutil
import tempfile

# Eight host devices for the sharding tests (tests/test_sharding.py); set
# before jax starts. One device stays the default for every other test.
# They also give XLA's CPU client enough threads for GPU interpret mode:
# with fewer, a three-warpgroup kernel (two of them blocked in barrier
# callbacks) can starve the third and hang on a two-core machine. On such
# a machine, loaded, one device's thread may also reach a collective long
# after the others, and XLA's CPU runtime aborts the process once they have
# waited past its timeout (the likely cause of a pytest worker that crashed
# in a sharding test), so those timeouts are raised to half an hour.
_XLA_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": "300",
    "xla_cpu_collective_call_terminate_timeout_seconds": "1800",
    "xla_cpu_collective_timeout_seconds": "1800",
}
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [f"--{name}={value}" for name, value in _XLA_FLAGS.items()
       if name not in os.environ.get("XLA_FLAGS", "")]).strip()

import hypothesis  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import pytest

# Numerics tests compare against f32 oracles: keep XLA's dots exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

# Many tests compile the same programs (a suite's shapes, the oracle, the
# kernels) through fresh jitted callables: a compilation cache shared by
# the pytest-xdist workers of one run compiles each once. Its directory
# comes from the controller (below) or BLASST_TEST_COMPILATION_CACHE; "0"
# turns it off.
_CACHE_ENV = "BLASST_TEST_COMPILATION_CACHE"
if _CACHE_ENV not in os.environ:   # the controller (or a run without xdist)
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="blasst_jax_xla_cache_")
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
if os.environ.get(_CACHE_ENV, "") not in ("", "0"):
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

hypothesis.settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile("dev", max_examples=40, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU")


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
