"""GPU checks (marker `gpu`): the shared suites on the compiled portable
kernels, and against cuDNN.

Run on a GPU machine with `pytest -m gpu tests/`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import testing
from tests import test_base

pytestmark = pytest.mark.gpu

GPU_SHAPES = testing.GPU_TEST_SHAPES[:3]


class TestPallasTritonGpu(test_base.AttentionTestBase):
  """The shared suite, compiled (bf16)."""

  implementation = "pallas_triton"
  shapes = GPU_SHAPES
  dtype = jnp.bfloat16
  tiles = (128, 64)
  low_precision_dtypes = (jnp.float16,)
  interpret = False


class TestPallasTritonGpuF16(TestPallasTritonGpu):
  dtype = jnp.float16
  low_precision_dtypes = ()


class TestPallasTritonGpuGradients(test_base.WideGradientTestBase):
  """The gradient suite compiled, bf16 on 64 x 64 tiles."""

  implementation = "pallas_triton"
  interpret = False


class TestPallasTritonGpuGradientsF32(test_base.GradientTestBase):
  """The CPU configuration compiled: f32 (IEEE dots under the tests'
  "highest" matmul precision), 16 x 16 tiles, finite differences."""

  implementation = "pallas_triton"
  interpret = False


@pytest.mark.parametrize("causal", [False, True])
def test_dense_kernel_matches_cudnn(causal):
  shape = testing.AttentionShape(batch=2, q_len=4096, kv_len=4096, q_heads=8,
                                 kv_heads=8, head_dim=128)
  q, k, v = shape.inputs(testing.key_for("cudnn", causal),
                         dtype=jnp.bfloat16)
  out = bj.attention(q, k, v, causal=causal, implementation="pallas_triton")
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                          implementation="cudnn")
  diff = jnp.abs(out.astype(jnp.float32) - expected.astype(jnp.float32))
  assert float(jnp.max(diff)) < 3e-2


def test_default_implementation_on_gpu_is_a_kernel():
  expected = "pallas_mosaic" if bj.api.is_hopper() else "pallas_triton"
  assert bj.default_implementation(dtype=jnp.bfloat16) == expected
  assert bj.default_implementation(dtype=jnp.float32) == "pallas_triton"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=lambda s: s.name)
def test_block_masked_kernel_matches_oracle_on_gpu(shape, causal):
  q, k, v = shape.inputs(testing.key_for("gpu_mask", shape, causal),
                         dtype=jnp.bfloat16, pattern="sink_local")
  kv_lengths = jnp.array([shape.kv_len - 101 * i for i in range(shape.batch)],
                         jnp.int32)
  mask = bj.xattention.select_blocks(q, k, block_size=128, stride=16,
                                     threshold=0.95, causal=causal,
                                     kv_lengths=kv_lengths)
  out, stats = bj.attention(q, k, v, threshold=1e-3, causal=causal,
                            kv_lengths=kv_lengths, block_mask=mask,
                            return_stats=True)
  # The Hopper kernel runs the 128 x 128 mask blocks as 64 x 128 tiles
  # (skip decisions per 64-row tile): the oracle takes the same tiles.
  rows = 128
  if bj.api.default_implementation(dtype=q.dtype,
                                   head_dim=shape.head_dim) == "pallas_mosaic":
    rows = 64
  tile_mask = jnp.repeat(mask, 128 // rows, axis=2)[
      :, :, :-(-shape.q_len // rows)]
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=rows, block_kv=128, threshold=1e-3, causal=causal,
      kv_lengths=kv_lengths, block_mask=tile_mask)
  testing.assert_close(out, oracle.out, jnp.bfloat16)
  np.testing.assert_array_equal(stats.visited_blocks,
                                oracle.stats.visited_blocks)
  assert int(jnp.sum(stats.masked_blocks)) > 0
  mismatch = int(jnp.sum(jnp.abs(stats.skipped_blocks
                                 - oracle.stats.skipped_blocks)))
  assert mismatch <= 0.01 * int(jnp.sum(oracle.stats.visited_blocks))
