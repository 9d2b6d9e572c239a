"""Decode kernels compiled on a GPU (marker `gpu`): the shared decode suite,
sparsity per mode at 8k, context-parallel decode on one GPU, the Flax
decode step on the Hopper kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import testing
from tests import test_base

pytestmark = pytest.mark.gpu


class TestPallasTritonDecodeGpu(test_base.DecodeTestBase):
  """The shared decode suite, compiled (bf16)."""

  implementation = "pallas_triton"
  shapes = testing.GPU_DECODE_TEST_SHAPES
  dtype = jnp.bfloat16
  block_kv = 128
  low_precision_dtypes = (jnp.float16,)
  fp8_itemsize = 2
  interpret = False


class TestMosaicDecodeGpu(test_base.DecodeTestBase):
  """The Hopper decode kernel compiled: pages of 128 keys at head_dim 128,
  64 at 64."""

  implementation = "pallas_mosaic"
  shapes = testing.GPU_DECODE_TEST_SHAPES
  dtype = jnp.bfloat16
  max_modes = ("split", "anchored")
  low_precision_dtypes = (jnp.float16,)
  supports_initial_max = True
  bytes_match_reference = True
  interpret = False

  def block_kv_for(self, shape):
    return 128 if shape.head_dim >= 128 else 64

  def decode(self, *args, **kwargs):
    if not bj.api.is_hopper():
      pytest.skip("needs a Hopper GPU")
    return super().decode(*args, **kwargs)

  def paged_decode(self, *args, **kwargs):
    if not bj.api.is_hopper():
      pytest.skip("needs a Hopper GPU")
    return super().paged_decode(*args, **kwargs)


# The suite checks the decisions; this checks how much each mode skips at 8k
# with the default split count (which fills the GPU) and with one split.
@pytest.mark.parametrize("max_mode", bj.decode.MAX_MODES)
@pytest.mark.parametrize("num_splits", [None, 1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_decode_kernel_matches_oracle(dtype, num_splits, max_mode):
  q, k, v = patterns.sink_local_qkv(
      testing.key_for("gpu_decode", dtype), batch=4, seq_len=8192,
      q_heads=32, kv_heads=8, head_dim=128, sharpness=(14.0, 20.0),
      dtype=dtype)
  q = q[:, -1]
  lengths = jnp.array([8192, 5000, 1, 4097], jnp.int32)
  out, stats = bj.decode_attention(q, k, v, lengths, threshold=1e-3,
                                   num_splits=num_splits,
                                   max_mode=max_mode, return_stats=True)
  # The default implementation's split count (Mosaic on Hopper: one
  # program per SM, so fewer splits than Triton's two).
  default = bj.decode.default_implementation(
      dtype=dtype, head_dim=128, group=4, block_kv=128, pages_per_seq=64,
      max_mode=max_mode)
  splits = num_splits or bj.decode.default_num_splits(
      4, 8, 8192, 128, implementation=default)
  oracle = bj.reference.blockwise_decode_attention(
      q, k, v, lengths, block_kv=128, threshold=1e-3, num_splits=splits,
      max_mode=max_mode)
  testing.assert_close(out, oracle.out, dtype)
  np.testing.assert_array_equal(stats.visited_blocks,
                                oracle.stats.visited_blocks)
  mismatch = int(jnp.sum(jnp.abs(stats.skipped_blocks
                                 - oracle.stats.skipped_blocks)))
  assert mismatch <= 0.01 * int(jnp.sum(oracle.stats.visited_blocks))
  # Many splits with their own running max skip little (that is the point
  # of the other modes); one split or a shared max skips most far blocks.
  floor = 0.3 if (max_mode != "split" or num_splits == 1) else 0.0
  assert float(stats.total_sparsity) > floor


# Splits: one (the merge is the normalization), a few, a full wave at
# batch 1 (16 x 8 programs), and more programs than the GPU holds at once
# (the merging programs wait on the others' semaphores: they must not
# starve them).
# Builds: transposed at GQA 4, 3 and 16 (8 and 16 query columns), and the
# 64-row build with two compute warpgroups (pages of 64).
@pytest.mark.parametrize("num_splits", [1, 3, 16, 100])
@pytest.mark.parametrize("transposed,group,block_kv", [
    (True, 4, 128), (True, 3, 128), (True, 16, 128), (False, 4, 64)])
def test_in_kernel_merge_matches_the_xla_merge(num_splits, transposed,
                                               group, block_kv):
  """The Hopper kernel's split-K merge in the kernel (the default) gives
  the XLA merge's outputs, row statistics and counts, with rows that keep
  no key at 0, and the same again on a second call."""
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  from blasst_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  from blasst_jax.ops.decode import base as decode_base  # pylint: disable=g-import-not-at-top
  b, hkv, d = 3, 8, 128
  q, k, v = patterns.sink_local_qkv(
      testing.key_for("gpu_merge", num_splits, group), batch=b,
      seq_len=8192, q_heads=hkv * group, kv_heads=hkv, head_dim=d,
      sharpness=(14.0, 20.0), dtype=jnp.bfloat16)
  q = q[:, -1].reshape(b, hkv, group, d)
  lengths = jnp.array([8192, 3001, 0], jnp.int32)
  pool_k, pool_v, table = testing.paged_cache(k, v, block_kv)
  log_thr = config_lib.log_threshold(jnp.full((b,), 1e-3, jnp.float32))
  common = dict(group=group, sm_scale=d ** -0.5, num_splits=num_splits,
                max_mode="anchored")
  config = decode_mosaic.MosaicDecodeConfig(transposed=transposed)
  acc, m, l, skipped, visited = decode_mosaic.decode_partials(
      q, pool_k, pool_v, table, lengths, log_thr, config=config, **common)
  want, want_lse = bj.decode.merge_partials(acc, m, l, return_lse=True)
  for _ in range(2):
    out, m_all, l_all, sk, vi = decode_mosaic.decode_merged(
        q, pool_k, pool_v, table, lengths, log_thr, config=config, **common)
    testing.assert_close(out.reshape(b, hkv, group, d),
                         want[:, :, :group], jnp.bfloat16)
    lse = decode_base.lse_from_stats(m_all, l_all)[:, :, :group]
    testing.assert_lse_close(lse, want_lse[:, :, :group], atol=5e-2,
                             rtol=1e-2)
    np.testing.assert_array_equal(sk, skipped.sum(-1))
    np.testing.assert_array_equal(vi, visited.sum(-1))
  assert not bool(jnp.any(out[2])), "an empty sequence gives zeros"
  assert int(jnp.sum(sk)) > 0


@pytest.mark.parametrize("max_mode", ["anchored", "global"])
def test_context_parallel_decode_shares_the_max_on_one_gpu(max_mode):
  """share_max on a 1-device context axis: "anchored" runs the kernel's
  split walk from anchors scored outside it (`initial_max`), "global"
  takes its max through `pmax`; both decide as the plain call."""
  import jax  # pylint: disable=g-import-not-at-top
  from blasst_jax import sharding  # pylint: disable=g-import-not-at-top
  q, k, v = patterns.sink_local_qkv(
      testing.key_for("gpu_decode_shared", max_mode), batch=2,
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
  testing.assert_close(got, oracle.out, jnp.bfloat16)
  testing.assert_close(got, want, jnp.bfloat16)
  mismatch = int(jnp.sum(jnp.abs(stats.skipped_blocks
                                 - want_stats.skipped_blocks)))
  assert mismatch <= 0.01 * int(jnp.sum(want_stats.visited_blocks))
  assert float(stats.total_sparsity) > 0.3


@pytest.mark.parametrize("page_size", [None, 64])
def test_flax_decode_step_runs_the_hopper_kernel_by_default(monkeypatch,
                                                            page_size):
  """On Hopper the Flax layer's KV-cache decode step, with no
  implementation named, runs the Mosaic decode kernel (contiguous and paged
  caches) and gives the reference decode's outputs."""
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  from blasst_jax.nn import SkipSelfAttention  # pylint: disable=g-import-not-at-top
  calls = []
  kernel = decode_mosaic.decode_merged
  monkeypatch.setattr(decode_mosaic, "decode_merged",
                      lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  b, features, steps = 2, 512, 3      # 4 query heads / 1 KV head of 128
  x = jax.random.normal(jax.random.PRNGKey(5), (b, steps, features),
                        jnp.bfloat16)
  outs = {}
  for impl in (None, "reference"):
    layer = SkipSelfAttention(
        4, features, num_kv_heads=1, dtype=jnp.bfloat16, threshold=0.1,
        decode_implementation=impl, rngs=nnx.Rngs(0))
    layer.init_cache(b, max_len=1024, dtype=jnp.bfloat16, page_size=page_size)
    step = nnx.jit(lambda layer, token: layer.decode(token))
    outs[impl] = jnp.concatenate([step(layer, x[:, i:i + 1])
                                  for i in range(steps)], axis=1)
  assert calls, "the Mosaic decode kernel did not run"
  np.testing.assert_allclose(np.asarray(outs[None], np.float32),
                             np.asarray(outs["reference"], np.float32),
                             atol=3e-2, rtol=3e-2)


def ragged_cache(name, fp8):
  """A sink/local cache of 3 sequences (full, ragged, empty), 32 / 8 heads,
  head_dim 128, the last query; FP8 pages with their scales if `fp8`:
  (q, k, v, lengths, scale keywords)."""
  q, k, v = patterns.sink_local_qkv(
      testing.key_for(name, fp8), batch=3, seq_len=8192, q_heads=32,
      kv_heads=8, head_dim=128, sharpness=(14.0, 20.0), dtype=jnp.bfloat16)
  scales = {}
  if fp8:
    k, scales["k_scale"] = bj.decode.quantize_cache(k)
    v, scales["v_scale"] = bj.decode.quantize_cache(v)
  return q[:, -1], k, v, jnp.array([8192, 3001, 0], jnp.int32), scales


def assert_same_results(want, got, *, skipping: bool):
  """Two builds' (out, stats): outputs and skip counts bit for bit, and,
  `skipping`, over 10 % of the blocks skipped (`ragged_cache` at 1e-3:
  13 % with "split" max mode, whose every split keeps its first block)."""
  (want, want_stats), (got, stats) = want, got
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  np.testing.assert_array_equal(stats.skipped_blocks,
                                want_stats.skipped_blocks)
  if skipping:
    assert float(stats.total_sparsity) > 0.1


# compute_issues_v moves the V copies, not the arithmetic: outputs and
# counts equal the memory warpgroup's bit for bit. Builds: V slots as many
# as compute warpgroups (copied after accumulating the slot's block), twice
# as many (at the decision), one warpgroup, the 64-row build; bf16 and FP8.
@pytest.mark.parametrize("threshold", [0.0, 1e-3])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("kwargs", [
    dict(), dict(k_stages=2, v_stages=4), dict(compute_wgs=1),
    dict(transposed=False)])
def test_compute_issued_v_matches_the_memory_warpgroups(kwargs, fp8,
                                                        threshold):
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  q, k, v, lengths, scales = ragged_cache("gpu_v_issue", fp8)
  results = []
  for issue in (False, True):
    config = decode_mosaic.MosaicDecodeConfig(compute_issues_v=issue,
                                              **kwargs)
    results.append(bj.decode_attention(
        q, k, v, lengths, threshold=threshold, block_kv=128,
        max_mode="anchored", implementation="pallas_mosaic",
        return_stats=True, kernel_config=config, **scales))
  assert_same_results(*results, skipping=bool(threshold))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("kwargs", [
    dict(hand_over_block_max=True),
    dict(hand_over_block_max=True, split_registers=True),
    dict(hand_over_block_max=True, transposed=False),
    dict(fp8_k_in_registers=True),
    dict(decide_ahead=2, block_kv=64), dict(decide_ahead=2, compute_wgs=1),
    dict(auto_barriers=False), dict(auto_barriers=False, num_splits=1),
    dict(auto_barriers=False, transposed=False, compute_wgs=1),
    dict(auto_barriers=False, hand_over_block_max=True, decide_ahead=2,
         fp8_k_in_registers=True, block_kv=64),
    dict(global_semaphores=True)])
def test_schedule_options_match_the_default_build(kwargs, fp8):
  """Options that change only when or where things happen (block maxima
  handed over, FP8 K widened in registers, blocks decided two ahead,
  Pallas' store barriers left out, the merge's semaphores from
  `pl.get_global`): outputs and skip
  counts bit-equal to the same build without them, anchored and split
  (merged by the last split, or, with one, in shared memory)."""
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  q, k, v, lengths, scales = ragged_cache("gpu_schedule", fp8)
  call = dict(block_kv=128, num_splits=None)
  call.update({name: kwargs[name] for name in call if name in kwargs})
  build = dict(compute_wgs=2, split_registers=False,
               fp8_k_in_registers=False)
  build.update({name: value for name, value in kwargs.items()
                if name in ("transposed", "split_registers", "compute_wgs")})
  option = {name: value for name, value in kwargs.items()
            if name not in build and name not in call}
  for max_mode in ("anchored", "split"):
    results = []
    for config in (build, {**build, **option}):
      results.append(bj.decode_attention(
          q, k, v, lengths, threshold=1e-3, **call,
          max_mode=max_mode, implementation="pallas_mosaic",
          return_stats=True,
          kernel_config=decode_mosaic.MosaicDecodeConfig(**config),
          **scales))
    assert_same_results(*results, skipping=True)


# Three compute warpgroups (block j on warpgroup j % 3) decide as one
# warpgroup walking the split does: skip counts equal a two-warpgroup
# build's (three are the default at head_dim 64); the outputs add the same
# blocks in another order. Head_dim 128 (FP8 K widened 64 keys at a time)
# and the real-model shape, head_dim 64 at 3 KV heads.
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("head_dim,block_kv,num_splits", [
    (128, 128, None), (64, 64, None), (64, 128, 1), (64, 128, 5)])
def test_three_compute_warpgroups_match_two(head_dim, block_kv, num_splits,
                                            fp8):
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  if head_dim == 128:
    q, k, v, lengths, scales = ragged_cache("gpu_three_wgs", fp8)
  else:
    q, k, v = patterns.sink_local_qkv(
        testing.key_for("gpu_three_wgs_d64", fp8), batch=3, seq_len=8192,
        q_heads=9, kv_heads=3, head_dim=64, sharpness=(14.0, 20.0),
        dtype=jnp.bfloat16)
    q, lengths, scales = q[:, -1], jnp.array([8192, 5111, 1], jnp.int32), {}
    if fp8:
      k, scales["k_scale"] = bj.decode.quantize_cache(k)
      v, scales["v_scale"] = bj.decode.quantize_cache(v)
  for max_mode, threshold in (("anchored", 1e-3), ("split", 1e-3),
                              ("anchored", 0.0)):
    (want, want_stats), (got, stats) = [bj.decode_attention(
        q, k, v, lengths, threshold=threshold, block_kv=block_kv,
        num_splits=num_splits, max_mode=max_mode,
        implementation="pallas_mosaic", return_stats=True,
        kernel_config=decode_mosaic.MosaicDecodeConfig(compute_wgs=wgs),
        **scales) for wgs in (2, 3)]
    testing.assert_close(got, want, jnp.bfloat16)
    np.testing.assert_array_equal(stats.skipped_blocks,
                                  want_stats.skipped_blocks)
    np.testing.assert_array_equal(stats.visited_blocks,
                                  want_stats.visited_blocks)
    if threshold and max_mode == "anchored":
      assert float(stats.total_sparsity) > 0.1


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 1e-3])
def test_heads_first_pages_match_nhd_pages(fp8, threshold):
  """An HND pool (kv_layout="HND") gives the NHD pool's outputs and skip
  counts bit for bit, through a shuffled page table."""
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  q, k, v, lengths, scales = ragged_cache("gpu_hnd", fp8)
  pool_k, pool_v, table = testing.paged_cache(k, v, 128)
  results = []
  for layout, pools in (("NHD", (pool_k, pool_v)),
                        ("HND", [jnp.swapaxes(x, 1, 2)
                                 for x in (pool_k, pool_v)])):
    results.append(bj.paged_decode_attention(
        q, *pools, table, lengths, threshold=threshold,
        max_mode="anchored", implementation="pallas_mosaic",
        return_stats=True, kv_layout=layout, **scales))
  assert_same_results(*results, skipping=bool(threshold))


# A persistent kernel moves the items onto fewer programs, not the
# arithmetic: outputs and counts equal the grid's bit for bit. (programs,
# splits): a program per SM over the default splits; 7 programs over 16
# splits (rounds of items, each merge waiting for splits other programs
# run); one program walking every item; one split (merged in shared
# memory). Each also with its items split-minor (`split_major=False`).
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("programs,num_splits", [
    (132, None), (7, 16), (1, 3), (5, 1)])
def test_persistent_kernel_matches_the_grid(programs, num_splits, paged,
                                            fp8):
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  q, k, v, lengths, scales = ragged_cache("gpu_persistent", fp8)
  table = None
  if paged:   # pages in shuffled order through a table
    k, v, table = testing.paged_cache(k, v, 128)
  for threshold in (0.0, 1e-3):
    for max_mode in ("anchored", "split"):
      results = []
      for build in (dict(), dict(programs=programs),
                    dict(programs=programs, split_major=False)):
        call = dict(threshold=threshold, max_mode=max_mode,
                    num_splits=num_splits, implementation="pallas_mosaic",
                    return_stats=True, **scales,
                    kernel_config=decode_mosaic.MosaicDecodeConfig(**build))
        results.append(
            bj.paged_decode_attention(q, k, v, table, lengths, **call)
            if paged else
            bj.decode_attention(q, k, v, lengths, block_kv=128, **call))
      # (Many splits skip little here: 2-7 % with 16.)
      for got in results[1:]:
        assert_same_results(results[0], got, skipping=False)
      if threshold > 0:
        assert int(jnp.sum(results[1][1].skipped_blocks)) > 0


# `merge_warpgroups` changes the order of the merge's sums, not the
# decisions: counts equal, outputs to rounding. Splits: a few (in the
# kernel and by XLA), more than the merge ring holds, persistent.
@pytest.mark.parametrize("merge_in_kernel", [True, False])
@pytest.mark.parametrize("num_splits,programs", [
    (3, None), (40, None), (16, 7)])
def test_one_part_a_split_matches_a_part_a_warpgroup(num_splits, programs,
                                                     merge_in_kernel):
  if not bj.api.is_hopper():
    pytest.skip("needs a Hopper GPU")
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  q, k, v, lengths, _ = ragged_cache("gpu_parts", False)
  results = []
  for merge_warpgroups in (False, True):
    config = decode_mosaic.MosaicDecodeConfig(
        merge_warpgroups=merge_warpgroups, programs=programs,
        merge_in_kernel=merge_in_kernel)
    results.append(bj.decode_attention(
        q, k, v, lengths, threshold=1e-3, num_splits=num_splits,
        block_kv=128, implementation="pallas_mosaic", return_stats=True,
        kernel_config=config))
  (want, want_stats), (got, stats) = results
  testing.assert_close(got, want, jnp.bfloat16)
  np.testing.assert_array_equal(stats.skipped_blocks,
                                want_stats.skipped_blocks)
  assert not bool(jnp.any(got[2])), "an empty sequence gives zeros"
  assert int(jnp.sum(stats.skipped_blocks)) > 0
