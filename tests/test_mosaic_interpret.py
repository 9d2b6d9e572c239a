"""The Mosaic kernel in Pallas' GPU interpret mode, on CPU, with race detection:
the shared suite, its other pipeline builds, and block masks cut into its
tiles.

The interpreter simulates the three warpgroups as threads, TMA copies,
barriers and shared memory, and reports a data race when two of them touch
the same shared-memory bytes without a barrier between them. It runs the
kernel's skip path with P·V reading P from shared memory (the interpreter
has no register-operand wgmma), everything else as compiled for the GPU.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
import jax.experimental.pallas.mosaic_gpu as plgpu
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import patterns
from blasst_jax import testing
from blasst_jax.kernels import pallas_mosaic
from tests import test_base

BLOCK_Q, BLOCK_KV = 64, 64


class TestMosaicInterpret(test_base.RaceChecked, test_base.AttentionTestBase):
  """The shared suite, race-checked: every call fails on a shared-memory
  data race."""

  implementation = "pallas_mosaic"
  shapes = testing.MOSAIC_CPU_TEST_SHAPES
  # The dense and skipping checks on the second alone (odd lengths, GQA,
  # causal and not): the first adds no path of its own to them.
  sweep_shapes = testing.MOSAIC_CPU_TEST_SHAPES[1:]
  dtype = jnp.bfloat16
  tiles = (BLOCK_Q, BLOCK_KV)
  low_precision_dtypes = (jnp.float16,)
  # Three KV blocks, GQA, one q tile whose local windows lie in the first
  # part: the second part is all skippable with the start; alone, its first
  # block is not.
  chain_shape = testing.AttentionShape(batch=1, q_len=64, kv_len=192,
                                       q_heads=2, kv_heads=1, head_dim=64)


class TwoComputeWarpgroups(TestMosaicInterpret):
  """The suite's checks on two compute warpgroups (the skip build's default
  at head_dim 128 and 256; the CPU shapes' head_dim 64 takes three), with V
  copied only for kept blocks (the suite above streams every V block, the
  default)."""

  __test__ = False
  kernel_config = pallas_mosaic.MosaicConfig(compute_wgs=2,
                                             copy_v_if_kept=True)


@pytest.mark.parametrize("causal", [False, True])
def test_two_compute_warpgroups_start_from_initial_max(causal):
  """The overlapped loop of two warpgroups with a chained start (its row max
  and votes, each through its own reduction scratch)."""
  TwoComputeWarpgroups().test_initial_max_matches_oracle(causal)


@pytest.mark.parametrize("causal", [False, True])
def test_two_compute_warpgroups_skip_like_the_oracle(causal):
  suite = TwoComputeWarpgroups()
  suite.test_skipping_matches_oracle(suite.sweep_shapes[0], causal)


def run_interpreted(q, k, v, kv_lengths, threshold, *, causal, num_stages,
                    block_mask=None, initial_max=None, copy_v_if_kept=True,
                    **config):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  lam = jnp.full((q.shape[0],), threshold, jnp.float32)
  interpret_pallas_call.reset_gpu_interpret_mode_state()
  result = pallas_mosaic.attention_forward(
      q, k, v, kv_lengths, config_lib.log_threshold(lam), block_mask,
      initial_max, causal=causal, sm_scale=q.shape[-1] ** -0.5,
      block_q=BLOCK_Q, block_kv=BLOCK_KV,
      config=pallas_mosaic.MosaicConfig(num_stages=num_stages,
                                        copy_v_if_kept=copy_v_if_kept,
                                        **config),
      skip_enabled=threshold > 0, return_skip_mask=True,
      interpret=plgpu.InterpretGPUParams(detect_races=True))
  result = jax.block_until_ready(result)
  return result, interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize(
    "causal,q_len,kv_len,q_heads,kv_heads,num_stages,threshold,copy_v,config",
    # The suite runs the default build (every V block streamed); these are
    # its other pipelines, most with V copied for kept blocks only.
    [(True, 320, 320, 2, 1, 3, 0.1, True, {}),   # three stages
     (False, 192, 448, 1, 1, 2, 0.3, True, {}),  # most skipped by both
     (False, 128, 320, 1, 1, 2, 0.1, False, {}),  # streamed, one head
     # The two-turn skip pipeline; a K ring as deep as V's.
     (True, 320, 320, 2, 1, 2, 0.1, True, {"overlap_qk": False}),
     (False, 192, 448, 1, 1, 2, 0.3, True, {"extra_k_stages": 0}),
     # Three compute warpgroups skipping (the last program holds two real
     # tiles); the dense build's two-turn ping-pong of two warpgroups
     # (`overlap_dense=False`; the suite runs the default, three at
     # head_dim 64 on the overlapped loop).
     (True, 320, 320, 2, 1, 2, 0.1, True, {"compute_wgs": 3}),
     (False, 200, 264, 2, 1, 2, 0.0, True, {"overlap_dense": False}),
     # The dense build of two on the overlapped loop (head_dim 128's).
     (True, 128, 192, 1, 1, 2, 0.0, True, {"compute_wgs": 2}),
     # Clusters of two programs sharing the K/V stream (`cluster_q`): the
     # interpreter copies each block into both programs itself, but runs
     # the releases through the cluster barriers (the GPU test covers the
     # multicast and a padded cluster).
     (True, 320, 320, 2, 1, 2, 0.1, False, {"cluster_q": 2}),
     # Exponentials partly (skip build) and wholly (dense build, masked
     # scores at -inf) on the FMA pipe.
     (False, 200, 264, 2, 1, 2, 0.1, True, {"exp2_fma_cols": 24}),
     (True, 200, 200, 2, 1, 2, 0.0, True, {"exp2_fma_cols": 64})])
def test_interpret_matches_oracle_without_races(causal, q_len, kv_len,
                                                 q_heads, kv_heads,
                                                 num_stages, threshold,
                                                 copy_v, config):
  dtype = jnp.bfloat16
  q, k, v = patterns.sink_local_qkv(
      testing.key_for("mosaic_interpret", causal, q_len, kv_len),
      batch=2, seq_len=q_len, kv_len=kv_len, q_heads=q_heads,
      kv_heads=kv_heads, head_dim=64, window=16, sharpness=(16.0, 24.0),
      dtype=dtype)
  kv_lengths = jnp.array([kv_len, kv_len - 37], jnp.int32)
  (out, lse, skipped, visited, skip_mask), races = run_interpreted(
      q, k, v, kv_lengths, threshold, causal=causal, num_stages=num_stages,
      copy_v_if_kept=copy_v, **config)
  assert not races, "the race detector found a shared-memory data race"

  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=BLOCK_Q, block_kv=BLOCK_KV, threshold=threshold,
      causal=causal, kv_lengths=kv_lengths)
  np.testing.assert_array_equal(np.asarray(visited),
                                np.asarray(jnp.sum(oracle.visited_mask, -1)))
  testing.assert_skips_match(skipped, oracle, threshold, dtype)
  # The recorded skip mask (what the backward walks around).
  testing.assert_skip_mask_matches(skip_mask, skipped, oracle, threshold,
                                     dtype)
  if threshold > 0:
    assert int(jnp.sum(skipped)) > 0, "inputs meant to skip did not"
  testing.assert_close(out, oracle.out, dtype)
  testing.assert_lse_close(lse, oracle.lse, atol=5e-2, rtol=1e-2)


# The suite's block mask check runs causal and not, GQA, q_len < kv_len and
# padded rows on four q tiles and two stages; this is an odd tile count (the
# last program has one) and three stages.
@pytest.mark.parametrize(
    "causal,q_len,kv_len,q_heads,kv_heads,num_stages,compute_wgs",
    [(True, 320, 320, 2, 1, 3, 2),      # causal, GQA, three stages
     (False, 320, 264, 2, 1, 2, 3)],    # three tiles a program
    ids=["causal_gqa_3_stages", "three_compute_warpgroups"])
def test_block_masked_interpret_matches_oracle(causal, q_len, kv_len, q_heads,
                                               kv_heads, num_stages,
                                               compute_wgs):
  dtype, threshold = jnp.bfloat16, 0.1
  key = testing.key_for("mosaic_masked", causal, q_len, kv_len)
  q, k, v = patterns.sink_local_qkv(
      key, batch=2, seq_len=q_len, kv_len=kv_len, q_heads=q_heads,
      kv_heads=kv_heads, head_dim=64, window=16, sharpness=(16.0, 24.0),
      dtype=dtype)
  kv_lengths = jnp.array([kv_len, kv_len - 37], jnp.int32)
  nq, nk = -(-q_len // BLOCK_Q), -(-kv_len // BLOCK_KV)
  mask = testing.program_mask(jax.random.fold_in(key, 1), (2, q_heads, nq, nk),
                              causal)
  (out, lse, skipped, visited, skip_mask), races = run_interpreted(
      q, k, v, kv_lengths, threshold, causal=causal, num_stages=num_stages,
      block_mask=mask, compute_wgs=compute_wgs)
  assert not races, "the race detector found a shared-memory data race"

  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=BLOCK_Q, block_kv=BLOCK_KV, threshold=threshold,
      causal=causal, kv_lengths=kv_lengths, block_mask=mask)
  walked = np.asarray(oracle.visited_mask)
  assert (walked[:, :, 0] != walked[:, :, 1]).any()    # lists that differ
  np.testing.assert_array_equal(visited, walked.sum(-1))
  testing.assert_skips_match(skipped, oracle, threshold, dtype)
  testing.assert_skip_mask_matches(skip_mask, skipped, oracle, threshold,
                                     dtype)
  assert not np.any(np.asarray(skip_mask) & ~walked)
  allowed = bj.reference.visited_blocks_mask(q_len, kv_len, BLOCK_Q, BLOCK_KV,
                                             kv_lengths, causal)
  assert int(jnp.sum(allowed)) * q_heads > int(jnp.sum(visited)), "no mask"
  assert int(jnp.sum(skipped)) > 0, "inputs meant to skip did not"
  testing.assert_close(out, oracle.out, dtype)
  testing.assert_lse_close(lse, oracle.lse, atol=5e-2, rtol=1e-2)
  np.testing.assert_array_equal(np.asarray(out[0, 128:192, 0]), 0.0)


def test_coarse_mask_blocks_are_cut_into_kernel_tiles():
  """128 x 128 mask blocks (XAttention's) run as 64 x 128 Hopper tiles: the
  same as the oracle with the mask repeated per tile."""
  q, k, v = patterns.sink_local_qkv(
      testing.key_for("mosaic_coarse_mask"), batch=1, seq_len=300,
      q_heads=2, kv_heads=1, head_dim=64, window=16, sharpness=24.0,
      dtype=jnp.bfloat16)
  mask = jnp.array([[[1, 0, 0], [1, 1, 0], [0, 1, 1]],
                    [[1, 0, 0], [0, 1, 0], [1, 0, 1]]], bool)[None]
  common = dict(threshold=0.1, causal=True, return_stats=True)
  out, stats = bj.attention(q, k, v, implementation="pallas_mosaic",
                            interpret=True, block_mask=mask, **common)
  tiled = jnp.repeat(mask, 2, axis=2)[:, :, :5]          # 300 rows: 5 tiles
  ref, ref_stats = bj.attention(q, k, v, implementation="reference",
                                block_mask=tiled, block_q=64, block_kv=128,
                                **common)
  testing.assert_close(out, ref, jnp.bfloat16)
  for name in ("visited_blocks", "skipped_blocks", "masked_blocks"):
    np.testing.assert_array_equal(getattr(stats, name),
                                  getattr(ref_stats, name))


def check_exp2_on_fma(x):
  """exp2_on_fma(x) against 2**x in f64: relative error < 1e-4 from -126
  up, exactly 0 from -126 down (and at -inf)."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float32)
  got = np.asarray(jax.jit(pallas_mosaic.exp2_on_fma)(jnp.asarray(x)),
                   np.float64)
  want = np.exp2(x.astype(np.float64))
  normal = x > -126.0
  np.testing.assert_array_less(np.abs(got[normal] / want[normal] - 1), 1e-4)
  np.testing.assert_array_equal(got[~normal], 0.0)


def test_exp2_on_fma_matches_exp2():
  """Integers and half-integers (the rounding's ties), the edge of the
  normal range, -inf and a dense sweep of [-130, 0]."""
  check_exp2_on_fma(np.concatenate([
      -np.arange(0, 131, 0.5), [-126.0, -126.0001, -125.9999, -0.0,
                                -1e-30, -np.inf, -1e30],
      np.linspace(-130, 0, 200_001)]))
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  assert float(pallas_mosaic.exp2_on_fma(jnp.float32(jnp.nan))) == 0.0


@hypothesis.settings(deadline=None)
@hypothesis.given(st.lists(st.floats(-300.0, 0.0, width=32), min_size=1,
                           max_size=64))
def test_exp2_on_fma_property(xs):
  check_exp2_on_fma(xs)


@pytest.mark.parametrize("fma_cols", [0, 8, 40, 128])
def test_exp2_split_runs_each_column_on_its_unit(fma_cols):
  """A [64, 128] score tile: the first columns exp2's, the last
  `fma_cols` the emulation's."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  x = -jnp.abs(jax.random.normal(testing.key_for("exp2_split", fma_cols),
                                 (64, 128), jnp.float32)) * 20
  x = x.at[3, :].set(-jnp.inf)                        # a masked row
  got = jax.jit(pallas_mosaic.exp2_split, static_argnums=(1, 2))(
      x, fma_cols, True)
  split = 128 - fma_cols
  # (Equal up to the compiled program's fused multiply-adds.)
  np.testing.assert_allclose(got[:, :split], jnp.exp2(x[:, :split]),
                             rtol=1e-6)
  np.testing.assert_allclose(
      got[:, split:], pallas_mosaic.exp2_on_fma(x[:, split:]), rtol=1e-6)
  np.testing.assert_allclose(got, jnp.exp2(x), rtol=1e-4, atol=0)
