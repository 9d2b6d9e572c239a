"""Test setup: 8 CPU devices, the `gpu` marker, hypothesis profiles."""

import os

# Eight host devices for the sharding tests (tests/test_sharding.py); set
# before jax starts. One device stays the default for every other test.
# They also give XLA's CPU client enough threads for GPU interpret mode:
# with fewer, a three-warpgroup kernel (two of them blocked in barrier
# callbacks) can starve the third and hang on a two-core machine.
if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import hypothesis  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import pytest

# Numerics tests compare against f32 oracles: keep XLA's dots exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

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
