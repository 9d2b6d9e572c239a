"""An H200 as XLA's GPU compiler sees it, for compiling without a GPU.

With jax's CUDA plugin installed (`pip install "jax[cuda13]==0.11.2"`) and
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu, `jax.jit(f).trace(
*args).lower().compile()` on `h200_arrays()`' arrays runs XLA's GPU
compiler (and Mosaic GPU's ptxas) for the H200 ahead of time: the
optimized HLO (`decode_xla_ops`) and the kernels' registers
(`decode_ptxas`) can be read on a machine without one.
"""

from __future__ import annotations

import jax
from jax.experimental import topologies

from blasst_jax.ops import base as ops_base

# An H200 as XLA's GPU compiler sees it (`GpuTargetConfigProto`).
TARGET = """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H200"
"""


def h200_arrays():
  """`sds(shape, dtype)`: abstract arrays on an H200 (`TARGET`) that
  `jax.jit(...).trace(...).lower().compile()` compiles for without a GPU.
  Makes the ops pick the Hopper kernels, as they would there."""
  topology = topologies.get_topology_desc(
      "h200", platform="cuda", target_config=TARGET, topology="1x1x1")
  sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])
  ops_base.on_gpu = lambda backend=None: True
  ops_base.is_hopper = lambda device=None: True
  return lambda shape, dtype: jax.ShapeDtypeStruct(  # pylint: disable=g-long-lambda
      shape, dtype, sharding=sharding)
