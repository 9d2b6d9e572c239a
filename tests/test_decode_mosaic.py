"""The Mosaic GPU decode kernel on CPU: the shared decode suite in Pallas' GPU
interpret mode with race detection, the other ring shapes, what it refuses,
and its CUDA lowering."""

import functools

import jax
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import testing
from blasst_jax.kernels import decode_mosaic
from blasst_jax.ops.decode import base as decode_base
from tests import test_base


class TestMosaicDecodeInterpret(test_base.RaceChecked,
                                test_base.DecodeTestBase):
  """Race-checked: every call fails on a shared-memory data race. The
  splits' partials merged by XLA: the interpreter runs the grid in order
  without relating one program's clock to the next, so a merge that reads
  other programs' partials (the default, `TestMosaicDecodeMergeInterpret`)
  is reported as racing with their writes."""

  implementation = "pallas_mosaic"
  kernel_config = decode_mosaic.MosaicDecodeConfig(merge_in_kernel=False)
  shapes = testing.MOSAIC_DECODE_CPU_TEST_SHAPES
  dtype = jnp.bfloat16
  block_kv = 64
  max_modes = ("split", "anchored")
  split_counts = (2,)
  low_precision_dtypes = (jnp.float16,)
  supports_initial_max = True
  bytes_match_reference = True

  fp8_shapes = testing.DECODE_FP8_TEST_SHAPES + (
      testing.MOSAIC_DECODE_CPU_TEST_SHAPES[1],)


class TestMosaicDecodeMergeInterpret(test_base.DecodeTestBase):
  """The default build, which merges its splits in the kernel, on the
  suite's first shape, anchored, 3 splits (one split, race-checked, and
  the 64-row build: `test_in_kernel_merge_matches_oracle`)."""

  implementation = "pallas_mosaic"
  interpret = True
  shapes = testing.MOSAIC_DECODE_CPU_TEST_SHAPES[:1]
  dtype = jnp.bfloat16
  block_kv = 64
  max_modes = ("anchored",)
  split_counts = (3,)
  low_precision_dtypes = (jnp.float16,)
  supports_initial_max = True
  bytes_match_reference = True


def run_race_checked(q, k_pages, v_pages, table, kv_lengths, threshold,
                     *scales, num_splits, max_mode, config=None,
                     merged=False, detect_races=True):
  """The kernel's partials (`merged`: its merged outputs) in interpret
  mode, and whether the race detector (if on) found a race."""
  b, hq, d = q.shape
  hkv = k_pages.shape[2]
  lam = jnp.full((b,), threshold, jnp.float32)
  interpret_pallas_call.reset_gpu_interpret_mode_state()
  kernel = (decode_mosaic.decode_merged if merged
            else decode_mosaic.decode_partials)
  partials = kernel(
      q.reshape(b, hkv, hq // hkv, d), k_pages, v_pages, table, kv_lengths,
      config_lib.log_threshold(lam), *scales, group=hq // hkv,
      sm_scale=d ** -0.5,
      num_splits=num_splits, max_mode=max_mode,
      config=config or decode_mosaic.MosaicDecodeConfig(),
      interpret=plgpu.InterpretGPUParams(detect_races=detect_races),
      skip_enabled=threshold > 0)
  partials = jax.block_until_ready(partials)
  return partials, interpret_pallas_call.get_races().races_found


def assert_partials_match_oracle(partials, q, k, v, kv_lengths, threshold,
                                 *, num_splits, max_mode, group,
                                 dtype=jnp.bfloat16, block_kv=64):
  """Partials merged by `decode.merge_partials`: outputs, visited and
  skipped counts as the oracle's on the contiguous cache."""
  acc, m, l, skipped, visited = partials
  out = bj.decode.merge_partials(acc, m, l)[:, :, :group].reshape(q.shape)
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, kv_lengths, block_kv=block_kv, threshold=threshold,
      num_splits=num_splits, max_mode=max_mode)
  testing.assert_close(out, oracle.out, dtype)
  np.testing.assert_array_equal(
      np.asarray(visited.sum(-1)), np.asarray(jnp.sum(oracle.visited_mask, -1)))
  testing.assert_skips_match(skipped.sum(-1), oracle, threshold, dtype)


def test_one_part_a_split_is_race_free_and_matches_oracle():
  """`merge_warpgroups`: warpgroup 0 joins warpgroup 1's partial (handed
  over in shared memory, race-checked) and writes one part a split."""
  q, k, v = testing.DecodeShape(
      batch=2, q_heads=8, kv_heads=2, max_len=384, head_dim=64).inputs(
          testing.key_for("decode_mosaic_parts"), dtype=jnp.bfloat16)
  kv_lengths = jnp.array([384, 161], jnp.int32)
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  partials, races = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, 1e-2, num_splits=3,
      max_mode="split", config=decode_mosaic.MosaicDecodeConfig(
          compute_wgs=2, k_stages=2, v_stages=4, merge_warpgroups=True))
  assert not races, "the race detector found a shared-memory data race"
  assert partials[0].shape[2] == 3, "one part a split"
  assert_partials_match_oracle(partials, q, k, v, kv_lengths, 1e-2,
                               num_splits=3, max_mode="split", group=4)
  assert int(jnp.sum(partials[3])) > 0


# The suite runs the default build (transposed, the compute warpgroups
# copying V; at head_dim 64 with 64-key pages, one of them); these are the
# two-warpgroup shapes of it, the 64-row build and the memory warpgroup's
# V copies.
# stages: MosaicDecodeConfig's (k_stages, v_stages, compute_wgs,
# split_registers, one_barrier_vote, transposed, merge_in_kernel,
# compute_issues_v).
@pytest.mark.parametrize("max_mode,num_splits,kv_heads,threshold,stages", [
    # The compute warpgroups copy V at the decision (V slots >= twice the
    # warpgroups): MQA 8/1 with more V than K slots, one warpgroup, one
    # with an odd V ring, 64 rows deciding by the warp vote.
    ("split", 3, 1, 1e-2, (2, 4, 2)),
    ("anchored", 2, 2, 1e-2, (4, 2, 1)),
    ("split", 1, 1, 1e-2, (2, 3, 1)),
    ("anchored", 2, 2, 1e-2, (4, 4, 2, False, True, False)),
    # After accumulating the slot's block (as many V slots as warpgroups):
    # dense with one split; 64 rows deciding by the max reduction.
    ("anchored", 1, 2, 0.0, (4, 2, 2)),
    ("split", 2, 2, 1e-2, (2, 2, 2, False, False, False)),
    # Three warpgroups: the anchors on warpgroups 1 and 2, the running max
    # handed round; V at the decision, and after accumulating (3 V slots).
    ("anchored", 2, 2, 1e-2, (6, 6, 3)),
    ("split", 3, 1, 1e-2, (3, 3, 3)),
    # The memory warpgroup copies V as it reads the decisions: transposed
    # (two and three warpgroups), the 64-row build, dense with one.
    ("anchored", 2, 2, 1e-2, (2, 2, 2, False, True, True, False, False)),
    ("anchored", 2, 2, 1e-2, (3, 3, 3, False, True, True, False, False)),
    ("split", 3, 1, 1e-2, (2, 4, 2, False, True, False, False, False)),
    ("anchored", 1, 2, 0.0, (4, 2, 1, False, True, True, False, False))])
def test_race_checked_kernel_matches_oracle(max_mode, num_splits, kv_heads,
                                            threshold, stages):
  dtype = jnp.bfloat16
  q, k, v = testing.DecodeShape(
      batch=2, q_heads=8, kv_heads=kv_heads, max_len=384, head_dim=64).inputs(
          testing.key_for("decode_mosaic", max_mode, kv_heads), dtype=dtype)
  # Ragged lengths: past them the pages hold NaN, which must not leak.
  kv_lengths = jnp.array([384, 161], jnp.int32)
  k = k.at[1, 161:].set(jnp.nan)
  v = v.at[1, 161:].set(jnp.nan)
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  partials, races = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, threshold, num_splits=num_splits,
      max_mode=max_mode,
      config=decode_mosaic.MosaicDecodeConfig(*stages))
  assert not races, "the race detector found a shared-memory data race"
  assert_partials_match_oracle(
      partials, q, k, v, kv_lengths, threshold, num_splits=num_splits,
      max_mode=max_mode, group=8 // kv_heads)
  skipped = partials[3]
  if threshold > 0:
    assert int(jnp.sum(skipped)) > 0, "inputs meant to skip did not"
  else:
    assert int(jnp.sum(skipped)) == 0


# Options that change when things happen, not the arithmetic: (max_mode,
# the build both runs share, the option). Block maxima handed between two
# warpgroups, transposed and 64 rows; blocks decided two ahead, two
# warpgroups with six V slots and one with three.
@pytest.mark.parametrize("max_mode,build,option", [
    ("anchored", dict(k_stages=2, v_stages=4, compute_wgs=2),
     dict(hand_over_block_max=True)),
    ("split", dict(k_stages=2, v_stages=4, compute_wgs=2, transposed=False),
     dict(hand_over_block_max=True)),
    ("anchored", dict(k_stages=2, v_stages=6, compute_wgs=2),
     dict(decide_ahead=2)),
    ("split", dict(k_stages=4, compute_wgs=1), dict(decide_ahead=2))])
def test_schedule_options_give_the_same_partials(max_mode, build, option):
  """Bit for bit the partials of the build without the option, over 8
  blocks (and 2 anchors: the six hand-over slots reused) a split, ragged
  lengths past which the pages hold NaN, race-checked."""
  q, k, v = testing.DecodeShape(
      batch=2, q_heads=8, kv_heads=2, max_len=512, head_dim=64).inputs(
          testing.key_for("decode_mosaic_schedule", max_mode, str(option)),
          dtype=jnp.bfloat16)
  kv_lengths = jnp.array([512, 371], jnp.int32)
  k = k.at[1, 371:].set(jnp.nan)
  v = v.at[1, 371:].set(jnp.nan)
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  runs = []
  for config in (build, {**build, **option}):
    partials, races = run_race_checked(
        q, pool_k, pool_v, table, kv_lengths, 1e-2, num_splits=1,
        max_mode=max_mode, config=decode_mosaic.MosaicDecodeConfig(
            merge_in_kernel=False, **config))
    assert not races, "the race detector found a shared-memory data race"
    runs.append(partials)
  (acc, m, l, skipped, visited), want = runs[1], runs[0]
  assert 0 < int(jnp.sum(skipped)) < int(jnp.sum(visited))
  for got, ref in zip((acc[..., :4, :], m[..., :4], l[..., :4], skipped,
                       visited),
                      (want[0][..., :4, :], want[1][..., :4],
                       want[2][..., :4], want[3], want[4])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_decide_ahead_merges_short_splits_in_the_kernel():
  """Two blocks decided ahead where a warpgroup has fewer than two blocks
  (or none: an empty sequence), 3 splits merged in the kernel."""
  q, k, v = testing.DecodeShape(
      batch=3, q_heads=8, kv_heads=2, max_len=384, head_dim=64).inputs(
          testing.key_for("decode_mosaic_ahead_short"), dtype=jnp.bfloat16)
  kv_lengths = jnp.array([100, 0, 200], jnp.int32)
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  (out, _, _, skipped, visited), _ = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, 1e-2, num_splits=3,
      max_mode="anchored", merged=True, detect_races=False,
      config=decode_mosaic.MosaicDecodeConfig(k_stages=2, v_stages=6,
                                              decide_ahead=2))
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, kv_lengths, block_kv=64, threshold=1e-2, num_splits=3,
      max_mode="anchored")
  testing.assert_close(out, oracle.out, jnp.bfloat16)
  assert not bool(jnp.any(out[1]))
  np.testing.assert_array_equal(
      np.asarray(visited), np.asarray(jnp.sum(oracle.visited_mask, -1)))
  testing.assert_skips_match(skipped, oracle, 1e-2, jnp.bfloat16)


# bf16 and FP8 at head_dim 64 (FP8: three compute warpgroups), and FP8 at
# 128 on three, whose K pages are widened in registers 64 keys at a time.
@pytest.mark.parametrize("fp8,head_dim,wgs", [(False, 64, None),
                                              (True, 64, None), (True, 128, 3)])
def test_pages_of_128_keys_ending_in_either_half(fp8, head_dim, wgs):
  """Pages of 128 keys are widened (FP8) and cleared past the length 64
  keys at a time (`WIDEN_KEYS`): lengths ending in a page's first and in
  its second half, NaN past them, race-checked against the oracle (on the
  dequantized cache for FP8). Dense: every block's V is accumulated."""
  shape = testing.DecodeShape(batch=2, q_heads=8, kv_heads=2, max_len=384,
                              head_dim=head_dim)
  key = testing.key_for("decode_mosaic_p128", fp8)
  kv_lengths = jnp.array([128 + 30, 256 + 100], jnp.int32)
  if fp8:
    cache = testing.fp8_cache(key, shape)
    q, k, v = cache.q, cache.k8, cache.v8
    scales = (cache.k_scale, cache.v_scale)
  else:
    (q, k, v), scales = shape.inputs(key, dtype=jnp.bfloat16), ()
  for i, n in enumerate((128 + 30, 256 + 100)):
    k = k.at[i, n:].set(jnp.nan)
    v = v.at[i, n:].set(jnp.nan)
  pool_k, pool_v, table = testing.paged_cache(k, v, 128)
  partials, races = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, 0.0, *scales, num_splits=2,
      max_mode="anchored", config=decode_mosaic.MosaicDecodeConfig(
          merge_in_kernel=False, compute_wgs=wgs))
  assert not races, "the race detector found a shared-memory data race"
  if fp8:   # the NaN-filled pages, dequantized
    k, v = testing.Fp8Cache(q, k, v, *scales).dequantized()
  assert_partials_match_oracle(
      partials, q.astype(k.dtype), k, v, kv_lengths, 0.0, num_splits=2,
      max_mode="anchored", group=4, block_kv=128)


@pytest.mark.parametrize("fp8", [False, True])
def test_heads_first_pages_match_the_oracle(fp8):
  """HND pools ([pages, kv_heads, page_size, d], kv_layout="HND": one TMA
  run a head's page) through `paged_decode_attention`, race-checked: the
  outputs and stats of the oracle on the NHD pool (dequantized for FP8),
  skipping with a page table and two splits (merged by XLA: the
  interpreter cannot race-check the in-kernel merge of several splits)."""
  unmerged = decode_mosaic.MosaicDecodeConfig(merge_in_kernel=False)
  shape = testing.DecodeShape(batch=2, q_heads=8, kv_heads=2, max_len=320,
                              head_dim=64)
  key = testing.key_for("decode_mosaic_hnd", fp8)
  if fp8:
    cache = testing.fp8_cache(key, shape)
    q, k, v = cache.q, cache.k8, cache.v8
    scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)
  else:
    (q, k, v), scales = shape.inputs(key, dtype=jnp.bfloat16), {}
  kv_lengths = jnp.array([320, 200], jnp.int32)
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  options = dict(threshold=1e-2, num_splits=2, max_mode="anchored",
                 return_stats=True, **scales)
  interpret_pallas_call.reset_gpu_interpret_mode_state()
  out, stats = bj.paged_decode_attention(
      q, *(jnp.swapaxes(x, 1, 2) for x in (pool_k, pool_v)), table,
      kv_lengths, kv_layout="HND", implementation="pallas_mosaic",
      interpret=plgpu.InterpretGPUParams(detect_races=True),
      kernel_config=unmerged, **options)
  assert not interpret_pallas_call.get_races().races_found
  oracle, oracle_stats = bj.paged_decode_attention(
      q, pool_k, pool_v, table, kv_lengths, implementation="reference",
      **options)
  assert 0 < float(oracle_stats.total_sparsity) < 1
  testing.assert_close(out, oracle, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(stats.visited_blocks),
                                np.asarray(oracle_stats.visited_blocks))
  np.testing.assert_array_equal(np.asarray(stats.skipped_blocks),
                                np.asarray(oracle_stats.skipped_blocks))
  np.testing.assert_allclose(np.asarray(stats.bytes_read),
                             np.asarray(oracle_stats.bytes_read))


def test_fp8_k_in_registers_matches_the_widened_tile():
  """FP8 K widened in registers (`fp8_k_in_registers`; in interpret mode,
  whose wgmma reads shared memory only, stored to the f16 tile from
  there): the same partials as widening in shared memory, race-checked."""
  shape = testing.DecodeShape(batch=2, q_heads=8, kv_heads=2, max_len=384,
                              head_dim=64)
  cache = testing.fp8_cache(testing.key_for("decode_mosaic_fp8_k"), shape)
  kv_lengths = jnp.array([384, 200], jnp.int32)
  pool_k, pool_v, table = testing.paged_cache(cache.k8, cache.v8, 64)
  runs = []
  for registers in (False, True):
    partials, races = run_race_checked(
        cache.q, pool_k, pool_v, table, kv_lengths, 1e-2, cache.k_scale,
        cache.v_scale, num_splits=2, max_mode="anchored",
        config=decode_mosaic.MosaicDecodeConfig(
            merge_in_kernel=False, fp8_k_in_registers=registers))
    assert not races, "the race detector found a shared-memory data race"
    runs.append(partials)
  assert int(jnp.sum(runs[1][3])) > 0
  for got, want in zip(*runs):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("d,block_kv,group,skip", [
    (64, 128, 3, True), (128, 64, 4, False), (64, 64, 3, True)])
def test_decide_ahead_lowers_for_cuda(d, block_kv, group, skip):
  config = decode_mosaic.MosaicDecodeConfig(decide_ahead=2)
  assert decode_mosaic.blocks_ahead(config, *decode_mosaic.pipeline(
      config, d, block_kv, 0, group=group)[::2]) == 2
  lowered = lower_decode(d, block_kv, group, skip, "anchored", jnp.bfloat16,
                         config=config, contiguous=True)
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,group", [(128, 128, 4), (64, 128, 3),
                                              (256, 64, 8)])
def test_fp8_k_in_registers_lowers_for_cuda(d, block_kv, group):
  lowered = lower_decode(
      d, block_kv, group, True, "anchored", jnp.float8_e4m3fn,
      config=decode_mosaic.MosaicDecodeConfig(fp8_k_in_registers=True))
  assert "mosaic_gpu" in lowered.as_text()


# (num_splits, config, merge ring slots): one split merges its two
# warpgroups' tiles in shared memory (race-checked); more splits stream the
# parts through the ring, one slot so that every part reuses it; two
# warpgroups' partials joined into one part a split (race-checked in
# `test_one_part_a_split_is_race_free_and_matches_oracle`), or a part each.
PAIRED = dict(compute_wgs=2, k_stages=2, v_stages=4)


@pytest.mark.parametrize("num_splits,stages,slots", [
    (1, dict(), None),
    (1, dict(transposed=False), None),
    (3, dict(), 1),
    (3, PAIRED, 1),
    (2, dict(PAIRED, merge_warpgroups=False), 2),
    (2, dict(transposed=False, compute_wgs=1), 1),
    (3, dict(compute_issues_v=False), 1),
    (1, dict(compute_wgs=3), None)])
def test_in_kernel_merge_matches_oracle(monkeypatch, num_splits, stages,
                                        slots):
  if slots is not None:
    monkeypatch.setattr(decode_mosaic, "MERGE_SLOTS", slots)
  dtype = jnp.bfloat16
  q, k, v = testing.DecodeShape(
      batch=2, q_heads=8, kv_heads=2, max_len=384, head_dim=64).inputs(
          testing.key_for("decode_mosaic_merge", num_splits), dtype=dtype)
  kv_lengths = jnp.array([384, 0], jnp.int32)   # an empty sequence: zeros
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  b, hq, _ = q.shape
  # Several splits: the detector reports the merging program's copies of
  # the other programs' partials (global memory), which on a GPU their
  # semaphore orders; interpret mode has no such semaphore (it runs the
  # grid in order, and `pl.get_global` does not lower there).
  race_checked = num_splits == 1
  (out, m, l, skipped, visited), races = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, 1e-2, num_splits=num_splits,
      max_mode="anchored", config=decode_mosaic.MosaicDecodeConfig(**stages),
      merged=True, detect_races=race_checked)
  assert not races, "the race detector found a shared-memory data race"
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, kv_lengths, block_kv=64, threshold=1e-2,
      num_splits=num_splits, max_mode="anchored")
  testing.assert_close(out, oracle.out, dtype)
  assert not bool(jnp.any(out[1]))
  lse = decode_base.lse_from_stats(m, l)[:, :, :4].reshape(b, hq)
  testing.assert_lse_close(lse[0], oracle.lse[0], atol=5e-2, rtol=1e-2)
  assert bool(jnp.all(jnp.isneginf(lse[1])))
  np.testing.assert_array_equal(
      np.asarray(visited), np.asarray(jnp.sum(oracle.visited_mask, -1)))
  testing.assert_skips_match(skipped, oracle, 1e-2, dtype)
  assert int(jnp.sum(skipped)) > 0


# A persistent kernel (`MosaicDecodeConfig.programs`): 3 sequences x 2 KV
# heads x splits of items over fewer programs, race-checked. (programs,
# splits, merged, λ, max mode, config): one program walking every item and
# merging, dense with two warpgroups (whose V ring, under the last item's
# output and merge buffers, must wait for both); programs with a partial
# each, handing block maxima; one split, merged in shared memory; and a
# windowed page table (`TABLE_ROW` 2), split max mode (items split-major,
# the default, in these); items split-minor, merged by one program and as
# partials over programs. (A merge over other
# programs' partials: the GPU tests; interpret mode runs the programs one
# after another and does not order one's writes before another's reads.)
@pytest.mark.parametrize("programs,num_splits,merged,threshold,max_mode,"
                         "stages", [
    (1, 3, True, 0.0, "anchored", dict(compute_wgs=2, k_stages=2,
                                       v_stages=4)),
    (3, 3, False, 1e-2, "anchored", dict(hand_over_block_max=True,
                                         compute_wgs=2, k_stages=2,
                                         v_stages=4)),
    (2, 1, True, 1e-2, "anchored", dict()),
    (4, 3, False, 1e-2, "split", dict(window=True)),
    (1, 3, True, 1e-2, "anchored", dict(split_major=False)),
    (4, 3, False, 1e-2, "anchored", dict(split_major=False))])
def test_persistent_kernel_matches_oracle(monkeypatch, programs, num_splits,
                                          merged, threshold, max_mode,
                                          stages):
  stages = dict(stages)
  if stages.pop("window", False):
    monkeypatch.setattr(decode_mosaic, "TABLE_ROW", 2)
    assert decode_mosaic.table_window(6, num_splits, False)
  dtype = jnp.bfloat16
  q, k, v = testing.DecodeShape(
      batch=3, q_heads=8, kv_heads=2, max_len=384, head_dim=64).inputs(
          testing.key_for("decode_mosaic_persistent", programs, num_splits),
          dtype=dtype)
  kv_lengths = jnp.array([384, 161, 0], jnp.int32)
  k = k.at[1, 161:].set(jnp.nan)   # must not leak
  v = v.at[1, 161:].set(jnp.nan)
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  outs, races = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, threshold,
      num_splits=num_splits, max_mode=max_mode,
      config=decode_mosaic.MosaicDecodeConfig(programs=programs, **stages),
      merged=merged)
  assert not races, "the race detector found a shared-memory data race"
  if not merged:
    assert_partials_match_oracle(
        outs, q, k, v, kv_lengths, threshold, num_splits=num_splits,
        max_mode=max_mode, group=4)
    return
  out, _, _, skipped, visited = outs
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, kv_lengths, block_kv=64, threshold=threshold,
      num_splits=num_splits, max_mode=max_mode)
  testing.assert_close(out, oracle.out, dtype)
  assert not bool(jnp.any(out[2]))
  np.testing.assert_array_equal(
      np.asarray(visited), np.asarray(jnp.sum(oracle.visited_mask, -1)))
  testing.assert_skips_match(skipped, oracle, threshold, dtype)


@pytest.mark.parametrize("split_major", [False, True])
def test_persistent_programs_fit_the_items_and_the_interpreter(split_major):
  """At most the items; in interpret mode, merging in the kernel, the most
  at which every head's other splits run first (earlier programs, or
  earlier rounds of the same one)."""
  programs = functools.partial(decode_mosaic.persistent_programs,
                               split_major=split_major)
  # 6 heads x 3 splits: items split-minor (head 1's are 3, 4, 5) or
  # split-major (head 1's are 1, 7, 13), program p's round r item p + r P.
  assert programs(132, 6, 3, True, interpret=True) == 18
  # 8 or 7 programs put some head's last split on a program below another
  # split's (split-minor head 2 over programs 6, 7, 0; split-major head 0
  # over 0, 6, 4); 6 do not (a head a program, split-major).
  assert programs(8, 6, 3, True, interpret=True) == 6
  # Split-minor 2: head 0 over programs 0, 1, 0; split-major: 0, 0, 0.
  assert programs(2, 6, 3, True, interpret=True) == (2 if split_major
                                                     else 1)
  assert programs(7, 6, 3, False, interpret=True) == 7
  assert programs(7, 12, 1, True, interpret=True) == 7
  assert programs(132, 6, 3, True, interpret=False) == 18
  # The order itself: every split of a head once, the last split last.
  items = [decode_mosaic.item_coords(t, 6, 3, split_major)
           for t in range(18)]
  assert sorted(items) == [(h, s) for h in range(6) for s in range(3)]
  assert items[:3] == ([(0, 0), (1, 0), (2, 0)] if split_major
                       else [(0, 0), (0, 1), (0, 2)])


@pytest.mark.parametrize("max_mode,threshold,num_splits,stages", [
    ("anchored", 1e-2, 3, dict()),
    ("anchored", 1e-2, 3, dict(compute_wgs=2, k_stages=2, v_stages=4)),
    ("split", 1e-2, 2, dict()),
    ("anchored", 0.0, 3, dict())])
def test_splits_hold_a_window_of_the_page_table(monkeypatch, max_mode,
                                                threshold, num_splits,
                                                stages):
  """Each program holds the table rows of its split's blocks (and of the
  two anchor blocks), wherever the split starts, ragged lengths and an
  empty split included: rows of 4 pages here, so 24 pages a sequence
  (6 rows) already window."""
  monkeypatch.setattr(decode_mosaic, "TABLE_ROW", 4)
  anchors = max_mode == "anchored" and threshold > 0
  window = decode_mosaic.table_window(24, num_splits, anchors)
  assert 0 < window and window + 2 * anchors < 6
  dtype = jnp.bfloat16
  q, k, v = testing.DecodeShape(
      batch=3, q_heads=4, kv_heads=1, max_len=24 * 64, head_dim=64).inputs(
          testing.key_for("decode_mosaic_window", max_mode, num_splits),
          dtype=dtype)
  kv_lengths = jnp.array([24 * 64, 700, 90], jnp.int32)
  for i, n in enumerate((700, 90)):   # NaN past the lengths must not leak
    k = k.at[i + 1, n:].set(jnp.nan)
    v = v.at[i + 1, n:].set(jnp.nan)
  pool_k, pool_v, table = testing.paged_cache(k, v, 64)
  partials, races = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, threshold,
      num_splits=num_splits, max_mode=max_mode,
      config=decode_mosaic.MosaicDecodeConfig(**stages))
  assert not races, "the race detector found a shared-memory data race"
  assert_partials_match_oracle(
      partials, q, k, v, kv_lengths, threshold, num_splits=num_splits,
      max_mode=max_mode, group=4)


@pytest.mark.parametrize("skip,max_mode", [(True, "anchored"),
                                           (True, "split"),
                                           (False, "anchored")])
def test_windowed_page_table_lowers_for_cuda(skip, max_mode):
  assert decode_mosaic.table_window(4096, 4, skip and max_mode == "anchored")
  lowered = lower_decode(128, 128, 4, skip, max_mode, jnp.bfloat16,
                         per_seq=4096)
  assert "mosaic_gpu" in lowered.as_text()


def test_long_paged_caches_keep_the_contiguous_pipeline():
  """At 512k keys in pages of 128 a whole table takes 16 KiB (two of four
  V slots); the default 16 splits' windows hold 11 rows of it."""
  config = decode_mosaic.MosaicDecodeConfig()
  window = decode_mosaic.table_window(4096, 16, anchors=True)
  held = decode_mosaic.held_table_pages(
      4096, window, anchor_rows=decode_mosaic.ANCHOR_TABLE_ROWS)
  assert (window, held) == (9, 11 * decode_mosaic.TABLE_ROW)
  # Without a window a program holds the whole table.
  assert decode_mosaic.held_table_pages(4096, 0, 0) == 4096
  assert decode_mosaic.pipeline(config, 128, 128, held, group=4) == (
      decode_mosaic.pipeline(config, 128, 128, 0, group=4))
  # Few splits: a window would hold the whole table anyway.
  assert decode_mosaic.table_window(64, 1, anchors=True) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_mode="global"), "max_mode"),
    (dict(block_kv=32), "multiple of 64"),
    (dict(dtype=jnp.float32), "bf16/f16")])
def test_unsupported_inputs_name_the_fix(kwargs, match):
  dtype = kwargs.pop("dtype", jnp.bfloat16)
  q = jnp.zeros((2, 4, 64), dtype)
  cache = jnp.zeros((2, 128, 1, 64), dtype)
  with pytest.raises(ValueError, match=match):
    bj.decode_attention(q, cache, cache, jnp.array([128, 5]),
                        implementation="pallas_mosaic", threshold=1e-2,
                        **{"block_kv": 64, **kwargs})


def test_config_rejects_what_cannot_run():
  with pytest.raises(ValueError, match="k_stages"):
    decode_mosaic.MosaicDecodeConfig(k_stages=1)
  with pytest.raises(ValueError, match="v_stages"):
    decode_mosaic.MosaicDecodeConfig(v_stages="2")
  for bad in (4, 0, True):
    with pytest.raises(ValueError, match="compute_wgs"):
      decode_mosaic.MosaicDecodeConfig(compute_wgs=bad)
  with pytest.raises(ValueError, match="transposed=True"):
    decode_mosaic.MosaicDecodeConfig(compute_wgs=3, transposed=False)
  with pytest.raises(ValueError, match="multiple"):
    decode_mosaic.MosaicDecodeConfig(v_stages=3, compute_wgs=2)
  with pytest.raises(ValueError, match="multiple"):
    decode_mosaic.MosaicDecodeConfig(k_stages=4, compute_wgs=3)
  with pytest.raises(ValueError, match="one_barrier_vote"):
    decode_mosaic.MosaicDecodeConfig(one_barrier_vote=1)
  with pytest.raises(ValueError, match="transposed"):
    decode_mosaic.MosaicDecodeConfig(transposed=None)
  with pytest.raises(ValueError, match="compute_issues_v"):
    decode_mosaic.MosaicDecodeConfig(compute_issues_v="yes")
  with pytest.raises(ValueError, match="hand_over_block_max"):
    decode_mosaic.MosaicDecodeConfig(hand_over_block_max=None)
  with pytest.raises(ValueError, match="auto_barriers"):
    decode_mosaic.MosaicDecodeConfig(auto_barriers=0)
  with pytest.raises(ValueError, match="compute_issues_v=True"):
    decode_mosaic.MosaicDecodeConfig(auto_barriers=False,
                                     compute_issues_v=False)
  for bad in (0, 3, True):
    with pytest.raises(ValueError, match="decide_ahead"):
      decode_mosaic.MosaicDecodeConfig(decide_ahead=bad)
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="programs"):
      decode_mosaic.MosaicDecodeConfig(programs=bad)
  for build in (dict(transposed=False), dict(compute_issues_v=False)):
    with pytest.raises(ValueError, match="persistent"):
      decode_mosaic.MosaicDecodeConfig(programs=132, **build)
  with pytest.raises(ValueError, match="split_major"):
    decode_mosaic.MosaicDecodeConfig(programs=8, split_major=1)


@pytest.mark.parametrize("d,block_kv,fp8,transposed,wgs", [
    (128, 128, False, False, 1),   # three warpgroups would spill
    (128, 64, False, False, 2), (64, 128, False, False, 2),
    (64, 128, True, False, 2), (256, 64, False, False, 1),
    # Transposed, registers are no limit: two wherever shared memory fits
    # and a page holds >= 8192 elements.
    (128, 128, False, True, 2), (256, 64, False, True, 2),
    # Three at head_dim 64: FP8 pages of 64 and 128 keys, bf16 of 64.
    (64, 64, False, True, 3), (64, 64, True, True, 3),
    (64, 128, True, True, 3), (64, 128, False, True, 2),
    (128, 128, True, True, 2),
    (256, 128, True, True, 1)])   # two widened f16 tiles would not fit
def test_default_pipeline_fits_registers_and_shared_memory(d, block_kv, fp8,
                                                           transposed, wgs):
  config = decode_mosaic.MosaicDecodeConfig(transposed=transposed)
  n_wgs, k_stages, v_stages = decode_mosaic.pipeline(config, d, block_kv, 64,
                                                     fp8, group=4)
  assert n_wgs == wgs and k_stages % n_wgs == 0 and k_stages >= 2
  assert v_stages % n_wgs == 0 and v_stages >= 2
  cols = decode_mosaic.query_tile(4, True) if transposed else None
  assert decode_mosaic.shared_memory_bytes(
      d, block_kv, 64, k_stages, v_stages, fp8=fp8,
      compute_wgs=n_wgs, cols=cols) <= decode_mosaic.MAX_SHARED_MEMORY


# The persistent kernel's output and merge buffers go over the V ring and
# its table is held twice: the default rings stay.
@pytest.mark.parametrize("d,block_kv,fp8,group", [
    (128, 128, False, 4), (128, 64, False, 4), (128, 128, True, 4),
    (64, 64, False, 3), (64, 64, True, 3), (256, 64, False, 4),
    (128, 64, False, 64)])
def test_persistent_kernel_keeps_the_default_rings(d, block_kv, fp8, group):
  persistent = decode_mosaic.MosaicDecodeConfig(programs=132)
  for pages in (0, 96):   # a contiguous cache, 3 table rows held
    rings = decode_mosaic.pipeline(persistent, d, block_kv, pages, fp8,
                                   group)
    assert rings == decode_mosaic.pipeline(
        decode_mosaic.MosaicDecodeConfig(), d, block_kv, pages, fp8, group)
    assert decode_mosaic.config_bytes(
        persistent, d, block_kv, pages, fp8, group,
        *rings) <= decode_mosaic.MAX_SHARED_MEMORY


@pytest.mark.parametrize("d,block_kv,issue,want", [
    # Twice the warpgroups' V slots where they fit beside two K pages, then
    # the deepest K ring; 2 V slots without compute_issues_v.
    (128, 128, True, (2, 2, 4)), (128, 128, False, (2, 4, 2)),
    (64, 64, True, (3, 6, 6)), (128, 64, True, (2, 4, 4)),
    # 64 KiB pages: one warpgroup, two of each.
    (256, 128, True, (1, 2, 2))])
def test_default_rings(d, block_kv, issue, want):
  config = decode_mosaic.MosaicDecodeConfig(compute_issues_v=issue)
  assert decode_mosaic.pipeline(config, d, block_kv, 64, group=4) == want


@pytest.mark.parametrize("d,block_kv,fp8,want,ahead", [
    # Three V slots a warpgroup where they fit beside two K pages, else
    # two (and one block decided ahead); three warpgroups at head_dim 64
    # and pages of 64 keys.
    (64, 128, False, (2, 4, 6), 2), (64, 64, False, (3, 6, 9), 2),
    (128, 128, True, (2, 2, 6), 2), (128, 128, False, (2, 2, 4), 1)])
def test_rings_of_two_blocks_decided_ahead(d, block_kv, fp8, want, ahead):
  config = decode_mosaic.MosaicDecodeConfig(decide_ahead=2)
  rings = decode_mosaic.pipeline(config, d, block_kv, 0, fp8, group=4)
  assert rings == want
  assert decode_mosaic.blocks_ahead(config, rings[0], rings[2]) == ahead


def test_transposed_default_takes_one_warpgroup_for_wide_groups():
  """32 query heads a KV head: the transposed tiles of two warpgroups
  would not fit in the registers (`pipeline`)."""
  config = decode_mosaic.MosaicDecodeConfig()
  assert decode_mosaic.pipeline(config, 128, 128, 64, group=16)[0] == 2
  assert decode_mosaic.pipeline(config, 128, 128, 64, group=32)[0] == 1


def lower_decode(d, block_kv, group, skip, max_mode, cache, *,
                 initial_max=False, config=None, contiguous=False,
                 per_seq=32, kv_layout="NHD"):
  """The kernel lowered for CUDA (merging its splits, unless the config
  says not to): 8 KV heads, `per_seq` pages a sequence, 4 splits;
  `contiguous`: no page table (the pages of a contiguous cache); pages in
  `kv_layout`."""
  config = config or decode_mosaic.MosaicDecodeConfig()
  kernel = (decode_mosaic.decode_merged if config.merge_in_kernel
            else decode_mosaic.decode_partials)
  sds = jax.ShapeDtypeStruct
  hkv, pages = 8, 2 * per_seq
  fp8 = cache != jnp.bfloat16
  scales = [sds((hkv,), jnp.float32)] * 2 if fp8 else [None, None]
  starts = [sds((2, hkv, group), jnp.float32)] if initial_max else []
  fn = lambda *a: kernel(  # pylint: disable=g-long-lambda
      *a, group=group, sm_scale=0.1, num_splits=4, max_mode=max_mode,
      skip_enabled=skip, config=config, kv_layout=kv_layout)
  page = ((pages, hkv, block_kv, d) if kv_layout == "HND"
          else (pages, block_kv, hkv, d))
  args = [sds((2, hkv, group, d), jnp.bfloat16), sds(page, cache),
          sds(page, cache),
          None if contiguous else sds((2, per_seq), jnp.int32),
          sds((2,), jnp.int32),
          sds((2,), jnp.float32)]
  if fp8 or initial_max:
    args += scales + starts
  return testing.lower_for_h100(fn, *args)


@pytest.mark.parametrize("d,block_kv,group", [(128, 128, 4), (64, 64, 3),
                                              (256, 64, 8)])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("max_mode", ["split", "anchored"])
@pytest.mark.parametrize("cache", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_kernel_lowers_for_cuda(d, block_kv, group, skip, max_mode, cache):
  lowered = lower_decode(d, block_kv, group, skip, max_mode, cache)
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,fp8,rings", [
    (64, 128, True, (3, 6, 6)), (64, 64, False, (3, 6, 6)),
    (128, 128, False, (3, 3, 3))])   # 32 KiB pages: one a warpgroup
def test_three_warpgroups_take_rings_of_multiples_of_three(d, block_kv, fp8,
                                                           rings):
  config = decode_mosaic.MosaicDecodeConfig(compute_wgs=3)
  assert decode_mosaic.pipeline(config, d, block_kv, 64, fp8,
                                group=3) == rings
  assert decode_mosaic.fits(config, d, block_kv, 64, fp8, group=3)


@pytest.mark.parametrize("skip", [True, False])
def test_three_warpgroups_lower_for_cuda(skip):
  lowered = lower_decode(64, 128, 3, skip, "anchored", jnp.float8_e4m3fn,
                         config=decode_mosaic.MosaicDecodeConfig(
                             compute_wgs=3))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,group,max_mode,cache", [
    (128, 128, 4, "anchored", jnp.bfloat16),   # two compute warpgroups
    (64, 64, 3, "split", jnp.float8_e4m3fn)])
def test_kernel_from_an_initial_max_lowers_for_cuda(d, block_kv, group,
                                                    max_mode, cache):
  lowered = lower_decode(d, block_kv, group, True, max_mode, cache,
                         initial_max=True)
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,group,cache", [
    (128, 128, 4, jnp.bfloat16), (64, 64, 3, jnp.float8_e4m3fn)])
def test_heads_first_pages_lower_for_cuda(d, block_kv, group, cache):
  lowered = lower_decode(d, block_kv, group, True, "anchored", cache,
                         kv_layout="HND")
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,group,skip,merge", [
    (128, 128, 4, True, True), (64, 64, 3, False, False)])
def test_contiguous_cache_lowers_without_a_page_table(d, block_kv, group,
                                                      skip, merge):
  lowered = lower_decode(
      d, block_kv, group, skip, "anchored", jnp.bfloat16, contiguous=True,
      config=decode_mosaic.MosaicDecodeConfig(merge_in_kernel=merge))
  assert "mosaic_gpu" in lowered.as_text()


def mosaic_call_operands(lowered) -> list[str]:
  """The operand types of the lowered module's Mosaic GPU custom call."""
  text = lowered.as_text()
  call = next(line for line in text.splitlines()
              if "stablehlo.custom_call @mosaic_gpu" in line)
  operands = call.rsplit(" : (", 1)[1].split(") -> ", 1)[0]
  return [t.strip() for t in operands.split(", ")]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("global_semaphores", [False, True])
def test_small_inputs_travel_in_one_control_block(fp8, global_semaphores):
  """Besides the pages, the kernel reads one array (the query, the
  lengths, log λ, the FP8 scales and the merge's semaphores), which XLA
  writes in one fusion; `global_semaphores` adds the zeroed semaphores."""
  cache = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
  config = decode_mosaic.MosaicDecodeConfig(
      global_semaphores=global_semaphores)
  lowered = lower_decode(128, 128, 4, True, "anchored", cache,
                         contiguous=True, config=config)
  operands = mosaic_call_operands(lowered)
  # The kernel writes the control block's semaphores: XLA must alias it
  # (with `global_semaphores`, Pallas aliases its own zeroed buffer).
  assert "output_operand_aliases" in lowered.as_text()
  control = "tensor<2x8x16x128x" + ("f16>" if fp8 else "bf16>")
  want = [control] + [f"tensor<64x128x8x128x{'f8E4M3FN' if fp8 else 'bf16'}>"] * 2
  if global_semaphores:
    want.append("tensor<16xi32>")
  assert operands == want


@pytest.mark.parametrize("check_vma", [False, True])
def test_merge_lowers_inside_a_shard_map(check_vma):
  """A varying control block cannot enter the kernel as a Ref under
  `check_vma`: there the merge takes `pl.get_global` semaphores."""
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  P = jax.sharding.PartitionSpec
  sds = jax.ShapeDtypeStruct
  h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                 num_cores=132, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",),
                                   axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=h100)
  def fn(q, k, v, lengths, log_thr):
    return decode_mosaic.decode_merged(
        q, k, v, None, lengths, log_thr, group=4, sm_scale=0.1,
        num_splits=4)[0]
  pages = [sds((64, 128, 8, 128), jnp.bfloat16)] * 2
  args = [sds((2, 8, 4, 128), jnp.bfloat16), *pages, sds((2,), jnp.int32),
          sds((2,), jnp.float32)]
  with jax.sharding.use_abstract_mesh(mesh):
    mapped = jax.shard_map(
        fn, mesh=mesh, in_specs=(P(None, "x"), P(None, None, "x"),
                                 P(None, None, "x"), P(), P()),
        out_specs=P(None, "x"), check_vma=check_vma)
    lowered = jax.jit(mapped).trace(*args).lower(lowering_platforms=("cuda",))
  operands = mosaic_call_operands(lowered)
  assert (operands[-1] == "tensor<16xi32>") == check_vma


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.integers(-2 ** 31, 2 ** 31 - 1))
def test_float_from_bits_rebuilds_normal_floats(word):
  x = np.array([word], np.int32).view(np.float32)[0]
  got = float(decode_mosaic.float_from_bits(jnp.int32(word)))
  if np.isnan(x):   # (a NaN log λ must keep every block, as before)
    assert np.isnan(got)
  elif abs(x) < np.finfo(np.float32).tiny:   # subnormals flush to zero
    assert got == 0.0
  else:
    assert got == x


def test_control_block_round_trips_its_words():
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.standard_normal((2, 3, 5, 64)), jnp.bfloat16)
  words = np.concatenate(
      [rng.integers(-2 ** 31, 2 ** 31, (2, 3, 2)),
       np.float32([[[-np.inf, 0.0, 448.0, np.log2(1e-4)]] * 3] * 2)
       .view(np.int32)], axis=-1).astype(np.int32)
  block = decode_mosaic.control_block(q, jnp.asarray(words), 8)
  assert block.shape == (2, 3, 8 + decode_mosaic.CONTROL_ROWS, 64)
  np.testing.assert_array_equal(np.asarray(block[:, :, :5]), np.asarray(q))
  assert not np.asarray(block[:, :, 5:8]).any()
  row = block[:, :, 8, :decode_mosaic.CONTROL_HALVES]
  for i in range(words.shape[-1]):
    got = jax.vmap(jax.vmap(lambda r: decode_mosaic.control_word(r, i)))(row)
    np.testing.assert_array_equal(np.asarray(got), words[..., i])
  at = decode_mosaic.SEMAPHORE_AT
  assert not np.asarray(row[..., at:at + 2]).any()   # the semaphore: 0
  assert not np.asarray(block[:, :, 9:]).any()
  assert np.isfinite(np.asarray(block, np.float32)).all()


def test_contiguous_pages_must_be_whole_sequences():
  sds = jax.ShapeDtypeStruct
  with pytest.raises(ValueError, match="page_table"):
    jax.eval_shape(
        lambda *a: decode_mosaic.decode_merged(
            *a, None, sds((2,), jnp.int32), sds((2,), jnp.float32),
            group=4, sm_scale=0.1, num_splits=1),
        sds((2, 2, 4, 64), jnp.bfloat16), sds((5, 64, 2, 64), jnp.bfloat16),
        sds((5, 64, 2, 64), jnp.bfloat16))


def test_contiguous_pages_need_no_table():
  table = decode_base.page_table_array(decode_base.ContiguousPages(3, 5))
  np.testing.assert_array_equal(
      np.asarray(table), np.arange(15, dtype=np.int32).reshape(3, 5))
  # 512k keys in pages of 128: a table of 4096 pages takes 16 KiB of
  # shared memory, which costs a paged cache two of the four V slots.
  config = decode_mosaic.MosaicDecodeConfig()
  assert decode_mosaic.pipeline(config, 128, 128, 0, group=4) == (2, 2, 4)
  assert decode_mosaic.pipeline(config, 128, 128, 4096, group=4) == (2, 2, 2)


@pytest.mark.parametrize("d,block_kv,group", [(128, 128, 16), (64, 64, 64)])
def test_transposed_build_lowers_for_wide_groups(d, block_kv, group):
  # 16 and 64 query columns: two and eight column registers a thread, the
  # latter reduced in two rounds of the column scratch.
  lowered = lower_decode(d, block_kv, group, True, "anchored", jnp.bfloat16)
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,group,skip,cache", [
    (128, 128, 4, True, jnp.bfloat16), (64, 64, 3, False, jnp.bfloat16),
    (64, 128, 8, True, jnp.float8_e4m3fn)])
def test_64_row_build_lowers_for_cuda(d, block_kv, group, skip, cache):
  lowered = lower_decode(
      d, block_kv, group, skip, "anchored", cache,
      config=decode_mosaic.MosaicDecodeConfig(transposed=False))
  assert "mosaic_gpu" in lowered.as_text()


# Persistent (interpret mode has no register operands nor `setmaxnreg`):
# FP8, the registers handed over; a contiguous cache from an initial max,
# items split-minor.
@pytest.mark.parametrize("d,block_kv,group,skip,cache,kwargs", [
    (128, 128, 4, True, jnp.float8_e4m3fn, dict()),
    (128, 64, 8, True, jnp.bfloat16, dict(contiguous=True, initial_max=True,
                                          split_major=False))])
def test_persistent_kernel_lowers_for_cuda(d, block_kv, group, skip, cache,
                                           kwargs):
  kwargs = dict(kwargs)
  lowered = lower_decode(d, block_kv, group, skip, "anchored", cache,
                         config=decode_mosaic.MosaicDecodeConfig(
                             programs=132,
                             split_major=kwargs.pop("split_major", True)),
                         **kwargs)
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,group,skip,cache,transposed", [
    (128, 128, 4, True, jnp.bfloat16, True),
    (64, 128, 8, True, jnp.float8_e4m3fn, False),
    (128, 64, 4, False, jnp.bfloat16, True)])
@pytest.mark.parametrize("auto_barriers", [True, False])
def test_schedule_options_lower_for_cuda(d, block_kv, group, skip, cache,
                                        transposed, auto_barriers):
  lowered = lower_decode(
      d, block_kv, group, skip, "anchored", cache,
      config=decode_mosaic.MosaicDecodeConfig(
          hand_over_block_max=True, compute_wgs=2,
          transposed=transposed, auto_barriers=auto_barriers))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,block_kv,group,skip,cache,transposed", [
    (128, 128, 4, True, jnp.float8_e4m3fn, True),
    (64, 128, 8, False, jnp.bfloat16, False)])
def test_memory_warpgroup_v_copies_lower_for_cuda(d, block_kv, group, skip,
                                                  cache, transposed):
  lowered = lower_decode(
      d, block_kv, group, skip, "anchored", cache,
      config=decode_mosaic.MosaicDecodeConfig(compute_issues_v=False,
                                              transposed=transposed))
  assert "mosaic_gpu" in lowered.as_text()


def test_default_on_hopper_where_it_runs_the_problem(monkeypatch):
  from blasst_jax.ops import base as ops_base  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(ops_base, "on_gpu", lambda backend=None: True)
  monkeypatch.setattr(ops_base, "is_hopper", lambda device=None: True)
  problem = dict(dtype=jnp.bfloat16, head_dim=128, group=4, block_kv=128,
                 pages_per_seq=256, cache_dtype=jnp.bfloat16,
                 max_mode="anchored", max_axis_name=None, interpret=None)
  from blasst_jax.kernels import decode_triton  # pylint: disable=g-import-not-at-top
  for change in [{}, dict(cache_dtype=jnp.float8_e4m3fn), dict(
      max_mode="split", head_dim=64, group=3, block_kv=64),
                 dict(kernel_config=decode_mosaic.MosaicDecodeConfig())]:
    assert ops_base.default_op(
        "decode", **{**problem, **change}).name == "pallas_mosaic", change
  # What it does not run goes to the Triton kernel.
  for change in [dict(max_mode="global"), dict(max_axis_name="context"),
                 dict(head_dim=32), dict(block_kv=32), dict(group=65),
                 dict(cache_dtype=jnp.float8_e5m2),
                 dict(dtype=jnp.float32, cache_dtype=jnp.float32),
                 dict(interpret=True), dict(pages_per_seq=40000),
                 dict(kernel_config=decode_triton.DecodeConfig())]:
    assert ops_base.default_op(
        "decode", **{**problem, **change}).name == "pallas_triton", change


@pytest.mark.parametrize("merge_in_kernel,programs,cache", [
    (True, None, jnp.bfloat16), (False, None, jnp.float8_e4m3fn),
    (True, 132, jnp.bfloat16)])
def test_one_part_a_split_lowers_for_cuda(merge_in_kernel, programs, cache):
  lowered = lower_decode(
      128, 128, 4, True, "anchored", cache,
      config=decode_mosaic.MosaicDecodeConfig(
          merge_warpgroups=True, compute_wgs=2,
          merge_in_kernel=merge_in_kernel, programs=programs))
  assert "mosaic_gpu" in lowered.as_text()
