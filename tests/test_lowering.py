"""The Triton kernel lowers for CUDA on a machine without a GPU."""

import functools

import jax
import jax.numpy as jnp
import pytest

from blasst_jax.kernels import pallas_triton
from blasst_jax import testing

lower_for_h100 = testing.lower_for_h100


@pytest.mark.parametrize(
    "dtype,causal,hq,hkv,d,lq,lk,bq,bkv,load_v_in_branch",
    [(jnp.bfloat16, True, 8, 2, 128, 1000, 1000, 128, 64, True),
     (jnp.bfloat16, False, 4, 4, 128, 4096, 4096, 128, 128, False),
     (jnp.float16, True, 4, 1, 64, 300, 500, 64, 64, True),
     (jnp.float32, False, 2, 2, 256, 256, 256, 64, 32, True),
     (jnp.bfloat16, False, 2, 1, 80, 77, 130, 32, 16, True)])
def test_kernel_lowers_for_cuda(dtype, causal, hq, hkv, d, lq, lk, bq, bkv,
                                load_v_in_branch):
  b = 2
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr):
    return pallas_triton.attention_forward(
        q, k, v, kv_lengths, log_thr, causal=causal, sm_scale=d ** -0.5,
        block_q=bq, block_kv=bkv,
        config=pallas_triton.TritonConfig(load_v_in_branch=load_v_in_branch))

  lowered = lower_for_h100(fn, sds((b, lq, hq, d), dtype),
                           sds((b, lk, hkv, d), dtype),
                           sds((b, lk, hkv, d), dtype),
                           sds((b,), jnp.int32), sds((b,), jnp.float32))
  text = lowered.as_text()
  assert "xla.gpu.triton" in text
  assert text.count("blasst_prefill_triton") >= 1


@pytest.mark.parametrize("causal", [True, False])
def test_block_masked_kernel_lowers_for_cuda(causal):
  b, hq, hkv, d, length, block = 2, 8, 2, 128, 1000, 128
  nb = -(-length // block)
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr, mask):
    return pallas_triton.attention_forward(
        q, k, v, kv_lengths, log_thr, mask, causal=causal,
        sm_scale=d ** -0.5, block_q=block, block_kv=block)

  lowered = lower_for_h100(
      fn, sds((b, length, hq, d), jnp.bfloat16),
      sds((b, length, hkv, d), jnp.bfloat16),
      sds((b, length, hkv, d), jnp.bfloat16), sds((b,), jnp.int32),
      sds((b,), jnp.float32), sds((b, hq, nb, nb), jnp.bool_))
  assert lowered.as_text().count("blasst_prefill_triton") >= 1


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bf16", "f16"])
def test_mosaic_kernel_lowers_for_cuda(dtype, d, causal, skip):
  """Every configuration the Hopper kernel supports, with GQA, ragged sizes."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  b, hq, hkv, lq, lk = 2, 4, 2, 1000, 700
  bkv = pallas_mosaic.default_block_kv(d)
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr):
    return pallas_mosaic.attention_forward(
        q, k, v, kv_lengths, log_thr, causal=causal, sm_scale=d ** -0.5,
        block_q=64, block_kv=bkv, skip_enabled=skip, return_skip_mask=True)

  lowered = lower_for_h100(fn, sds((b, lq, hq, d), dtype),
                           sds((b, lk, hkv, d), dtype),
                           sds((b, lk, hkv, d), dtype),
                           sds((b,), jnp.int32), sds((b,), jnp.float32))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("config", [
    {"overlap_qk": False}, {"raster": "q"}, {"extra_k_stages": 0},
    {"copy_v_if_kept": True}, {"one_barrier_vote": False}])
def test_mosaic_pipeline_knobs_lower_for_cuda(config):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr):
    return pallas_mosaic.attention_forward(
        q, k, v, kv_lengths, log_thr, causal=True, sm_scale=0.125,
        block_q=64, block_kv=128, config=pallas_mosaic.MosaicConfig(**config))

  lowered = lower_for_h100(fn, sds((2, 700, 4, 128), jnp.bfloat16),
                           sds((2, 900, 2, 128), jnp.bfloat16),
                           sds((2, 900, 2, 128), jnp.bfloat16),
                           sds((2,), jnp.int32), sds((2,), jnp.float32))
  assert "mosaic_gpu" in lowered.as_text()


def lower_mosaic_forward(*, causal, d, lk, masked, config, skip=True,
                         return_skip_mask=False):
  """The Hopper forward lowered for CUDA at 1000 queries, GQA 4/2, with a
  block mask of 64 x block_kv tiles if `masked`."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  b, hq, hkv, lq = 2, 4, 2, 1000
  bkv = pallas_mosaic.default_block_kv(d)
  nq, nk = -(-lq // 64), -(-lk // bkv)
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr, mask):
    return pallas_mosaic.attention_forward(
        q, k, v, kv_lengths, log_thr, mask if masked else None,
        causal=causal, sm_scale=d ** -0.5, block_q=64, block_kv=bkv,
        skip_enabled=skip, return_skip_mask=return_skip_mask, config=config)

  return lower_for_h100(fn, sds((b, lq, hq, d), jnp.bfloat16),
                        sds((b, lk, hkv, d), jnp.bfloat16),
                        sds((b, lk, hkv, d), jnp.bfloat16),
                        sds((b,), jnp.int32), sds((b,), jnp.float32),
                        sds((b, hq, nq, nk), jnp.bool_))


@pytest.mark.parametrize("d,masked,overlap", [(64, True, True),
                                               (128, False, True),
                                               (128, True, False)])
def test_mosaic_dense_builds_lower_for_cuda(d, masked, overlap):
  """The dense build on the overlapped loop, its softmax under a branch
  (`overlap_dense`, the default: three warpgroups at head_dim 64, two at
  128), and the two-turn ping-pong of two (`overlap_dense=False`)."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  lowered = lower_mosaic_forward(
      causal=True, d=d, lk=700, masked=masked, skip=False,
      config=pallas_mosaic.MosaicConfig(overlap_dense=overlap))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("d,skip,raster", [(64, True, "heads"),
                                           (128, True, "q"),
                                           (128, False, "heads"),
                                           (256, True, "heads")])
def test_mosaic_clusters_lower_for_cuda(d, skip, raster):
  """`cluster_q=2`: two programs along q share each K/V copy (TMA
  multicast) and release slots through cluster barriers."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  lowered = lower_mosaic_forward(
      causal=True, d=d, lk=700, masked=False, skip=skip,
      config=pallas_mosaic.MosaicConfig(cluster_q=2, raster=raster))
  assert "mosaic_gpu" in lowered.as_text()


def test_mosaic_clusters_refuse_block_masks():
  """One K/V stream per cluster cannot follow two programs' block lists."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  mask = jnp.ones((1, 2, 2, 1), jnp.bool_)
  with pytest.raises(ValueError, match="cluster_q"):
    pallas_mosaic.attention_forward(
        q, q, q, jnp.array([128], jnp.int32), jnp.zeros((1,), jnp.float32),
        mask, causal=False, sm_scale=0.125,
        config=pallas_mosaic.MosaicConfig(cluster_q=2))


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_mosaic_three_compute_warpgroups_lower_for_cuda(skip, masked):
  """Three q tiles a program (head_dim 64), dense and skipping, with and
  without a block mask (lists of three tiles)."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  lowered = lower_mosaic_forward(
      causal=True, d=64, lk=700, masked=masked, skip=skip,
      config=pallas_mosaic.MosaicConfig(compute_wgs=3))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("skip,compute_wgs", [(True, 3), (True, 2),
                                              (False, 2)])
def test_mosaic_exp2_on_fma_lowers_for_cuda(skip, compute_wgs):
  """Part of each score tile's exponentials on the FMA pipe (column
  slices of the wgmma layout, bit casts, shifts), in the overlapped and
  the two-turn loops."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  lowered = lower_mosaic_forward(
      causal=True, d=64, lk=700, masked=False, skip=skip,
      config=pallas_mosaic.MosaicConfig(compute_wgs=compute_wgs,
                                        exp2_fma_cols=48))
  assert "mosaic_gpu" in lowered.as_text()


def test_exp2_microbenchmark_lowers_for_cuda():
  """experiments/bench_exp2.py's kernel (run on the device only)."""
  from experiments import bench_exp2  # pylint: disable=g-import-not-at-top
  lowered = testing.lower_for_h100(functools.partial(
      bench_exp2.exp_tiles, programs=4, fma_cols=48, iters=8, warpgroups=3))
  assert "mosaic_gpu" in lowered.as_text()


def test_mosaic_mqa_lowers_with_three_stages():
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr):
    return pallas_mosaic.attention_forward(
        q, k, v, kv_lengths, log_thr, causal=True, sm_scale=0.125,
        block_q=64, block_kv=64,
        config=pallas_mosaic.MosaicConfig(num_stages=3))

  lowered = lower_for_h100(fn, sds((1, 300, 8, 128), jnp.bfloat16),
                           sds((1, 300, 1, 128), jnp.bfloat16),
                           sds((1, 300, 1, 128), jnp.bfloat16),
                           sds((1,), jnp.int32), sds((1,), jnp.float32))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("causal,d,num_stages,lk", [(True, 128, 2, 700),
                                                    (False, 256, 2, 700),
                                                    (True, 64, 3, 700),
                                                    # a list of > 256 words
                                                    (False, 128, 2, 40000)])
def test_block_masked_mosaic_kernel_lowers_for_cuda(causal, d, num_stages, lk):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  lowered = lower_mosaic_forward(
      causal=causal, d=d, lk=lk, masked=True, return_skip_mask=True,
      config=pallas_mosaic.MosaicConfig(num_stages=num_stages))
  assert "mosaic_gpu" in lowered.as_text()


def test_kernel_recording_skips_lowers_for_cuda():
  b, hq, hkv, d, length = 1, 4, 2, 128, 1000
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr):
    return pallas_triton.attention_forward(
        q, k, v, kv_lengths, log_thr, causal=True, sm_scale=d ** -0.5,
        block_q=128, block_kv=64, return_skip_mask=True)

  lowered = lower_for_h100(fn, sds((b, length, hq, d), jnp.bfloat16),
                           sds((b, length, hkv, d), jnp.bfloat16),
                           sds((b, length, hkv, d), jnp.bfloat16),
                           sds((b,), jnp.int32), sds((b,), jnp.float32))
  assert lowered.as_text().count("blasst_prefill_triton") >= 1


def test_kernel_chained_from_an_initial_max_lowers_for_cuda():
  b, hq, hkv, d, length = 2, 4, 2, 128, 1000
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr, initial_max):
    return pallas_triton.attention_forward(
        q, k, v, kv_lengths, log_thr, None, initial_max, causal=True,
        sm_scale=d ** -0.5, block_q=128, block_kv=64)

  lowered = lower_for_h100(fn, sds((b, length, hq, d), jnp.bfloat16),
                           sds((b, length, hkv, d), jnp.bfloat16),
                           sds((b, length, hkv, d), jnp.bfloat16),
                           sds((b,), jnp.int32), sds((b,), jnp.float32),
                           sds((b, hq, length), jnp.float32))
  assert lowered.as_text().count("blasst_prefill_triton") >= 1


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("copy_v_if_kept", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_mosaic_kernel_chained_from_an_initial_max_lowers_for_cuda(
    d, copy_v_if_kept, masked):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  b, hq, hkv, lq, lk = 2, 9, 3, 1000, 700
  bkv = pallas_mosaic.default_block_kv(d)
  nq, nk = -(-lq // 64), -(-lk // bkv)
  sds = jax.ShapeDtypeStruct

  def fn(q, k, v, kv_lengths, log_thr, initial_max, mask):
    return pallas_mosaic.attention_forward(
        q, k, v, kv_lengths, log_thr, mask if masked else None, initial_max,
        causal=True, sm_scale=d ** -0.5, block_q=64, block_kv=bkv,
        return_skip_mask=True,
        config=pallas_mosaic.MosaicConfig(copy_v_if_kept=copy_v_if_kept))

  lowered = lower_for_h100(fn, sds((b, lq, hq, d), jnp.bfloat16),
                           sds((b, lk, hkv, d), jnp.bfloat16),
                           sds((b, lk, hkv, d), jnp.bfloat16),
                           sds((b,), jnp.int32), sds((b,), jnp.float32),
                           sds((b, hq, lq), jnp.float32),
                           sds((b, hq, nq, nk), jnp.bool_))
  assert "mosaic_gpu" in lowered.as_text()
