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


@pytest.mark.parametrize("max_mode", ["split", "anchored"])
@pytest.mark.parametrize("head_dim,kv_heads,page", [(128, 8, 128),
                                                    (64, 3, 64)])
def test_mosaic_decode_matches_oracle(head_dim, kv_heads, page, max_mode):
  """The Hopper decode kernel, paged over a shuffled pool whose unused pages
  hold NaN, against the oracle."""
  import jax  # pylint: disable=g-import-not-at-top
  if "H100" not in jax.devices()[0].device_kind and (
      "H200" not in jax.devices()[0].device_kind):
    pytest.skip("needs a Hopper GPU")
  q, k, v = patterns.sink_local_qkv(
      test_base.key_for("gpu_mosaic_decode", head_dim, max_mode), batch=4,
      seq_len=8192, q_heads=3 * kv_heads, kv_heads=kv_heads,
      head_dim=head_dim, sharpness=(14.0, 20.0), dtype=jnp.bfloat16)
  q = q[:, -1]
  lengths = jnp.array([8192, 5000, 1, 4097], jnp.int32)
  b, per_seq = 4, 8192 // page
  perm = jax.random.permutation(jax.random.PRNGKey(0), b * per_seq + 7)
  table = perm[: b * per_seq].reshape(b, per_seq).astype(jnp.int32)
  pool = jnp.full((b * per_seq + 7, page, kv_heads, head_dim), jnp.nan,
                  jnp.bfloat16)
  pool_k = pool.at[table].set(k.reshape(b, per_seq, page, kv_heads, -1))
  pool_v = pool.at[table].set(v.reshape(b, per_seq, page, kv_heads, -1))
  out, stats = bj.paged_decode_attention(
      q, pool_k, pool_v, table, lengths, threshold=1e-3, num_splits=4,
      max_mode=max_mode, implementation="pallas_mosaic", return_stats=True)
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, lengths, block_kv=page, threshold=1e-3, num_splits=4,
      max_mode=max_mode)
  test_base.assert_close(out, oracle.out, jnp.bfloat16)
  np.testing.assert_array_equal(stats.visited_blocks,
                                oracle.stats.visited_blocks)
  mismatch = int(jnp.sum(jnp.abs(stats.skipped_blocks
                                 - oracle.stats.skipped_blocks)))
  assert mismatch <= 0.01 * int(jnp.sum(oracle.stats.visited_blocks))
  # Inputs meant to skip do ("split" at head_dim 64 skips about 8 %).
  assert float(stats.total_sparsity) > 0.05


@pytest.mark.parametrize("max_mode", ["anchored", "global"])
def test_context_parallel_decode_shares_the_max_on_one_gpu(max_mode):
  """share_max on a 1-device context axis: "anchored" runs the kernel's
  split walk from anchors scored outside it (`initial_max`), "global"
  takes its max through `pmax`; both decide as the plain call."""
  import jax  # pylint: disable=g-import-not-at-top
  from blasst_jax import sharding  # pylint: disable=g-import-not-at-top
  q, k, v = patterns.sink_local_qkv(
      test_base.key_for("gpu_decode_shared", max_mode), batch=2,
      seq_len=8192, q_heads=32, kv_heads=8, head_dim=128,
      sharpness=(14.0, 20.0), dtype=jnp.bfloat16)
  q = q[:, -1]
  lengths = jnp.array([8192, 8192], jnp.int32)
  opts = dict(threshold=1e-3, num_splits=1, max_mode=max_mode,
              return_stats=True)
  want, want_stats = bj.decode_attention(q, k, v, lengths, **opts)
  mesh = jax.make_mesh((1,), ("context",))
  got, stats = jax.jit(lambda *a: sharding.decode_attention(
      *a, mesh=mesh, context_axis="context", share_max=True, **opts))(
          q, k, v, lengths)
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, lengths, block_kv=128, threshold=1e-3, max_mode=max_mode)
  test_base.assert_close(got, oracle.out, jnp.bfloat16)
  test_base.assert_close(got, want, jnp.bfloat16)
  mismatch = int(jnp.sum(jnp.abs(stats.skipped_blocks
                                 - want_stats.skipped_blocks)))
  assert mismatch <= 0.01 * int(jnp.sum(want_stats.visited_blocks))
  assert float(stats.total_sparsity) > 0.3
