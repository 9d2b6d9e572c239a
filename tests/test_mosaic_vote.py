"""The Mosaic kernels' warpgroup votes (`mosaic_vote.warpgroup_max` and the
one-barrier `warpgroup_any`): three warpgroups voting at once, each through
its own scratch. On CPU in
Pallas' race-checked GPU interpret mode and lowered for CUDA; compiled on a
Hopper GPU (marker `gpu`), where a shared scratch would tear."""

import functools

import jax
from jax import lax
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import testing
from blasst_jax.kernels import mosaic_vote

ROWS = 64       # a wgmma row vector: one q tile's rows
SLOT = 32       # f32 words in 128 bytes (a TMA copy's alignment)
ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)


@functools.partial(jax.jit, static_argnames=("interpret", "any_nonnegative"))
def warpgroup_maxima(x, *, interpret=None, any_nonnegative=False):
  """x f32 [warpgroups, votes, ROWS] -> [warpgroups, votes]: warpgroup w
  reduces x[w, i] for every i, all warpgroups at once (any_nonnegative:
  1.0 where some x[w, i] >= 0 by `warpgroup_any`, else 0.0)."""
  n_wgs, votes, _ = x.shape

  def kernel(x_gmem, out_gmem):
    def body(x_smem, out_smem, scratch, bars):
      wg = lax.axis_index("wg")
      plgpu.copy_gmem_to_smem(x_gmem.at[wg], x_smem.at[wg], bars.at[wg])
      plgpu.barrier_wait(bars.at[wg])
      for i in range(votes):
        row = plgpu.load(x_smem.at[wg, i], layout=ROW_LAYOUT,
                         optimized=False)                      # [ROWS]
        if any_nonnegative:
          out_smem[wg, i] = mosaic_vote.warpgroup_any(
              row, 0.0, scratch.at[wg], jnp.int32(i % 2),
              interpret=interpret is not None).astype(jnp.float32)
        else:
          out_smem[wg, i] = mosaic_vote.warpgroup_max(
              row, scratch.at[wg], interpret=interpret is not None)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[wg])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        body, plgpu.SMEM((n_wgs, votes, ROWS), jnp.float32),
        plgpu.SMEM((n_wgs, SLOT), jnp.float32),
        plgpu.SMEM((n_wgs, mosaic_vote.SCRATCH_WORDS), jnp.float32),
        plgpu.Barrier(num_barriers=n_wgs), collective_axes="wg")

  out = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((n_wgs, SLOT), jnp.float32),
      num_threads=n_wgs, thread_name="wg", interpret=interpret)(x)
  return out[:, :votes]


def rows_with_one_winner(key, n_wgs, votes):
  """Each vote's row vector: scores below 0 with its maximum at one random
  row, and -inf rows (masked) mixed in."""
  k_val, k_row, k_mask, k_peak = jax.random.split(key, 4)
  x = -jax.random.exponential(k_val, (n_wgs, votes, ROWS)) - 1.0
  masked = jax.random.bernoulli(k_mask, 0.3, x.shape)
  x = jnp.where(masked, -jnp.inf, x)
  winner = jax.random.randint(k_row, (n_wgs, votes), 0, ROWS)
  peak = jax.random.normal(k_peak, (n_wgs, votes))
  return x.at[jnp.arange(n_wgs)[:, None], jnp.arange(votes), winner].set(
      peak)


@pytest.mark.parametrize("n_wgs", [2, 3])
def test_concurrent_votes_match_numpy_race_checked(n_wgs):
  x = rows_with_one_winner(jax.random.key(n_wgs), n_wgs, 8)
  interpret_pallas_call.reset_gpu_interpret_mode_state()
  got = jax.block_until_ready(warpgroup_maxima(
      x, interpret=plgpu.InterpretGPUParams(detect_races=True)))
  assert not interpret_pallas_call.get_races().races_found
  np.testing.assert_array_equal(np.asarray(got), np.asarray(x).max(axis=-1))


@pytest.mark.parametrize("any_nonnegative", [False, True])
def test_vote_lowers_for_cuda(any_nonnegative):
  lowered = testing.lower_for_h100(
      functools.partial(warpgroup_maxima, any_nonnegative=any_nonnegative),
      jax.ShapeDtypeStruct((3, 8, ROWS), jnp.float32))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.gpu
def test_concurrent_votes_match_numpy_on_hopper():
  """Three warpgroups, 32 votes each, no synchronization between them:
  votes that could tear a scratch shared between warpgroups."""
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  for seed in range(20):
    x = rows_with_one_winner(jax.random.key(seed), 3, SLOT)
    np.testing.assert_array_equal(np.asarray(warpgroup_maxima(x)),
                                  np.asarray(x).max(axis=-1))


@pytest.mark.gpu
def test_concurrent_one_barrier_votes_match_numpy_on_hopper():
  """`warpgroup_any` of three warpgroups at once, 32 votes each, half of
  them with a single positive row (any warp's), the rest with none."""
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  for seed in range(20):
    x = rows_with_one_winner(jax.random.key(seed), 3, SLOT)
    got = np.asarray(warpgroup_maxima(x, any_nonnegative=True))
    np.testing.assert_array_equal(
        got, (np.asarray(x) >= 0).any(axis=-1).astype(np.float32))
