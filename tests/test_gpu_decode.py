"""Decode kernel compiled on a GPU (marker `gpu`): against the decode oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import patterns
from tests import test_base

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("max_mode", bj.decode.MAX_MODES)
@pytest.mark.parametrize("num_splits", [None, 1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_decode_kernel_matches_oracle(dtype, num_splits, max_mode):
  q, k, v = patterns.sink_local_qkv(
      test_base.key_for("gpu_decode", dtype), batch=4, seq_len=8192,
      q_heads=32, kv_heads=8, head_dim=128, sharpness=(14.0, 20.0),
      dtype=dtype)
  q = q[:, -1]
  lengths = jnp.array([8192, 5000, 1, 4097], jnp.int32)
  out, stats = bj.decode_attention(q, k, v, lengths, threshold=1e-3,
                                   num_splits=num_splits,
                                   max_mode=max_mode, return_stats=True)
  splits = num_splits or bj.decode.default_num_splits(4, 8, 8192, 128)
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, lengths, block_kv=128, threshold=1e-3, num_splits=splits,
      max_mode=max_mode)
  test_base.assert_close(out, oracle.out, dtype)
  np.testing.assert_array_equal(stats.visited_blocks,
                                oracle.stats.visited_blocks)
  mismatch = int(jnp.sum(jnp.abs(stats.skipped_blocks
                                 - oracle.stats.skipped_blocks)))
  assert mismatch <= 0.01 * int(jnp.sum(oracle.stats.visited_blocks))
  # Many splits with their own running max skip little (that is the point
  # of the other modes); one split or a shared max skips most far blocks.
  floor = 0.3 if (max_mode != "split" or num_splits == 1) else 0.0
  assert float(stats.total_sparsity) > floor
