"""The Mosaic GPU decode kernel on CPU: Pallas' GPU interpret mode against the
decode oracle (outputs, skip counts, bytes), with race detection, and its
CUDA lowering."""

import jax
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from tests import test_base
from tests import test_decode


def run_race_checked(q, k_pages, v_pages, table, kv_lengths, threshold,
                     *scales, num_splits, max_mode, config=None):
  """Partials of the kernel in interpret mode with race detection."""
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  b, hq, d = q.shape
  hkv = k_pages.shape[2]
  lam = jnp.full((b,), threshold, jnp.float32)
  interpret_pallas_call.reset_gpu_interpret_mode_state()
  partials = decode_mosaic.decode_partials(
      q.reshape(b, hkv, hq // hkv, d), k_pages, v_pages, table, kv_lengths,
      config_lib.log_threshold(lam), *scales, group=hq // hkv,
      sm_scale=d ** -0.5,
      num_splits=num_splits, max_mode=max_mode,
      config=config or decode_mosaic.MosaicDecodeConfig(),
      interpret=plgpu.InterpretGPUParams(detect_races=True),
      skip_enabled=threshold > 0)
  partials = jax.block_until_ready(partials)
  return partials, interpret_pallas_call.get_races().races_found


def paged(k, v, page, extra_pages=3, seed=1):
  """The contiguous caches scattered over a larger pool of NaN pages."""
  b, max_len, hkv, d = k.shape
  per_seq = max_len // page
  perm = jax.random.permutation(jax.random.PRNGKey(seed),
                                b * per_seq + extra_pages)
  table = perm[: b * per_seq].reshape(b, per_seq).astype(jnp.int32)
  pool_k = jnp.full((b * per_seq + extra_pages, page, hkv, d), jnp.nan,
                    k.dtype)
  pool_v = jnp.full_like(pool_k, jnp.nan)
  pool_k = pool_k.at[table].set(k.reshape(b, per_seq, page, hkv, d))
  pool_v = pool_v.at[table].set(v.reshape(b, per_seq, page, hkv, d))
  return pool_k, pool_v, table


@pytest.mark.parametrize("max_mode,num_splits,kv_heads,threshold,stages", [
    ("anchored", 2, 2, 1e-2, (4, 2, 2)),   # GQA 4/2, anchors, ragged ends
    ("split", 3, 1, 1e-2, (2, 4, 2)),      # MQA 8/1, more V than K slots
    ("anchored", 1, 2, 0.0, (4, 2, 2)),    # the dense build
    ("anchored", 2, 2, 1e-2, (4, 2, 1)),   # one compute warpgroup
    ("split", 1, 1, 1e-2, (2, 3, 1))])
def test_race_checked_kernel_matches_oracle(max_mode, num_splits, kv_heads,
                                            threshold, stages):
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16
  q, k, v = test_decode.cache_inputs(
      test_base.key_for("decode_mosaic", max_mode, kv_heads), batch=2,
      max_len=384, q_heads=8, kv_heads=kv_heads, head_dim=64, dtype=dtype)
  # Ragged lengths: past them the pages hold NaN, which must not leak.
  kv_lengths = jnp.array([384, 161], jnp.int32)
  k = k.at[1, 161:].set(jnp.nan)
  v = v.at[1, 161:].set(jnp.nan)
  pool_k, pool_v, table = paged(k, v, page=64)
  (acc, m, l, skipped, visited), races = run_race_checked(
      q, pool_k, pool_v, table, kv_lengths, threshold, num_splits=num_splits,
      max_mode=max_mode,
      config=decode_mosaic.MosaicDecodeConfig(*stages))
  assert not races, "the race detector found a shared-memory data race"
  group = 8 // kv_heads
  out = bj.decode.merge_partials(acc, m, l)[:, :, :group].reshape(q.shape)
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, kv_lengths, block_kv=64, threshold=threshold,
      num_splits=num_splits, max_mode=max_mode)
  test_base.assert_close(out, oracle.out, dtype)
  np.testing.assert_array_equal(
      np.asarray(visited.sum(-1)), np.asarray(jnp.sum(oracle.visited_mask, -1)))
  test_base.assert_skips_match(skipped.sum(-1), oracle, threshold, dtype)
  if threshold > 0:
    assert int(jnp.sum(skipped)) > 0, "inputs meant to skip did not"
  else:
    assert int(jnp.sum(skipped)) == 0


def test_race_checked_fp8_cache_matches_oracle_on_the_dequantized_cache():
  """float8_e4m3fn pages with a scale per KV head (NaN past the lengths):
  the kernel against the f32 oracle run on the dequantized cache."""
  q, k, v = test_decode.cache_inputs(
      test_base.key_for("decode_mosaic_fp8"), batch=2, max_len=256,
      q_heads=8, kv_heads=2, head_dim=64)
  q = q.astype(jnp.bfloat16)
  # Per-head scales of different sizes: one head's values are 10x larger.
  k = k * jnp.array([1.0, 10.0])[None, None, :, None]
  k_scale = jnp.abs(k).max(axis=(0, 1, 3)) / 448.0
  v_scale = jnp.abs(v).max(axis=(0, 1, 3)) / 448.0
  k8 = (k / k_scale[:, None]).astype(jnp.float8_e4m3fn)
  v8 = (v / v_scale[:, None]).astype(jnp.float8_e4m3fn)
  kv_lengths = jnp.array([256, 150], jnp.int32)
  k8 = k8.at[1, 150:].set(jnp.nan)
  v8 = v8.at[1, 150:].set(jnp.nan)
  pool_k, pool_v, table = paged(k8.astype(jnp.float32),
                                v8.astype(jnp.float32), page=64)
  (acc, m, l, skipped, visited), races = run_race_checked(
      q, pool_k.astype(k8.dtype), pool_v.astype(v8.dtype), table, kv_lengths,
      1e-2, k_scale, v_scale, num_splits=2, max_mode="anchored")
  assert not races, "the race detector found a shared-memory data race"
  out = bj.decode.merge_partials(acc, m, l)[:, :, :4].reshape(q.shape)
  oracle = bj.reference.blockwise_decode_attention(
      q.astype(jnp.float32), k8.astype(jnp.float32) * k_scale[:, None],
      v8.astype(jnp.float32) * v_scale[:, None], kv_lengths, block_kv=64,
      threshold=1e-2, num_splits=2, max_mode="anchored")
  test_base.assert_close(out, oracle.out, jnp.float16)
  np.testing.assert_array_equal(
      np.asarray(visited.sum(-1)), np.asarray(jnp.sum(oracle.visited_mask, -1)))
  test_base.assert_skips_match(skipped.sum(-1), oracle, 1e-2, jnp.float16)
  assert int(jnp.sum(skipped)) > 0, "inputs meant to skip did not"


@pytest.mark.parametrize("max_mode", ["split", "anchored"])
def test_through_the_api_with_stats(max_mode):
  dtype = jnp.bfloat16
  q, k, v = test_decode.cache_inputs(
      test_base.key_for("decode_mosaic_api", max_mode), batch=2, max_len=256,
      q_heads=4, kv_heads=1, head_dim=128, dtype=dtype)
  kv_lengths = jnp.array([256, 97], jnp.int32)
  common = dict(threshold=1e-2, block_kv=64, num_splits=2, max_mode=max_mode,
                return_stats=True)
  out, stats = bj.decode_attention(q, k, v, kv_lengths,
                                   implementation="pallas_mosaic", **common)
  ref, ref_stats = bj.decode_attention(q, k, v, kv_lengths,
                                       implementation="reference", **common)
  test_base.assert_close(out, ref, dtype)
  np.testing.assert_array_equal(stats.visited_blocks, ref_stats.visited_blocks)
  np.testing.assert_array_equal(stats.skipped_blocks, ref_stats.skipped_blocks)
  np.testing.assert_array_equal(stats.bytes_read, ref_stats.bytes_read)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_mode="global"), "max_mode"),
    (dict(block_kv=32), "multiple of 64"),
    (dict(initial_max=jnp.zeros((2, 4))), "initial_max"),
    (dict(dtype=jnp.float32), "bf16/f16")])
def test_unsupported_inputs_name_the_fix(kwargs, match):
  dtype = kwargs.pop("dtype", jnp.bfloat16)
  q = jnp.zeros((2, 4, 64), dtype)
  cache = jnp.zeros((2, 128, 1, 64), dtype)
  with pytest.raises(ValueError, match=match):
    bj.decode_attention(q, cache, cache, jnp.array([128, 5]),
                        implementation="pallas_mosaic", threshold=1e-2,
                        **{"block_kv": 64, **kwargs})


def test_config_rejects_shallow_rings():
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="k_stages"):
    decode_mosaic.MosaicDecodeConfig(k_stages=1)
  with pytest.raises(ValueError, match="v_stages"):
    decode_mosaic.MosaicDecodeConfig(v_stages="2")
  with pytest.raises(ValueError, match="compute_wgs"):
    decode_mosaic.MosaicDecodeConfig(compute_wgs=3)
  with pytest.raises(ValueError, match="multiple"):
    decode_mosaic.MosaicDecodeConfig(v_stages=3, compute_wgs=2)


@pytest.mark.parametrize("d,block_kv,fp8,wgs", [
    (128, 128, False, 1),   # three warpgroups would spill
    (128, 64, False, 2), (64, 128, False, 2), (64, 128, True, 2),
    (256, 64, False, 1)])
def test_default_pipeline_fits_registers_and_shared_memory(d, block_kv, fp8,
                                                           wgs):
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  config = decode_mosaic.MosaicDecodeConfig()
  n_wgs, k_stages = decode_mosaic.pipeline(config, d, block_kv, 64, fp8)
  assert n_wgs == wgs and k_stages % n_wgs == 0 and k_stages >= 2
  assert decode_mosaic.shared_memory_bytes(
      d, block_kv, 64, k_stages, config.v_stages, fp8=fp8,
      compute_wgs=n_wgs) <= decode_mosaic.MAX_SHARED_MEMORY


@pytest.mark.parametrize("d,block_kv,group", [(128, 128, 4), (64, 64, 3),
                                              (256, 64, 8)])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("max_mode", ["split", "anchored"])
@pytest.mark.parametrize("cache", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_kernel_lowers_for_cuda(d, block_kv, group, skip, max_mode, cache):
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  sds = jax.ShapeDtypeStruct
  hkv, pages, per_seq = 8, 64, 32
  fp8 = cache != jnp.bfloat16
  fn = lambda *a: decode_mosaic.decode_partials(  # pylint: disable=g-long-lambda
      *a, group=group, sm_scale=0.1, num_splits=4, max_mode=max_mode,
      skip_enabled=skip)
  lowered = test_base.lower_for_h100(
      fn, sds((2, hkv, group, d), jnp.bfloat16),
      sds((pages, block_kv, hkv, d), cache),
      sds((pages, block_kv, hkv, d), cache),
      sds((2, per_seq), jnp.int32), sds((2,), jnp.int32),
      sds((2,), jnp.float32), *([sds((hkv,), jnp.float32)] * 2 * fp8))
  assert "mosaic_gpu" in lowered.as_text()
