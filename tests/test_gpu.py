"""GPU checks (marker `gpu`): the compiled kernel against the oracle and cuDNN.

Run on a GPU machine with `pytest -m gpu tests/`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import testing
from blasst_jax.kernels import pallas_triton
from tests import test_base

pytestmark = pytest.mark.gpu

GPU_SHAPES = (
    testing.AttentionShape(batch=2, q_len=2048, kv_len=2048, q_heads=8, kv_heads=8, head_dim=128),
    testing.AttentionShape(batch=1, q_len=1000, kv_len=3000, q_heads=8, kv_heads=2, head_dim=128),
    testing.AttentionShape(batch=2, q_len=777, kv_len=777, q_heads=4, kv_heads=1, head_dim=64),
)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("threshold", [0.0, 1e-2])
def test_kernel_matches_oracle_on_gpu(shape, causal, dtype, threshold):
  q, k, v = shape.inputs(test_base.key_for("gpu", shape, causal, dtype),
                         dtype=dtype)
  kv_lengths = jnp.array([shape.kv_len - 13 * i for i in range(shape.batch)],
                         jnp.int32)
  bq, bkv = config_lib.effective_block_sizes(shape.q_len, shape.kv_len, 128, 64)
  lam = jnp.full((shape.batch,), threshold, jnp.float32)
  out, lse, skipped, visited = pallas_triton.attention_forward(
      q, k, v, kv_lengths, config_lib.log_threshold(lam), causal=causal,
      sm_scale=shape.head_dim ** -0.5, block_q=bq, block_kv=bkv)
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=bq, block_kv=bkv, threshold=threshold, causal=causal,
      kv_lengths=kv_lengths)
  np.testing.assert_array_equal(np.asarray(visited),
                                np.asarray(jnp.sum(oracle.visited_mask, -1)))
  test_base.assert_skips_match(skipped, oracle, threshold, dtype)
  test_base.assert_close(out, oracle.out, dtype)
  test_base.assert_lse_close(lse, oracle.lse, atol=5e-2, rtol=1e-2)
  if threshold == 0.0:
    assert int(jnp.sum(skipped)) == 0


@pytest.mark.parametrize("causal", [False, True])
def test_dense_kernel_matches_cudnn(causal):
  shape = testing.AttentionShape(batch=2, q_len=4096, kv_len=4096, q_heads=8,
                                 kv_heads=8, head_dim=128)
  q, k, v = shape.inputs(test_base.key_for("cudnn", causal),
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


def test_gradients_on_gpu():
  shape = testing.AttentionShape(batch=1, q_len=512, kv_len=512, q_heads=4,
                                 kv_heads=2, head_dim=64)
  q, k, v = shape.inputs(test_base.key_for("gpu_grad"), dtype=jnp.float32)

  def loss(impl, q, k, v):
    return jnp.sum(bj.attention(q, k, v, threshold=1e-2, causal=True,
                                implementation=impl) ** 2)

  g = jax.grad(lambda *a: loss("pallas_triton", *a), argnums=(0, 1, 2))(q, k, v)
  e = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, e):
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert rel < 1e-2, rel


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=lambda s: s.name)
def test_block_masked_kernel_matches_oracle_on_gpu(shape, causal):
  q, k, v = shape.inputs(test_base.key_for("gpu_mask", shape, causal),
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
  test_base.assert_close(out, oracle.out, jnp.bfloat16)
  np.testing.assert_array_equal(stats.visited_blocks,
                                oracle.stats.visited_blocks)
  assert int(jnp.sum(stats.masked_blocks)) > 0
  mismatch = int(jnp.sum(jnp.abs(stats.skipped_blocks
                                 - oracle.stats.skipped_blocks)))
  assert mismatch <= 0.01 * int(jnp.sum(oracle.stats.visited_blocks))


def test_initial_max_chains_key_parts_on_gpu():
  """The Triton kernel's initial_max / final row max, compiled, bf16."""
  from tests import test_pallas_triton  # pylint: disable=g-import-not-at-top
  test_pallas_triton.check_initial_max_chaining("pallas_triton", seq_len=1024, cut=384,
                                      dtype=jnp.bfloat16, interpret=False,
                                      tol=2e-2)
