"""Shared checks: every implementation of `bj.attention` runs this suite.

A test module subclasses `AttentionTestBase` and sets `implementation`
(tokamax's `test_base` pattern). Shapes come from `blasst_jax.testing` so the
benchmarks exercise the same problems.
"""

from __future__ import annotations

import zlib

import jax
from jax._src import mesh as mesh_lib
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import analysis
from blasst_jax import config as config_lib
from blasst_jax import testing

# An abstract H100 for lowering CUDA kernels on a machine without a GPU.
H100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                               num_cores=132, platform="cuda")


def lower_for_h100(fn, *specs):
  """`fn` traced on `specs` and lowered for CUDA under an abstract H100."""
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
      abstract_device=H100)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))

SHAPES = testing.CPU_TEST_SHAPES
# Natural-log distance from log λ under which kernel and oracle may disagree
# on a skip decision (rounding of the scores).
NEAR_TIE = {jnp.float32: 1e-3, jnp.bfloat16: 5e-2, jnp.float16: 2e-2}
OUT_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def key_for(*parts) -> jax.Array:
  """A distinct PRNG key per test case, the same in every run."""
  return jax.random.PRNGKey(zlib.crc32(repr(parts).encode()) % 2**31)


def assert_close(actual, expected, dtype, scale=1.0):
  tol = OUT_TOL[dtype] * scale
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  assert not np.any(np.isnan(a)), "NaN in output"
  np.testing.assert_allclose(a, e, atol=tol, rtol=tol)


def assert_lse_close(lse, expected, *, atol, rtol):
  """Log-sum-exp equal to `expected` wherever `expected` is finite."""
  finite = jnp.isfinite(expected)
  np.testing.assert_allclose(np.asarray(jnp.where(finite, lse, 0)),
                             np.asarray(jnp.where(finite, expected, 0)),
                             atol=atol, rtol=rtol)


def near_tie_tiles(result, threshold, tol) -> jax.Array:
  """bool, `result.block_gap` less its last axis: a visited block sits near
  log λ ([batch, q_heads, n_q_tiles] for prefill, [batch, kv_heads] for a
  decode result)."""
  gap = result.block_gap
  lam = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (gap.shape[0],))
  log_thr = config_lib.log_threshold(lam).reshape((-1,) + (1,) * (gap.ndim - 1))
  near = result.visited_mask & (jnp.abs(result.block_gap - log_thr) < tol)
  return jnp.any(near, axis=-1)


def assert_skips_match(skipped_per_tile, result, threshold, dtype):
  """Per-tile skip counts equal the oracle's except at near-ties."""
  expected = jnp.sum(result.skip_mask, axis=-1)
  differ = np.asarray(skipped_per_tile != expected)
  near = np.asarray(near_tie_tiles(result, threshold, NEAR_TIE[dtype]))
  bad = differ & ~near
  assert not bad.any(), (
      f"{bad.sum()} tiles disagree with the oracle away from a near-tie: "
      f"kernel {np.asarray(skipped_per_tile)[bad][:8]}, oracle "
      f"{np.asarray(expected)[bad][:8]}")


def assert_skip_mask_matches(skip_mask, skipped_per_tile, result, threshold,
                             dtype):
  """A kernel's recorded skip mask: consistent with its per-tile counts and
  equal to the oracle's blocks except in near-tie tiles."""
  np.testing.assert_array_equal(np.asarray(jnp.sum(skip_mask, axis=-1)),
                                np.asarray(skipped_per_tile))
  near = np.asarray(near_tie_tiles(result, threshold, NEAR_TIE[dtype]))
  bad = np.asarray(skip_mask != result.skip_mask) & ~near[..., None]
  assert not bad.any(), f"{bad.sum()} blocks differ away from a near-tie"


class AttentionTestBase:
  """The suite; subclasses set `implementation`."""

  implementation: str = ""

  def attention(self, q, k, v, **kwargs):
    return bj.attention(q, k, v, implementation=self.implementation, **kwargs)

  @pytest.mark.parametrize("causal", [False, True])
  @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
  def test_dense_matches_jax(self, shape, causal):
    q, k, v = shape.inputs(key_for("dense", shape, causal), pattern="random")
    out = self.attention(q, k, v, causal=causal, block_q=32, block_kv=32)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected, jnp.float32)

  @pytest.mark.parametrize("causal", [False, True])
  @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
  def test_skipping_matches_oracle(self, shape, causal):
    q, k, v = shape.inputs(key_for("skip", shape, causal),
                           sharpness=(8.0, 16.0), window=16)
    threshold = 0.02
    out, stats = self.attention(q, k, v, threshold=threshold, causal=causal,
                                block_q=16, block_kv=16, return_stats=True)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=16, block_kv=16, threshold=threshold, causal=causal)
    assert int(jnp.sum(oracle.stats.skipped_blocks)) > 0, "nothing skipped"
    np.testing.assert_array_equal(stats.visited_blocks,
                                  oracle.stats.visited_blocks)
    near = near_tie_tiles(oracle, threshold, NEAR_TIE[jnp.float32])
    if not bool(jnp.any(near)):
      np.testing.assert_array_equal(stats.skipped_blocks,
                                    oracle.stats.skipped_blocks)
      assert_close(out, oracle.out, jnp.float32)

  @pytest.mark.parametrize("causal", [False, True])
  def test_kv_lengths_and_empty_rows(self, causal):
    shape = SHAPES[1]
    q, k, v = shape.inputs(key_for("kvl", causal), pattern="random")
    q, k, v = (jnp.concatenate([x, x], axis=0) for x in (q, k, v))
    kv_lengths = jnp.array([shape.kv_len, 37], jnp.int32)
    out = self.attention(q, k, v, causal=causal, kv_lengths=kv_lengths,
                         block_q=32, block_kv=32, threshold=0.01)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=32, block_kv=32, threshold=0.01, causal=causal,
        kv_lengths=kv_lengths)
    assert_close(out, oracle.out, jnp.float32)
    # Keys past the length must not matter.
    k2 = k.at[1, 37:].set(100.0)
    v2 = v.at[1, 37:].set(jnp.nan)
    out2 = self.attention(q, k2, v2, causal=causal, kv_lengths=kv_lengths,
                          block_q=32, block_kv=32, threshold=0.01)
    assert_close(out2, out, jnp.float32)

  def test_fully_masked_rows_are_zero(self):
    shape = SHAPES[0]
    q, k, v = shape.inputs(key_for("masked"), pattern="random")
    kv_lengths = jnp.array([0, 5], jnp.int32)
    out, stats = self.attention(q, k, v, kv_lengths=kv_lengths, causal=True,
                                threshold=0.1, return_stats=True,
                                block_q=32, block_kv=32)
    assert not bool(jnp.any(jnp.isnan(out)))
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    assert int(jnp.sum(stats.visited_blocks[0])) == 0
    expected = jax.nn.dot_product_attention(
        q[1:], k[1:], v[1:], is_causal=True, key_value_seq_lengths=kv_lengths[1:])
    # Causal rows 0..3 see keys 0..i; later rows see keys 0..4.
    assert_close(out[1:], expected, jnp.float32)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_low_precision(self, dtype):
    shape = SHAPES[1]
    q, k, v = shape.inputs(key_for("lowp", dtype), dtype=dtype)
    out, stats = self.attention(q, k, v, causal=True, threshold=1e-3,
                                block_q=32, block_kv=32, return_stats=True)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=32, block_kv=32, threshold=1e-3, causal=True)
    assert out.dtype == dtype
    assert_close(out, oracle.out, dtype)
    diff = jnp.abs(stats.skipped_blocks - oracle.stats.skipped_blocks)
    assert int(jnp.sum(diff)) <= max(1, int(jnp.sum(oracle.stats.visited_blocks)) // 50)

  def test_threshold_zero_is_dense_and_traced_threshold(self):
    shape = SHAPES[2]
    q, k, v = shape.inputs(key_for("traced"))
    fn = jax.jit(lambda t: self.attention(q, k, v, threshold=t, causal=True,
                                          block_q=16, block_kv=16,
                                          return_stats=True))
    out0, stats0 = fn(jnp.float32(0.0))
    assert int(jnp.sum(stats0.skipped_blocks)) == 0
    assert_close(out0, bj.reference.dense_attention(q, k, v, causal=True),
                 jnp.float32)
    out1, stats1 = fn(jnp.float32(0.05))
    assert int(jnp.sum(stats1.skipped_blocks)) > 0
    bound = analysis.skip_error_bound(
        v, bj.reference.blockwise_attention(
            q, k, v, block_q=16, block_kv=16, threshold=0.05,
            causal=True).skip_mask, 0.05, block_q=16, block_kv=16,
        q_len=shape.q_len)
    err = jnp.max(jnp.abs(out1 - out0), axis=-1).transpose(0, 2, 1)
    assert bool(jnp.all(err <= bound + 1e-5))

  def test_per_sequence_threshold_and_config(self):
    shape = SHAPES[0]
    q, k, v = shape.inputs(key_for("config"), sharpness=16.0, window=8)
    _, s_arr = self.attention(q, k, v, threshold=jnp.array([0.0, 0.05]),
                              block_q=16, block_kv=16, return_stats=True)
    assert int(jnp.sum(s_arr.skipped_blocks[0])) == 0
    assert int(jnp.sum(s_arr.skipped_blocks[1])) > 0
    cfg = bj.SkipSoftmaxConfig(threshold_scale_factor={"prefill": 6.4,
                                                        "decode": 0.0})
    _, s_cfg = self.attention(q, k, v, threshold=cfg, block_q=16,
                              block_kv=16, return_stats=True)
    _, s_thr = self.attention(q, k, v, threshold=6.4 / shape.kv_len,
                              block_q=16, block_kv=16, return_stats=True)
    np.testing.assert_array_equal(s_cfg.skipped_blocks, s_thr.skipped_blocks)
