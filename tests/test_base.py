"""Shared suites: every implementation of `bj.attention` runs
`AttentionTestBase` and `GradientTestBase`, every implementation of
`bj.decode_attention` runs `DecodeTestBase` (tokamax's `test_base` pattern).

A test module subclasses a suite, sets `implementation` and says what the
implementation takes with the `supports_*` flags, its shapes, dtype and
tiles; checks it cannot run are skipped, not weakened. Every check compares
against the oracle (`bj.reference.blockwise_attention` /
`blockwise_decode_attention`: outputs, lse, skip counts, the recorded skip
mask) or against dense attention at λ = 0. Shapes come from
`blasst_jax.testing`, which the benchmarks read too; shared checks live
there as well.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import test_util as jtu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import analysis
from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax import testing
# Imported before anything is traced: importing Pallas registers config
# options, and a function traced before that is traced (and compiled) again.
from blasst_jax.kernels import pallas_triton  # pylint: disable=unused-import
from blasst_jax.kernels import pallas_triton_bwd  # pylint: disable=unused-import
from blasst_jax.ops import base as ops_base

key_for = testing.key_for
assert_close = testing.assert_close


def shape_ids(shape) -> str:
  return shape.name


def away_from_ties(out, expected, oracle, threshold, dtype, block_q):
  """`out` equals `expected` on every row of a q tile whose skip decisions
  all sit clear of log λ (a near-tie may go either way)."""
  near = testing.near_tie_tiles(oracle, threshold,
                                testing.NEAR_TIE[dtype])     # [b, h, nq]
  rows = jnp.repeat(near, block_q, axis=-1)[..., :out.shape[1]]
  keep = ~jnp.swapaxes(rows, 1, 2)[..., None]               # [b, q, h, 1]
  testing.assert_close(jnp.where(keep, out.astype(jnp.float32), 0),
                       jnp.where(keep, expected.astype(jnp.float32), 0), dtype)
  return bool(jnp.any(near))


class SuiteBase:
  """What every suite's subclass sets, and the hooks around kernel calls."""

  implementation: str = ""
  # `interpret` passed to every call.
  interpret = None

  def before_call(self):
    """Called before every kernel call (resets the interpreter's race
    detector)."""

  def check_call(self):
    """Called after every kernel call (race checks of the interpreter)."""

  def require(self, flag: str):
    if not getattr(self, flag):
      pytest.skip(f"{self.implementation} does not take it ({flag})")


class RaceChecked:
  """Mixed into a suite for the Mosaic GPU kernels on CPU: Pallas' GPU
  interpret mode with its race detector, started afresh before every call;
  a call fails on a shared-memory data race."""

  interpret = plgpu.InterpretGPUParams(detect_races=True)

  def before_call(self):
    interpret_pallas_call.reset_gpu_interpret_mode_state()

  def check_call(self):
    assert not interpret_pallas_call.get_races().races_found, (
        "the race detector found a shared-memory data race")


# ================================================================= prefill
class AttentionTestBase(SuiteBase):
  """The prefill suite; subclasses set `implementation` and what it takes."""

  # Problems, input dtype and the tiles (block_q, block_kv) of the checks.
  shapes: tuple[testing.AttentionShape, ...] = testing.CPU_TEST_SHAPES
  # Shapes of the dense and skipping checks, run on each (None: `shapes`).
  sweep_shapes: tuple[testing.AttentionShape, ...] | None = None
  dtype = jnp.float32
  tiles: tuple[int, int] = (16, 16)
  # Shapes of the block mask check (None: the second of `shapes`).
  mask_shapes: tuple[testing.AttentionShape, ...] | None = None
  # Dtypes checked besides `dtype` (outputs and skips within their rounding).
  low_precision_dtypes: tuple = (jnp.bfloat16, jnp.float16)
  # `kernel_config` passed to every call.
  kernel_config = None
  supports_causal = True
  supports_masks = True            # block_mask
  supports_initial_max = True
  supports_lse = True              # return_lse
  supports_skip_record = True      # the skip mask the backward walks around
  supports_traced_threshold = True
  # Problem of the initial_max chaining check, its queries at the first
  # q_len positions (None: batch 2, 4 x 2 heads, as many queries as keys,
  # the keys and head_dim of `shapes[1]`).
  chain_shape: testing.AttentionShape | None = None

  def tiles_for(self, shape) -> tuple[int, int]:
    del shape
    return self.tiles

  def attention(self, q, k, v, **kwargs):
    """`bj.attention` through the public API."""
    kwargs.setdefault("interpret", self.interpret)
    kwargs.setdefault("kernel_config", self.kernel_config)
    self.before_call()
    out = jax.block_until_ready(bj.attention(
        q, k, v, implementation=self.implementation, **kwargs))
    self.check_call()
    return out

  def run(self, q, k, v, *, threshold, causal=False, block_q=None,
          block_kv=None, kv_lengths=None, block_mask=None,
          initial_max=None) -> ops_base.AttentionResult:
    """The op's whole result (out, lse, stats, skip record, row max)."""
    op = ops_base.get_op("attention", self.implementation)
    plan = op.prepare(q_len=q.shape[1], kv_len=k.shape[1],
                      head_dim=q.shape[-1], dtype=q.dtype, block_q=block_q,
                      block_kv=block_kv, block_mask=block_mask,
                      kernel_config=self.kernel_config,
                      interpret=self.interpret)
    self.before_call()
    result = jax.block_until_ready(op(
        q, k, v, plan, kv_lengths=kv_lengths, threshold=threshold,
        causal=causal, sm_scale=reference.default_sm_scale(q.shape[-1]),
        initial_max=initial_max, return_lse=True,
        record_skips=self.supports_skip_record))
    self.check_call()
    return result

  def ragged_problem(self, name, shape, causal, *, sharpness, step):
    """(key, (q, k, v), kv_lengths): sink + local-window inputs of `shape`
    under the key of (name, shape, causal), each sequence `step` keys
    shorter than the one before."""
    key = key_for(name, shape, causal)
    qkv = shape.inputs(key, dtype=self.dtype, sharpness=sharpness, window=16)
    kv_lengths = jnp.array([shape.kv_len - step * i
                            for i in range(shape.batch)], jnp.int32)
    return key, qkv, kv_lengths

  def pytest_generate_tests(self, metafunc):
    """Parameters from what the subclass takes: `shape` over its shapes,
    `causal` over the masks it runs, `lowp_dtype` over its low precision
    dtypes."""
    if "shape" in metafunc.fixturenames:
      metafunc.parametrize("shape", self.sweep_shapes or self.shapes,
                           ids=shape_ids)
    if "mask_shape" in metafunc.fixturenames:
      metafunc.parametrize("mask_shape", self.mask_shapes or self.shapes[1:2],
                           ids=shape_ids)
    if "causal" in metafunc.fixturenames:
      metafunc.parametrize("causal", [False, True] if self.supports_causal
                           else [False])
    if "lowp_dtype" in metafunc.fixturenames:
      metafunc.parametrize("lowp_dtype", self.low_precision_dtypes,
                           ids=lambda d: jnp.dtype(d).name)

  def check_against_oracle(self, result, oracle, threshold, *, block_q,
                           expect_skips=True):
    """visited, skip counts, skip mask, outputs and lse against the
    oracle's."""
    dtype = self.dtype
    np.testing.assert_array_equal(result.stats.visited_blocks,
                                  oracle.stats.visited_blocks)
    # Tiles whose walk takes a decision (beyond the first visited block).
    decisions = int(jnp.sum(oracle.visited_mask)) - int(
        jnp.sum(jnp.any(oracle.visited_mask, axis=-1)))
    if expect_skips and decisions >= 8:
      assert int(jnp.sum(oracle.stats.skipped_blocks)) > 0, "nothing skipped"
    if result.skip_mask is not None:
      skipped_per_tile = jnp.sum(result.skip_mask, axis=-1)
      testing.assert_skips_match(skipped_per_tile, oracle, threshold, dtype)
      testing.assert_skip_mask_matches(result.skip_mask, skipped_per_tile,
                                       oracle, threshold, dtype)
      assert not bool(jnp.any(result.skip_mask & ~oracle.visited_mask))
    near = away_from_ties(result.out, oracle.out, oracle, threshold, dtype,
                          block_q)
    if not near:
      np.testing.assert_array_equal(result.stats.skipped_blocks,
                                    oracle.stats.skipped_blocks)
    if result.lse is not None:
      testing.assert_lse_close(result.lse, oracle.lse,
                               atol=1e-4 if dtype == jnp.float32 else 5e-2,
                               rtol=1e-5 if dtype == jnp.float32 else 1e-2)

  # ------------------------------------------------------------- dense
  def test_dense_matches_jax(self, shape, causal):
    """λ = 0 (the build without the skip check) is dense attention."""
    bq, bkv = self.tiles_for(shape)
    q, k, v = shape.inputs(key_for("dense", shape, causal), pattern="random",
                           dtype=self.dtype)
    out, stats = self.attention(q, k, v, causal=causal, block_q=bq,
                                block_kv=bkv, return_stats=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = jax.nn.dot_product_attention(*f32, is_causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected, self.dtype)
    assert int(jnp.sum(stats.skipped_blocks)) == 0

  # ------------------------------------------------------- the skip rule
  def test_skipping_matches_oracle(self, shape, causal):
    """Sink + local-window scores of varied sharpness, ragged lengths: the
    kernel skips what the oracle skips, and outputs, lse and the skip
    record follow it."""
    bq, bkv = self.tiles_for(shape)
    _, (q, k, v), kv_lengths = self.ragged_problem(
        "skip", shape, causal, sharpness=(8.0, 16.0, 24.0), step=37)
    threshold = jnp.array([0.02, 0.1][:shape.batch], jnp.float32)
    threshold = jnp.broadcast_to(threshold, (shape.batch,))
    result = self.run(q, k, v, threshold=threshold, causal=causal,
                      block_q=bq, block_kv=bkv, kv_lengths=kv_lengths)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=bq, block_kv=bkv, threshold=threshold, causal=causal,
        kv_lengths=kv_lengths)
    self.check_against_oracle(result, oracle, threshold, block_q=bq)
    assert (result.stats.block_q, result.stats.block_kv) == (bq, bkv)

  def test_kv_lengths_and_keys_past_them(self, causal):
    shape = self.shapes[1]
    bq, bkv = self.tiles_for(shape)
    q, k, v = shape.inputs(key_for("kvl", causal), pattern="random",
                           dtype=self.dtype)
    q, k, v = (jnp.concatenate([x[:1], x[:1]], axis=0) for x in (q, k, v))
    kv_lengths = jnp.array([shape.kv_len, 37], jnp.int32)
    out = self.attention(q, k, v, causal=causal, kv_lengths=kv_lengths,
                         block_q=bq, block_kv=bkv, threshold=0.01)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=bq, block_kv=bkv, threshold=0.01, causal=causal,
        kv_lengths=kv_lengths)
    assert_close(out, oracle.out, self.dtype)
    # Keys past the length must not matter.
    k2 = k.at[1, 37:].set(100.0)
    out2 = self.attention(q, k2, v, causal=causal, kv_lengths=kv_lengths,
                          block_q=bq, block_kv=bkv, threshold=0.01)
    assert_close(out2, out, self.dtype)

  def test_nan_past_the_length_does_not_leak(self, causal):
    """Caches past a sequence's length hold garbage (NaN here) that must
    not reach its output, in the block that holds its last key too."""
    shape = self.shapes[1]
    bq, bkv = self.tiles_for(shape)
    q, k, v = shape.inputs(key_for("kvl", causal), pattern="random",
                           dtype=self.dtype)
    kv_lengths = jnp.array([37], jnp.int32)
    q, k, v = q[:1], k[:1], v[:1]
    out = self.attention(q, k.at[:, 37:].set(jnp.nan),
                         v.at[:, 37:].set(jnp.nan), causal=causal,
                         kv_lengths=kv_lengths, block_q=bq, block_kv=bkv,
                         threshold=0.01)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=bq, block_kv=bkv, threshold=0.01, causal=causal,
        kv_lengths=kv_lengths)
    assert_close(out, oracle.out, self.dtype)

  def test_fully_masked_rows_are_zero(self):
    shape = self.shapes[0]
    assert shape.batch == 2
    bq, bkv = self.tiles_for(shape)
    causal = self.supports_causal
    q, k, v = shape.inputs(key_for("masked"), pattern="random",
                           dtype=self.dtype)
    kv_lengths = jnp.array([0, 5], jnp.int32)
    out, stats = self.attention(q, k, v, kv_lengths=kv_lengths, causal=causal,
                                threshold=0.1, return_stats=True,
                                block_q=bq, block_kv=bkv)
    assert not bool(jnp.any(jnp.isnan(out)))
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
    assert int(jnp.sum(stats.visited_blocks[0])) == 0
    f32 = [x[1:].astype(jnp.float32) for x in (q, k, v)]
    expected = jax.nn.dot_product_attention(
        *f32, is_causal=causal, key_value_seq_lengths=kv_lengths[1:])
    # Causal rows 0..3 see keys 0..i; later rows see keys 0..4.
    assert_close(out[1:], expected, self.dtype)

  def test_low_precision(self, lowp_dtype):
    dtype = lowp_dtype
    shape = self.shapes[1]
    bq, bkv = self.tiles_for(shape)
    causal = self.supports_causal
    q, k, v = shape.inputs(key_for("lowp", dtype), dtype=dtype)
    out, stats = self.attention(q, k, v, causal=causal, threshold=1e-3,
                                block_q=bq, block_kv=bkv, return_stats=True)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=bq, block_kv=bkv, threshold=1e-3, causal=causal)
    assert out.dtype == dtype
    assert_close(out, oracle.out, dtype)
    diff = jnp.abs(stats.skipped_blocks - oracle.stats.skipped_blocks)
    assert int(jnp.sum(diff)) <= max(
        1, int(jnp.sum(oracle.stats.visited_blocks)) // 50)

  def test_threshold_zero_is_dense_and_traced_threshold(self):
    """One compiled call serves every λ; λ = 0 traced is dense and the
    error at λ > 0 obeys the analytic bound."""
    self.require("supports_traced_threshold")
    shape = max(self.shapes, key=lambda s: s.q_len * s.kv_len)
    bq, bkv = self.tiles_for(shape)
    causal = self.supports_causal
    q, k, v = shape.inputs(key_for("traced"), dtype=self.dtype,
                           sharpness=(8.0, 16.0), window=16)
    fn = jax.jit(lambda t: bj.attention(
        q, k, v, threshold=t, causal=causal, block_q=bq, block_kv=bkv,
        return_stats=True, implementation=self.implementation,
        interpret=self.interpret, kernel_config=self.kernel_config))
    self.before_call()
    out0, stats0 = jax.block_until_ready(fn(jnp.float32(0.0)))
    self.check_call()
    assert int(jnp.sum(stats0.skipped_blocks)) == 0
    assert_close(out0, bj.reference.dense_attention(q, k, v, causal=causal),
                 self.dtype)
    self.before_call()
    out1, stats1 = jax.block_until_ready(fn(jnp.float32(0.05)))
    self.check_call()
    assert int(jnp.sum(stats1.skipped_blocks)) > 0
    bound = analysis.skip_error_bound(
        v.astype(jnp.float32), bj.reference.blockwise_attention(
            q, k, v, block_q=bq, block_kv=bkv, threshold=0.05,
            causal=causal).skip_mask, 0.05, block_q=bq, block_kv=bkv,
        q_len=shape.q_len)
    err = jnp.max(jnp.abs(out1.astype(jnp.float32)
                          - out0.astype(jnp.float32)),
                  axis=-1).transpose(0, 2, 1)
    slack = 1e-5 if self.dtype == jnp.float32 else testing.OUT_TOL[self.dtype]
    assert bool(jnp.all(err <= bound + slack))

  def test_per_sequence_threshold_and_config(self):
    shape = self.shapes[0]
    assert shape.batch == 2
    bq, bkv = self.tiles_for(shape)
    q, k, v = shape.inputs(key_for("config"), sharpness=16.0, window=8,
                           dtype=self.dtype)
    _, s_arr = self.attention(q, k, v, threshold=jnp.array([0.0, 0.05]),
                              block_q=bq, block_kv=bkv, return_stats=True)
    assert int(jnp.sum(s_arr.skipped_blocks[0])) == 0
    assert int(jnp.sum(s_arr.skipped_blocks[1])) > 0
    cfg = bj.SkipSoftmaxConfig(threshold_scale_factor={"prefill": 6.4,
                                                        "decode": 0.0})
    _, s_cfg = self.attention(q, k, v, threshold=cfg, block_q=bq,
                              block_kv=bkv, return_stats=True)
    _, s_thr = self.attention(q, k, v, threshold=6.4 / shape.kv_len,
                              block_q=bq, block_kv=bkv, return_stats=True)
    np.testing.assert_array_equal(s_cfg.skipped_blocks, s_thr.skipped_blocks)

  def test_padded_rows_take_no_part_in_causal_decisions(self):
    """q_len < kv_len, causal: the rows padding the last q tile must not
    see keys past the last real row (a large score there would otherwise
    veto the one skip)."""
    self.require("supports_causal")
    t = self.tiles_for(self.shapes[0])[0]     # square tiles of block_q
    d = self.shapes[0].head_dim
    q_len, kv_len = t + (9 * t) // 16, 4 * t
    spike = q_len + (t - (q_len - t)) // 2     # in block 1, past row q_len-1
    keys = jax.random.split(key_for("padded_rows"), 3)
    q = (0.1 * jax.random.normal(keys[0], (1, q_len, 1, d))).at[..., 0].set(4.0)
    k = 0.1 * jax.random.normal(keys[1], (1, kv_len, 1, d))
    k = k.at[:, 0, 0, 0].set(8.0).at[:, spike, 0, 0].set(12.0)
    v = jax.random.normal(keys[2], (1, kv_len, 1, d))
    q, k, v = (x.astype(self.dtype) for x in (q, k, v))
    result = self.run(q, k, v, threshold=0.1, causal=True, block_q=t,
                      block_kv=t)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=t, block_kv=t, threshold=0.1, causal=True)
    np.testing.assert_array_equal(result.stats.skipped_blocks,
                                  oracle.stats.skipped_blocks)
    assert int(jnp.sum(result.stats.skipped_blocks)) == 1
    assert_close(result.out, oracle.out, self.dtype)

  # -------------------------------------------------------- block masks
  def test_block_mask_matches_oracle(self, mask_shape, causal):
    self.require("supports_masks")
    shape = mask_shape
    bq, bkv = self.tiles_for(shape)
    key, (q, k, v), kv_lengths = self.ragged_problem(
        "block_mask", shape, causal, sharpness=(16.0, 24.0), step=37)
    nq, nk = -(-shape.q_len // bq), -(-shape.kv_len // bkv)
    assert nq >= 3, "the mask needs three q tiles"
    mask = testing.program_mask(jax.random.fold_in(key, 1),
                                (shape.batch, shape.q_heads, nq, nk), causal)
    threshold = 0.1
    result = self.run(q, k, v, threshold=threshold, causal=causal,
                      block_q=bq, block_kv=bkv, kv_lengths=kv_lengths,
                      block_mask=mask)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=bq, block_kv=bkv, threshold=threshold, causal=causal,
        kv_lengths=kv_lengths, block_mask=mask)
    walked = np.asarray(oracle.visited_mask)
    assert (walked[:, :, 0] != walked[:, :, 1]).any()   # lists that differ
    allowed = bj.reference.visited_blocks_mask(shape.q_len, shape.kv_len, bq,
                                               bkv, kv_lengths, causal)
    assert (int(jnp.sum(allowed)) * shape.q_heads
            > int(jnp.sum(result.stats.visited_blocks))), "no mask"
    self.check_against_oracle(result, oracle, threshold, block_q=bq)
    # The tile that selects nothing is zero.
    np.testing.assert_array_equal(
        np.asarray(result.out[0, 2 * bq:3 * bq, 0], np.float32), 0.0)
    # masked_blocks through the public API: allowed less visited.
    _, stats = self.attention(q, k, v, threshold=threshold, causal=causal,
                              kv_lengths=kv_lengths, block_mask=mask,
                              block_q=bq, block_kv=bkv, return_stats=True)
    _, ref_stats = bj.attention(q, k, v, threshold=threshold, causal=causal,
                                kv_lengths=kv_lengths, block_mask=mask,
                                block_q=bq, block_kv=bkv, return_stats=True,
                                implementation="reference")
    np.testing.assert_array_equal(stats.masked_blocks, ref_stats.masked_blocks)
    assert int(jnp.sum(stats.masked_blocks)) > 0

  # ------------------------------------------------- lse and initial max
  def test_return_lse_matches_dense_lse(self):
    self.require("supports_lse")
    shape = self.shapes[0]
    bq, bkv = self.tiles_for(shape)
    causal = self.supports_causal
    q, k, v = shape.inputs(key_for("lse"), dtype=self.dtype)
    kv_lengths = jnp.asarray([shape.kv_len, 0], jnp.int32)  # 2nd sees none
    (out, lse), stats = self.attention(
        q, k, v, causal=causal, kv_lengths=kv_lengths, block_q=bq,
        block_kv=bkv, return_lse=True, return_stats=True)
    want, want_lse = reference.dense_attention(
        q, k, v, causal=causal, kv_lengths=kv_lengths, return_lse=True)
    assert lse.shape == (2, shape.q_heads, shape.q_len)
    assert lse.dtype == jnp.float32
    assert_close(out, want, self.dtype)
    tol = 1e-4 if self.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(lse[0], want_lse[0], atol=tol, rtol=tol)
    assert bool(jnp.all(lse[1] == -jnp.inf)) and not jnp.any(jnp.isnan(out))
    assert int(jnp.sum(stats.visited_blocks[1])) == 0

  def test_initial_max_matches_oracle(self, causal):
    """Rows start from given maxima: -inf (none), inside the score range,
    or above every score (every block skippable, the first too); the final
    row max, lse, outputs and skips follow the oracle."""
    self.require("supports_initial_max")
    shape = self.shapes[1]
    bq, bkv = self.tiles_for(shape)
    key, (q, k, v), kv_lengths = self.ragged_problem(
        "initial_max", shape, causal, sharpness=(12.0, 20.0), step=53)
    group = shape.q_heads // shape.kv_heads
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                   jnp.repeat(k, group, axis=2).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * shape.head_dim ** -0.5
    top = jnp.max(s, axis=-1)                               # [b, h, q]
    pick = jax.random.randint(jax.random.fold_in(key, 1), top.shape, 0, 4)
    initial_max = jnp.select(
        [pick == 0, pick == 1, pick == 2],
        [jnp.full_like(top, -jnp.inf), top - 3.0, top + 5.0], top - 0.5)
    initial_max = initial_max.at[0, 0, :bq + 6].set(-jnp.inf)  # a tile: none
    result = self.run(q, k, v, threshold=0.1, causal=causal, block_q=bq,
                      block_kv=bkv, kv_lengths=kv_lengths,
                      initial_max=initial_max)
    oracle = bj.reference.blockwise_attention(
        q, k, v, block_q=bq, block_kv=bkv, threshold=0.1, causal=causal,
        kv_lengths=kv_lengths, initial_max=initial_max)
    self.check_against_oracle(result, oracle, 0.1, block_q=bq)
    np.testing.assert_allclose(result.row_max, oracle.row_max, rtol=1e-5,
                               atol=1e-5)

  def test_initial_max_chains_key_parts_like_one_call(self):
    """Two calls over consecutive key parts, the second started from the
    first's final row max, skip what one call over all keys skips; merged by
    lse they give its output. Without the start the second part skips less.
    The final max is the row max of all scores (a skipped block never holds
    a larger one)."""
    self.require("supports_initial_max")
    from blasst_jax import sharding  # pylint: disable=g-import-not-at-top
    shape = self.chain_shape or testing.AttentionShape(
        batch=2, q_len=self.shapes[1].kv_len, kv_len=self.shapes[1].kv_len,
        q_heads=4, kv_heads=2, head_dim=self.shapes[1].head_dim)
    bq, bkv = self.tiles_for(shape)
    # Two or more KV blocks per part, the cut on a block boundary.
    n_blocks = -(-shape.kv_len // bkv)
    cut = bkv * max(1, n_blocks // 3)
    b, hq, hkv, d = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim
    q, k, v = bj.patterns.sink_local_qkv(
        jax.random.PRNGKey(28), batch=b, seq_len=shape.q_len,
        kv_len=shape.kv_len, q_heads=hq, kv_heads=hkv, head_dim=d, window=24,
        sharpness=(4.0, 12.0, 20.0), dtype=self.dtype)
    opts = dict(block_q=bq, block_kv=bkv, threshold=0.05, return_stats=True)
    want, want_stats = self.attention(q, k, v, **opts)
    start = jnp.full((b, hq, shape.q_len), -jnp.inf)
    (out0, lse0, max0), stats0 = self.attention(
        q, k[:, :cut], v[:, :cut], return_lse=True, initial_max=start, **opts)
    (out1, lse1, max1), stats1 = self.attention(
        q, k[:, cut:], v[:, cut:], return_lse=True, initial_max=max0, **opts)
    _, alone = self.attention(q, k[:, cut:], v[:, cut:], **opts)
    np.testing.assert_array_equal(
        stats0.skipped_blocks + stats1.skipped_blocks,
        want_stats.skipped_blocks)
    assert bool(jnp.all(alone.skipped_blocks <= stats1.skipped_blocks))
    assert int(jnp.sum(alone.skipped_blocks)) < int(jnp.sum(
        stats1.skipped_blocks))
    merged = sharding.merge_parts(jnp.stack([out0, out1]),
                                  jnp.swapaxes(jnp.stack([lse0, lse1]), 2, 3))
    tol = 2e-5 if self.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(merged, want.astype(jnp.float32), atol=tol,
                               rtol=tol)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                   jnp.repeat(k, hq // hkv, axis=2).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * d ** -0.5
    np.testing.assert_allclose(max1, jnp.max(s, axis=-1), rtol=1e-4,
                               atol=1e-4)


# ================================================================== decode
def decode_lengths(shape: testing.DecodeShape) -> jax.Array:
  """Full, not a multiple of a block, a single token (cycled over the
  batch)."""
  pick = [shape.max_len, shape.max_len // 2 + 17, 1]
  return jnp.array([pick[i % 3] for i in range(shape.batch)], jnp.int32)


class DecodeTestBase(SuiteBase):
  """The decode suite; subclasses set `implementation` and what it takes."""

  shapes: tuple[testing.DecodeShape, ...] = testing.DECODE_CPU_TEST_SHAPES
  fp8_shapes = testing.DECODE_FP8_TEST_SHAPES
  dtype = jnp.float32
  block_kv: int = 32
  max_modes: tuple[str, ...] = bj.decode.MAX_MODES
  split_counts: tuple[int, ...] = (1, 3)
  # The mode of the checks that are not about modes.
  default_mode: str = "anchored"
  low_precision_dtypes: tuple = (jnp.bfloat16,)
  supports_initial_max = True
  supports_fp8 = True
  supports_paged = True
  supports_lse = True
  # Bytes per cache element an FP8 cache is read at (2: widened first).
  fp8_itemsize = 1
  # Reports the reference's bytes_read (K of every visited block, V of the
  # kept ones).
  bytes_match_reference = False
  # `kernel_config` passed to every call.
  kernel_config = None

  def marks_for(self, test_name: str, shape) -> list:
    """pytest marks of one test on one shape (a known failure: xfail)."""
    del test_name, shape
    return []

  def block_kv_for(self, shape) -> int:
    del shape
    return self.block_kv

  def decode(self, q, k, v, kv_lengths, **kwargs):
    kwargs.setdefault("interpret", self.interpret)
    kwargs.setdefault("kernel_config", self.kernel_config)
    self.before_call()
    out = jax.block_until_ready(bj.decode_attention(
        q, k, v, kv_lengths, implementation=self.implementation, **kwargs))
    self.check_call()
    return out

  def paged_decode(self, q, k_pages, v_pages, table, kv_lengths, **kwargs):
    kwargs.setdefault("interpret", self.interpret)
    kwargs.setdefault("kernel_config", self.kernel_config)
    self.before_call()
    out = jax.block_until_ready(bj.paged_decode_attention(
        q, k_pages, v_pages, table, kv_lengths,
        implementation=self.implementation, **kwargs))
    self.check_call()
    return out

  def check_against_oracle(self, out, stats, oracle, threshold, dtype, *,
                           lse=None):
    testing.assert_close(out, oracle.out, dtype)
    np.testing.assert_array_equal(stats.visited_blocks,
                                  oracle.stats.visited_blocks)
    group = stats.skipped_blocks.shape[1] // oracle.skip_mask.shape[1]
    # Every head of a group reports the group's count: compare one per group.
    testing.assert_skips_match(stats.skipped_blocks[:, ::group], oracle,
                               threshold, dtype)
    if lse is not None:
      testing.assert_lse_close(lse, oracle.lse,
                               atol=1e-4 if dtype == jnp.float32 else 5e-2,
                               rtol=1e-5 if dtype == jnp.float32 else 1e-2)

  def pytest_generate_tests(self, metafunc):
    """Parameters from what the subclass takes: `shape` over its shapes,
    `max_mode` over its modes, `num_splits` over its split counts,
    `lowp_dtype` over its low precision dtypes."""
    name = metafunc.function.__name__
    for arg, shapes in (("shape", self.shapes), ("fp8_shape", self.fp8_shapes)):
      if arg in metafunc.fixturenames:
        metafunc.parametrize("shape" if arg == "shape" else arg, [
            pytest.param(s, marks=self.marks_for(name, s), id=shape_ids(s))
            for s in shapes])
    if "max_mode" in metafunc.fixturenames:
      metafunc.parametrize("max_mode", self.max_modes)
    if "num_splits" in metafunc.fixturenames:
      metafunc.parametrize("num_splits", self.split_counts,
                           ids=lambda n: f"splits{n}")
    if "lowp_dtype" in metafunc.fixturenames:
      metafunc.parametrize("lowp_dtype", self.low_precision_dtypes,
                           ids=lambda d: jnp.dtype(d).name)

  def test_matches_oracle(self, shape, max_mode, num_splits):
    """Ragged lengths, sink + local caches: outputs, lse and skips follow
    the oracle, and skipped V blocks are not read."""
    q, k, v = shape.inputs(key_for("decode", shape), dtype=self.dtype)
    kv_lengths = decode_lengths(shape)
    # Garbage past the lengths must not leak.
    past = jnp.arange(shape.max_len)[None, :, None, None] >= kv_lengths[
        :, None, None, None]
    k, v = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
    threshold = 1e-2
    bkv = self.block_kv_for(shape)
    (out, lse), stats = self.decode(
        q, k, v, kv_lengths, threshold=threshold, block_kv=bkv,
        num_splits=num_splits, max_mode=max_mode, return_stats=True,
        return_lse=True)
    oracle = bj.reference.blockwise_decode_attention(
        q, k, v, kv_lengths, block_kv=bkv, threshold=threshold,
        num_splits=num_splits, max_mode=max_mode)
    self.check_against_oracle(out, stats, oracle, threshold, self.dtype,
                              lse=lse if self.supports_lse else None)
    if max_mode != "split" or num_splits == 1:
      # (Splits with their own running max may skip nothing here.)
      assert int(jnp.sum(stats.skipped_blocks)) > 0, "nothing skipped"
    itemsize = jnp.dtype(self.dtype).itemsize
    block_bytes = bkv * shape.head_dim * itemsize
    dense_bytes = 2 * jnp.sum(oracle.visited_mask, axis=(1, 2)) * block_bytes
    if max_mode != "global":   # the global max reads every K block twice
      assert bool(jnp.all(stats.bytes_read <= dense_bytes))
      if int(jnp.sum(stats.skipped_blocks)) > 0:
        assert float(jnp.sum(stats.bytes_read)) < float(jnp.sum(dense_bytes))
    if self.bytes_match_reference:
      _, ref_stats = bj.decode_attention(
          q, k, v, kv_lengths, threshold=threshold, block_kv=bkv,
          num_splits=num_splits, max_mode=max_mode, return_stats=True,
          implementation="reference")
      np.testing.assert_array_equal(stats.bytes_read, ref_stats.bytes_read)

  def test_zero_threshold_is_dense_attention(self, max_mode):
    shape = self.shapes[0]
    q, k, v = shape.inputs(key_for("decode_dense", shape), dtype=self.dtype)
    kv_lengths = decode_lengths(shape)
    bkv = self.block_kv_for(shape)
    out, stats = self.decode(q, k, v, kv_lengths, threshold=0.0,
                             max_mode=max_mode, num_splits=2,
                             block_kv=bkv, return_stats=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    dense = bj.reference.dense_attention(f32[0][:, None], *f32[1:],
                                         kv_lengths=kv_lengths)[:, 0]
    testing.assert_close(out, dense, self.dtype)
    assert int(jnp.sum(stats.skipped_blocks)) == 0

  def test_low_precision_and_four_dim_query(self, lowp_dtype):
    dtype = lowp_dtype
    shape = self.shapes[0]
    q, k, v = shape.inputs(key_for("decode_lowp", dtype), dtype=dtype)
    kv_lengths = decode_lengths(shape)
    # The API's defaults: block size, split count and max mode.
    out = self.decode(q[:, None], k, v, kv_lengths, threshold=1e-3)
    assert out.shape == (shape.batch, 1, shape.q_heads, shape.head_dim)
    assert out.dtype == dtype
    block_kv = bj.decode.DEFAULT_BLOCK_KV
    oracle = bj.reference.blockwise_decode_attention(
        q, k, v, kv_lengths, block_kv=block_kv, threshold=1e-3,
        max_mode=bj.decode.DEFAULT_MAX_MODE,
        num_splits=bj.decode.default_num_splits(
            shape.batch, shape.kv_heads, shape.max_len, block_kv,
            implementation=self.implementation))
    testing.assert_close(out[:, 0], oracle.out, dtype)

  def test_scale_factor_config_uses_the_decode_phase(self):
    shape = self.shapes[0]
    q, k, v = shape.inputs(key_for("decode_cfg"), dtype=self.dtype)
    # λ = 3 / length stays below 1.
    kv_lengths = jnp.maximum(decode_lengths(shape), 40)
    cfg = bj.SkipSoftmaxConfig(threshold_scale_factor={"prefill": 0.0,
                                                       "decode": 3.0})
    max_mode = self.default_mode
    bkv = self.block_kv_for(shape)
    out, stats = self.decode(q, k, v, kv_lengths, threshold=cfg,
                             block_kv=bkv, max_mode=max_mode,
                             num_splits=2, return_stats=True)
    lam = 3.0 / kv_lengths.astype(jnp.float32)
    oracle = bj.reference.blockwise_decode_attention(
        q, k, v, kv_lengths, block_kv=bkv, threshold=lam,
        max_mode=max_mode, num_splits=2)
    self.check_against_oracle(out, stats, oracle, lam, self.dtype)
    assert int(jnp.sum(stats.skipped_blocks)) > 0

  def test_paged_cache_matches_oracle(self):
    """Pages scattered over a shuffled pool whose other pages hold NaN:
    the oracle on the contiguous cache, and the contiguous call."""
    self.require("supports_paged")
    shape = self.shapes[0]
    q, k, v = shape.inputs(key_for("decode_paged", shape), dtype=self.dtype)
    kv_lengths = decode_lengths(shape)
    bkv = self.block_kv_for(shape)
    pool_k, pool_v, table = testing.paged_cache(k, v, bkv)
    max_mode = self.default_mode
    common = dict(threshold=1e-2, num_splits=2, max_mode=max_mode,
                  return_stats=True)
    out, stats = self.paged_decode(q, pool_k, pool_v, table, kv_lengths,
                                   **common)
    oracle = bj.reference.blockwise_decode_attention(
        q, k, v, kv_lengths, block_kv=bkv, threshold=1e-2,
        num_splits=2, max_mode=max_mode)
    self.check_against_oracle(out, stats, oracle, 1e-2, self.dtype)
    assert int(jnp.sum(stats.skipped_blocks)) > 0
    ref, ref_stats = self.decode(q, k, v, kv_lengths, block_kv=bkv,
                                 **common)
    testing.assert_close(out, ref, self.dtype)
    np.testing.assert_array_equal(stats.skipped_blocks,
                                  ref_stats.skipped_blocks)

  def test_fp8_cache_matches_the_oracle_on_the_dequantized_cache(
      self, fp8_shape):
    """float8_e4m3fn caches with a scale per KV head, paged: the f32 oracle
    on the dequantized cache; the bytes read count FP8 elements once."""
    self.require("supports_fp8")
    shape = fp8_shape
    c = testing.fp8_cache(key_for("decode_fp8", shape), shape)
    kv_lengths = decode_lengths(shape)
    threshold, max_mode = 1e-2, self.default_mode
    bkv = self.block_kv_for(shape)
    page = bkv
    k_pages, v_pages, table = testing.paged_cache(c.k8, c.v8, page)
    out, stats = self.paged_decode(
        c.q, k_pages, v_pages, table, kv_lengths, threshold=threshold,
        k_scale=c.k_scale, v_scale=c.v_scale, num_splits=2,
        max_mode=max_mode, return_stats=True)
    assert out.dtype == c.q.dtype
    k, v = c.dequantized()
    oracle = bj.reference.blockwise_decode_attention(
        c.q.astype(jnp.float32), k, v, kv_lengths, block_kv=page,
        threshold=threshold, num_splits=2, max_mode=max_mode)
    self.check_against_oracle(out, stats, oracle, threshold, jnp.bfloat16)
    assert int(jnp.sum(stats.skipped_blocks)) > 0, "nothing skipped"
    group = shape.group
    visited = np.asarray(stats.visited_blocks[:, ::group]).sum(1)
    kept = visited - np.asarray(stats.skipped_blocks[:, ::group]).sum(1)
    np.testing.assert_allclose(
        np.asarray(stats.bytes_read),
        (visited + kept) * page * shape.head_dim * self.fp8_itemsize)

  def test_initial_max_matches_oracle(self, max_mode):
    """A given lower bound of the row max: the kernel decides as the
    oracle, and a higher start only adds skips."""
    self.require("supports_initial_max")
    shape = self.shapes[0]
    b, hq, hkv, d = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim
    q, k, v = shape.inputs(key_for("decode_initial_max", max_mode),
                           dtype=self.dtype)
    kv_lengths = decode_lengths(shape).at[-1].set(0)
    s = jnp.einsum("bhgd,bkhd->bhgk", q.astype(jnp.float32).reshape(
        b, hkv, hq // hkv, d), k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    s = jnp.where(jnp.arange(shape.max_len) < kv_lengths[:, None, None, None],
                  s, -jnp.inf)
    # Their true max (as "global"), but one KV group given nothing and one
    # row of another.
    top = jnp.max(s, axis=-1).reshape(b, hq)
    initial_max = top.at[1, :shape.group].set(-jnp.inf).at[0, -1].set(
        -jnp.inf)
    bkv = self.block_kv_for(shape)
    opts = dict(block_kv=bkv, threshold=1e-2, num_splits=3,
                max_mode=max_mode)
    out, stats = self.decode(q, k, v, kv_lengths, return_stats=True,
                             initial_max=initial_max, **opts)
    oracle = bj.reference.blockwise_decode_attention(
        q, k, v, kv_lengths, initial_max=initial_max, **opts)
    self.check_against_oracle(out, stats, oracle, 1e-2, self.dtype)
    assert not bool(jnp.any(jnp.isnan(out)))
    plain = bj.reference.blockwise_decode_attention(q, k, v, kv_lengths,
                                                    **opts)
    # The running max stays at or above the plain walk's: only more skips.
    assert not bool(jnp.any(plain.skip_mask & ~oracle.skip_mask))
    if max_mode == "split":   # the others start from the max here already
      assert int(oracle.skip_mask.sum()) > int(plain.skip_mask.sum())


# =============================================================== gradients
# The gradient of skip-softmax attention is that of the sparse forward
# (skipped blocks carry zero probability). At λ > 0 the forward is only
# piecewise smooth: a skip decision flips where a block's gap
# (`max_rows(block_max - running_max)`) crosses log λ. Checks that compare
# with finite differences, or with a second implementation, first check that
# every decision is clear of log λ.
#
# On CPU the Pallas kernels run in interpret mode, where the time goes into
# compiling: the functions below are jitted once per implementation and
# tiles with λ traced, so that one compile serves every λ of a test.

# λ candidates, largest (most pruning) first.
THRESHOLDS = (0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
# For finite differences: large λ, so that the skipped blocks carry enough
# weight for the sparse and the dense gradient to differ far beyond the
# finite-difference noise.
FD_THRESHOLDS = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1)
# Smallest |gap - log λ| (natural log) allowed at any decision when two
# implementations are compared: far above f32 rounding of the scores (bf16
# inputs give exact f32 products, summed in another order).
MARGIN = 0.05
# Finite-difference step: in f32 jax's default (1e-4) leaves ~3e-3 relative
# rounding noise at these score magnitudes; 1e-3 leaves ~4e-4.
FD_EPS = 1e-3
FD_TOL = 2e-3
# Realistic score structure: attention sink + local window.
PATTERN = dict(sharpness=(8.0, 16.0), window=8)
# Gradients against an f32 oracle's: (rtol, atol relative to the largest
# entry). bf16 kernels round P and dS to bf16 before their matmuls.
GRAD_TOL = {jnp.float32: (1e-4, 2e-5), jnp.bfloat16: (1e-2, 1e-2)}
# Gradients of one implementation under jit, checkpoint or vmap against its
# plain call (only the rounding of the code around the kernel differs).
TRANSFORM_TOL = {jnp.float32: (1e-5, 1e-6), jnp.bfloat16: (1e-2, 1e-2)}


def as_f32(*xs):
  return tuple(x.astype(jnp.float32) for x in xs)


@functools.partial(jax.jit, static_argnames=("causal", "block"))
def grad_oracle(q, k, v, threshold, kv_lengths=None, block_mask=None, *,
                causal, block):
  return bj.reference.blockwise_attention(
      q, k, v, block_q=block, block_kv=block, threshold=threshold,
      causal=causal, kv_lengths=kv_lengths, block_mask=block_mask)


@functools.partial(jax.jit, static_argnames=("causal", "block"))
def grad_oracle_vjp(q, k, v, d_out, threshold, kv_lengths=None,
                    block_mask=None, *, causal, block):
  """(dq, dk, dv) of the oracle's autodiff with the same skip rule."""
  _, vjp = jax.vjp(lambda q, k, v: grad_oracle(
      q, k, v, threshold, kv_lengths, block_mask, causal=causal,
      block=block).out, q, k, v)
  return vjp(d_out)


@functools.partial(jax.jit, static_argnames=("implementation", "causal",
                                             "block", "interpret"))
def attention_call(q, k, v, threshold=None, kv_lengths=None, block_mask=None,
                   *, implementation, causal, block, interpret):
  """(out, SkipStats) of bj.attention on block x block tiles; threshold
  None is λ = 0 known at trace time (the dense build), an array is a traced
  λ."""
  return bj.attention(
      q, k, v, threshold=0.0 if threshold is None else threshold,
      causal=causal, kv_lengths=kv_lengths, block_mask=block_mask,
      implementation=implementation, block_q=block, block_kv=block,
      interpret=interpret, return_stats=True)


@functools.partial(jax.jit, static_argnames=("implementation", "causal",
                                             "block", "interpret"))
def attention_vjp(q, k, v, d_out, threshold=None, kv_lengths=None,
                  block_mask=None, *, implementation, causal, block,
                  interpret):
  """(out, (dq, dk, dv), SkipStats) of bj.attention."""
  fn = lambda q, k, v: attention_call(
      q, k, v, threshold, kv_lengths, block_mask,
      implementation=implementation, causal=causal, block=block,
      interpret=interpret)
  out, vjp, stats = jax.vjp(fn, q, k, v, has_aux=True)
  return out, vjp(d_out), stats


def decision_blocks(result) -> jax.Array:
  """bool [b, hq, nq, nk]: visited blocks that are not a tile's first visited
  block, i.e. those the skip rule decides on."""
  visited = result.visited_mask
  first = visited & (jnp.cumsum(visited, axis=-1) == 1)
  return visited & ~first


def decision_margin(result, threshold: float) -> float:
  """min |gap - log λ| over the blocks the skip rule decides on."""
  dist = jnp.abs(result.block_gap - math.log(threshold))
  return float(jnp.min(jnp.where(decision_blocks(result), dist, jnp.inf)))


def clear_threshold(*problems, margin=MARGIN, thresholds=THRESHOLDS, causal,
                    block, **options) -> float:
  """The largest λ of `thresholds` that skips at least one block in each
  (q, k, v) of `problems` while every decision lies more than `margin` from
  log λ.

  The gaps do not depend on λ (a block is skipped only when no row's max
  rises, so the running max is that of the dense walk): one oracle call at
  λ = 0 per problem serves every candidate.
  """
  results = [grad_oracle(*as_f32(*p), jnp.float32(0), causal=causal,
                         block=block, **options) for p in problems]

  def clear(result, threshold):
    skipped = jnp.sum(decision_blocks(result)
                      & (result.block_gap < math.log(threshold)))
    return int(skipped) > 0 and decision_margin(result, threshold) > margin

  for threshold in thresholds:
    if all(clear(result, threshold) for result in results):
      return threshold
  gaps = [np.sort(np.asarray(r.block_gap)[np.asarray(decision_blocks(r))])
          for r in results]
  raise AssertionError(f"No λ in {thresholds} skips a block with every gap "
                       f"{margin} away from log λ; gaps: {gaps}")


def fd_step_bound(q, k, eps: float) -> float:
  """How far a finite-difference step (q, k) ± eps·(t_q, t_k), t standard
  normal, can move a block gap: per score |Δs| <= sm_scale·eps·(|t_q||k| +
  |q||t_k| + eps|t_q||t_k|) with |t| <= 2·sqrt(head_dim) per row (|t|
  concentrates at sqrt(head_dim)); a gap is a difference of two maxima."""
  d = q.shape[-1]
  t = 2.0 * math.sqrt(d)
  q_norm = float(jnp.max(jnp.linalg.norm(q, axis=-1)))
  k_norm = float(jnp.max(jnp.linalg.norm(k, axis=-1)))
  return 2.0 * d ** -0.5 * eps * (t * k_norm + q_norm * t + eps * t * t)


def assert_grads_close(got, want, *, dtype, rtol, atol_scale,
                       names=("dq", "dk", "dv")):
  """Each gradient, of `dtype` and the shape of `want`, equals `want` up to
  rtol, with atol relative to its largest entry, and holds no NaN."""
  for g, w, name in zip(got, want, names):
    assert g.shape == w.shape and g.dtype == dtype, name
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert not np.isnan(g).any(), f"NaN in {name}"
    scale = max(float(np.max(np.abs(w))), 1e-6)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * scale,
                               err_msg=name)


def relative_difference(a, b) -> float:
  """max over (dq, dk, dv) of max|a - b| / max|b|."""
  return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
             for x, y in zip(as_f32(*a), as_f32(*b)))


def random_block_mask(key, shape, block, density=0.75):
  nq, nk = -(-shape.q_len // block), -(-shape.kv_len // block)
  return jax.random.bernoulli(key, density,
                              (shape.batch, shape.q_heads, nq, nk))


class GradientTestBase(SuiteBase):
  """The gradient suite; subclasses set `implementation` and what it
  takes."""

  dtype = jnp.float32
  # The square tiles (block_q = block_kv) of every call and of the oracle.
  block: int = 16
  # Finite differences: no mask, and causal with ragged lengths.
  fd_shapes: tuple[testing.AttentionShape, ...] = testing.GRADIENT_FD_SHAPES
  # Comparisons with other gradients (four q heads; three q tiles or more),
  # and those of them that skip under the causal mask (None: `shape`; causal
  # tiles skip only blocks between the sink and their local window, which
  # takes more tiles).
  shape: testing.AttentionShape = testing.GRADIENT_TEST_SHAPE
  causal_shape: testing.AttentionShape | None = None
  # jit / checkpoint / vmap (None: the first of `fd_shapes`).
  compose_shape: testing.AttentionShape | None = None
  train_shape: testing.AttentionShape = testing.GRADIENT_TRAIN_SHAPE
  # Adam moves every weight by about this much: small enough that one step
  # goes downhill on `train_shape`'s layer.
  train_learning_rate = 1e-3
  supports_causal = True
  # f32 inputs: finite differences, and the training step's f32 twin (else
  # that twin runs the reference).
  supports_float32 = True
  supports_transforms = True       # jit, checkpoint, vmap
  supports_training_step = True    # a Flax layer's bf16 optimizer step

  def marks_for(self, test_name: str, causal: bool) -> list:
    """pytest marks of one test with or without the causal mask (a case
    left to the compiled kernels: skip)."""
    del test_name, causal
    return []

  def pytest_generate_tests(self, metafunc):
    name = metafunc.function.__name__
    if "causal" in metafunc.fixturenames:
      metafunc.parametrize("causal", [
          pytest.param(c, marks=self.marks_for(name, c), id=str(c))
          for c in ([False, True] if self.supports_causal else [False])])

  def call(self, fn, *args, **kwargs):
    """`attention_call` or `attention_vjp` of this implementation and
    tiles, between the race checks."""
    self.before_call()
    out = jax.block_until_ready(fn(
        *args, implementation=self.implementation, block=self.block,
        interpret=self.interpret, **kwargs))
    self.check_call()
    return out

  def attention(self, q, k, v, **kwargs):
    return bj.attention(q, k, v, implementation=self.implementation,
                        block_q=self.block, block_kv=self.block,
                        interpret=self.interpret, **kwargs)

  def assert_grads_close(self, got, want, tol=GRAD_TOL):
    rtol, atol_scale = tol[self.dtype]
    assert_grads_close(got, want, dtype=self.dtype, rtol=rtol,
                       atol_scale=atol_scale)

  def shape_for(self, causal: bool) -> testing.AttentionShape:
    return (self.causal_shape or self.shape) if causal else self.shape

  def cotangent(self, key, q):
    return jax.random.normal(key, q.shape).astype(self.dtype)

  # 1. Finite differences, at λ = 0 and at a λ that skips blocks.
  def test_finite_differences(self, causal):
    self.require("supports_float32")
    shape = self.fd_shapes[causal]
    q, k, v = shape.inputs(key_for("grad_fd", causal), **PATTERN)
    kv_lengths = None
    if causal:   # The second sequence is 16 keys shorter.
      kv_lengths = jnp.array([shape.kv_len, shape.kv_len - 16], jnp.int32)
    # The step cannot carry a gap across log λ.
    threshold = clear_threshold((q, k, v), kv_lengths=kv_lengths, causal=causal,
                                margin=fd_step_bound(q, k, FD_EPS),
                                thresholds=FD_THRESHOLDS, block=self.block)
    d_out = jax.random.normal(key_for("grad_fd_cotangent"), q.shape)
    grads = {}
    for lam in (0.0, threshold):
      # λ is traced: both values share one compile.
      call = functools.partial(
          attention_call, threshold=jnp.float32(lam), kv_lengths=kv_lengths,
          causal=causal, implementation=self.implementation, block=self.block,
          interpret=self.interpret)
      fn = lambda q, k, v, call=call: call(q, k, v)[0]
      jtu.check_grads(fn, (q, k, v), order=1, modes=("rev",), eps=FD_EPS,
                      atol=FD_TOL, rtol=FD_TOL)
      skipped = int(jnp.sum(call(q, k, v)[1].skipped_blocks))
      assert skipped > 0 if lam else skipped == 0
      grads[lam] = jax.vjp(fn, q, k, v)[1](d_out)
    # The sparse gradient is not the dense one, far beyond FD_TOL.
    assert relative_difference(grads[threshold], grads[0.0]) > 10 * FD_TOL

  # 2. λ > 0 with kv_lengths and a block mask: the oracle's autodiff.
  def test_sparse_gradients_match_oracle(self, causal):
    shape = self.shape_for(causal)
    key = key_for("grad_oracle", causal)
    q, k, v = shape.inputs(key, dtype=self.dtype, **PATTERN)
    d_out = self.cotangent(jax.random.fold_in(key, 2), q)
    block_mask = random_block_mask(jax.random.fold_in(key, 1), shape,
                                   self.block)
    kv_lengths = jnp.array([shape.kv_len, 50], jnp.int32)
    masks = dict(kv_lengths=kv_lengths, block_mask=block_mask)
    threshold = clear_threshold((q, k, v), causal=causal, block=self.block,
                                **masks)
    lam = jnp.float32(threshold)
    out, grads, stats = self.call(attention_vjp, q, k, v, d_out, lam,
                                  causal=causal, **masks)
    f32 = as_f32(q, k, v)
    expected = grad_oracle(*f32, lam, causal=causal, block=self.block,
                           **masks)
    assert int(jnp.sum(expected.stats.skipped_blocks)) > 0, "nothing skipped"
    np.testing.assert_array_equal(stats.skipped_blocks,
                                  expected.stats.skipped_blocks)
    testing.assert_close(out, expected.out, self.dtype)
    want = grad_oracle_vjp(*f32, *as_f32(d_out), lam, causal=causal,
                           block=self.block, **masks)
    self.assert_grads_close(grads, want)
    # Keys past a sequence's length get no gradient.
    for g in grads[1:]:
      np.testing.assert_array_equal(np.asarray(g[1, 50:], np.float32), 0.0)
    # Skipping changed the gradient (well beyond the tolerance above).
    dense = grad_oracle_vjp(*f32, *as_f32(d_out), jnp.float32(0),
                            causal=causal, block=self.block, **masks)
    assert relative_difference(want, dense) > max(
        1e-2, 2 * sum(GRAD_TOL[self.dtype]))

  # 3. Dense: jax.nn.dot_product_attention's gradients (GQA, odd lengths).
  def test_dense_gradients_match_jax(self, causal):
    key = key_for("grad_dense", causal)
    q, k, v = self.shape.inputs(key, dtype=self.dtype, sharpness=(4.0, 10.0),
                                window=8)
    d_out = self.cotangent(jax.random.fold_in(key, 1), q)
    out, grads, stats = self.call(attention_vjp, q, k, v, d_out,
                                  causal=causal)
    assert int(jnp.sum(stats.skipped_blocks)) == 0
    want_out, want_vjp = jax.jit(lambda q, k, v: jax.vjp(functools.partial(
        jax.nn.dot_product_attention, is_causal=causal), q, k, v))(
            *as_f32(q, k, v))
    testing.assert_close(out, want_out, self.dtype)
    self.assert_grads_close(grads, want_vjp(*as_f32(d_out)))

  # 4. Composition with jit, checkpoint and vmap.
  def test_jit_checkpoint_and_vmap_match_plain(self):
    self.require("supports_transforms")
    shape = self.compose_shape or self.fd_shapes[0]
    key = key_for("grad_compose")
    problems = [shape.inputs(jax.random.fold_in(key, i), dtype=self.dtype,
                             **PATTERN) for i in range(2)]
    # Clear decisions in both problems: jit, remat and vmap may round the
    # scores differently.
    threshold = clear_threshold(*problems, causal=False, block=self.block)
    w = jax.random.normal(jax.random.fold_in(key, 2), problems[0][0].shape)

    def attn(q, k, v):
      return self.attention(q, k, v, threshold=threshold)

    def loss(q, k, v, attn=attn):
      return jnp.sum(jnp.sin(attn(q, k, v)) * w)

    grad_fn = jax.grad(loss, argnums=(0, 1, 2))
    self.before_call()
    plain = grad_fn(*problems[0])   # no transformation
    jit_grad = jax.jit(grad_fn)
    jitted = [jit_grad(*args) for args in problems]
    self.assert_grads_close(jitted[0], plain, TRANSFORM_TOL)
    remat = jax.jit(jax.grad(
        lambda q, k, v: loss(q, k, v, attn=jax.checkpoint(attn)),
        argnums=(0, 1, 2)))(*problems[0])
    self.assert_grads_close(remat, plain, TRANSFORM_TOL)
    # vmap over a leading axis holding the two problems, against a loop.
    stacked = [jnp.stack(x) for x in zip(*problems)]
    batched = jax.block_until_ready(jax.jit(jax.vmap(grad_fn))(*stacked))
    self.check_call()
    expected = [jnp.stack(g) for g in zip(*jitted)]
    self.assert_grads_close(batched, expected, TRANSFORM_TOL)
    # The two problems have different gradients (the map is not a copy).
    assert relative_difference(*jitted) > 1e-2

  # 5. One bf16 training step with skipping.
  def test_bf16_training_step(self):
    self.require("supports_training_step")
    from flax import nnx  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from blasst_jax import nn as bjnn  # pylint: disable=g-import-not-at-top
    shape = self.train_shape
    b, t, hq, hkv, d = (shape.batch, shape.q_len, shape.q_heads,
                        shape.kv_heads, shape.head_dim)
    key = key_for("grad_train")
    # x holds sink + local-window q, k, v side by side and the projections
    # start near selectors, so that the scores have a trained model's
    # structure (at random init nothing would be skipped).
    q, k, v = shape.inputs(key, **PATTERN)
    x = jnp.concatenate([a.reshape(b, t, -1) for a in (q, k, v)], axis=-1)
    target = jax.random.normal(jax.random.fold_in(key, 1), x.shape)

    def layer(dtype, implementation=self.implementation):
      return bjnn.SkipSelfAttention(
          hq, x.shape[-1], num_kv_heads=hkv, head_dim=d, threshold=0.2,
          causal=True, implementation=implementation, block_q=self.block,
          block_kv=self.block, interpret=self.interpret, dtype=dtype,
          rngs=nnx.Rngs(0))

    def loss_fn(graphdef, params):
      layer = nnx.merge(graphdef, params)
      y, stats = layer(x, return_stats=True)
      return jnp.mean((y.astype(jnp.float32) - target) ** 2), stats

    model = layer(jnp.bfloat16)
    offsets = np.cumsum([0, hq * d, hkv * d, hkv * d])
    for i, proj in enumerate((model.q_proj, model.k_proj, model.v_proj)):
      select = jnp.eye(x.shape[-1])[:, offsets[i]:offsets[i + 1]]
      proj.kernel[...] = select + 0.01 * proj.kernel[...]
    graphdef, params = nnx.split(model)
    tx = optax.adamw(self.train_learning_rate)

    @jax.jit
    def train_step(params, opt_state):
      (loss, stats), grads = jax.value_and_grad(loss_fn, argnums=1,
                                                has_aux=True)(graphdef, params)
      updates, opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      return new_params, loss, stats, grads, loss_fn(graphdef, new_params)[0]

    self.before_call()
    new_params, loss, stats, grads, new_loss = jax.block_until_ready(
        train_step(params, tx.init(params)))
    self.check_call()
    assert np.isfinite(float(loss)) and np.isfinite(float(new_loss))
    assert int(jnp.sum(stats.skipped_blocks)) > 0, "nothing skipped"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      name = jax.tree_util.keystr(path)
      assert g.dtype == jnp.float32, name
      assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient {name}"
      assert float(jnp.max(jnp.abs(g))) > 0, f"zero gradient {name}"
    for old, new in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
      assert not np.array_equal(np.asarray(old), np.asarray(new))
    assert float(new_loss) < float(loss)   # the step goes downhill
    # bf16 gradients point where f32 ones do (same params, f32 compute; on
    # the reference where the implementation takes no f32).
    twin = self.implementation if self.supports_float32 else "reference"
    graphdef32, _ = nnx.split(nnx.eval_shape(lambda: layer(jnp.float32,
                                                           twin)))
    grads32 = jax.jit(jax.grad(lambda p: loss_fn(graphdef32, p)[0]))(params)
    for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
      g, g32 = g.ravel(), g32.ravel()
      cosine = jnp.dot(g, g32) / (jnp.linalg.norm(g) * jnp.linalg.norm(g32))
      assert float(cosine) > 0.98

  # 6. Rows that see no key: zero output and gradient, never NaN.
  def test_rows_without_keys_have_zero_gradient(self):
    self.require("supports_causal")
    shape, block = self.shape_for(True), self.block
    key = key_for("grad_empty", 1)
    q, k, v = shape.inputs(key, dtype=self.dtype, **PATTERN)
    d_out = self.cotangent(jax.random.fold_in(key, 2), q)
    # The second sequence has no keys at all. In the first, causal tile 0
    # sees only kv block 0 and the mask drops it; head 3 drops all of tile 2.
    kv_lengths = jnp.array([shape.kv_len, 0], jnp.int32)
    block_mask = random_block_mask(jax.random.fold_in(key, 1), shape, block)
    block_mask = block_mask.at[0, :, 0, 0].set(False).at[0, 3, 2].set(False)
    masks = dict(kv_lengths=kv_lengths, block_mask=block_mask)
    threshold = jnp.float32(clear_threshold((q, k, v), causal=True,
                                            block=block, **masks))
    out, grads, stats = self.call(attention_vjp, q, k, v, d_out, threshold,
                                  causal=True, **masks)
    assert int(jnp.sum(stats.skipped_blocks[0])) > 0
    assert int(jnp.sum(stats.visited_blocks[1])) == 0
    out, f32_grads = as_f32(out)[0], as_f32(*grads)
    for x in (out,) + f32_grads:
      assert not np.isnan(np.asarray(x)).any()
    for x in (out,) + f32_grads:
      np.testing.assert_array_equal(x[1], 0.0)
    dq = f32_grads[0]
    for rows, heads in ((slice(0, block), slice(None)),
                        (slice(2 * block, 3 * block), 3)):
      np.testing.assert_array_equal(out[0, rows, heads], 0.0)
      np.testing.assert_array_equal(dq[0, rows, heads], 0.0)
    assert float(jnp.max(jnp.abs(dq[0, block:2 * block]))) > 0
    self.assert_grads_close(grads, grad_oracle_vjp(
        *as_f32(q, k, v, d_out), threshold, causal=True, block=block,
        **masks))

  # 7. Garbage past a sequence's length (NaN in K and V) reaches no
  # gradient: 0-weight · NaN would, in dS · K and dO · Vᵀ.
  def test_nan_past_the_length_reaches_no_gradient(self):
    shape = self.shape
    key = key_for("grad_nan")
    q, k, v = shape.inputs(key, dtype=self.dtype, **PATTERN)
    d_out = self.cotangent(jax.random.fold_in(key, 2), q)
    # Ends inside a block, so that block holds keys on both sides.
    kv_lengths = jnp.array([shape.kv_len, self.block + 7], jnp.int32)
    past = (jnp.arange(shape.kv_len)[None, :] >=
            kv_lengths[:, None])[:, :, None, None]
    k_nan = jnp.where(past, jnp.nan, k).astype(self.dtype)
    v_nan = jnp.where(past, jnp.nan, v).astype(self.dtype)
    threshold = jnp.float32(clear_threshold(
        (q, k, v), causal=False, block=self.block, kv_lengths=kv_lengths))
    out, grads, _ = self.call(attention_vjp, q, k_nan, v_nan, d_out,
                              threshold, causal=False, kv_lengths=kv_lengths)
    out, f32_grads = as_f32(out)[0], as_f32(*grads)
    for x in (out,) + f32_grads:
      assert not np.isnan(np.asarray(x)).any()
    for x in f32_grads[1:]:   # dK, dV of the keys past the length
      np.testing.assert_array_equal(jnp.where(past, x, 0.0), 0.0)
    self.assert_grads_close(grads, grad_oracle_vjp(
        *as_f32(q, k, v, d_out), threshold, causal=False, block=self.block,
        kv_lengths=kv_lengths))


class WideGradientTestBase(GradientTestBase):
  """The suite in bf16 on 64 x 64 tiles, the Hopper kernels' wgmma tiles
  (and compiled kernels')."""

  dtype = jnp.bfloat16
  block = 64
  shape = testing.GRADIENT_WIDE_TEST_SHAPE
  causal_shape = testing.GRADIENT_WIDE_CAUSAL_SHAPE
  compose_shape = testing.GRADIENT_WIDE_TEST_SHAPE
  train_shape = testing.GRADIENT_WIDE_TRAIN_SHAPE
  train_learning_rate = 1e-4   # 512 features a token: smaller steps
  # Finite differences need f32 inputs (they run on 16 x 16 tiles, CPU);
  # the training step's f32 twin runs on the reference.
  supports_float32 = False
