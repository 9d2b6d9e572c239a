"""Decode attention on CPU: the portable kernel (interpret mode) through the
shared decode suite, and checks of the decode oracle's max modes, split
counts and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import testing
from blasst_jax.ops import base as ops_base
from tests import test_base



class TestPallasTritonDecode(test_base.DecodeTestBase):
  implementation = "pallas_triton"
  fp8_itemsize = 2   # FP8 pages are widened to the query's dtype first


def cache_inputs(key, *, batch=3, max_len=320, q_heads=8, kv_heads=2,
                 head_dim=32):
  """q [b, hq, d] for the last position, caches with sink + local scores."""
  return testing.DecodeShape(batch=batch, q_heads=q_heads, kv_heads=kv_heads,
                             max_len=max_len, head_dim=head_dim).inputs(key)


MODES = bj.decode.MAX_MODES


@pytest.mark.parametrize("implementation", [None, "pallas_triton",
                                            "pallas_mosaic"])
@pytest.mark.parametrize("batch,kv_heads,max_len", [
    (8, 8, 32768), (1, 8, 131072), (64, 8, 4096), (3, 2, 1000), (1, 1, 256)])
def test_default_splits_fill_one_wave(batch, kv_heads, max_len,
                                      implementation):
  splits = bj.decode.default_num_splits(batch, kv_heads, max_len, 128,
                                        num_sms=132,
                                        implementation=implementation)
  per_sm = (bj.decode.PROGRAMS_PER_SM if implementation is None else
            ops_base.get_op("decode", implementation).programs_per_sm)
  slots = per_sm * 132
  blocks = -(-max_len // 128)
  assert splits >= 1 and splits * bj.decode.MIN_BLOCKS_PER_SPLIT <= max(
      blocks, bj.decode.MIN_BLOCKS_PER_SPLIT)
  if batch * kv_heads <= slots:
    assert batch * kv_heads * splits <= slots
    # One more split would overflow the wave or the blocks.
    assert (batch * kv_heads * (splits + 1) > slots
            or (splits + 1) * bj.decode.MIN_BLOCKS_PER_SPLIT > blocks)
  else:
    assert splits == 1


def test_each_implementation_fills_its_own_wave():
  # The Hopper kernel holds one program per SM, the Triton kernel two: at
  # one sequence of 128k with 8 KV heads the defaults differ twofold.
  split = lambda impl: bj.decode.default_num_splits(  # pylint: disable=g-long-lambda
      1, 8, 131072, 128, num_sms=132, implementation=impl)
  assert split("pallas_mosaic") == 16
  assert split("pallas_triton") == split(None) == 33


def test_v_prefetch_and_branch_loads_agree():
  """The software-pipelined skip loop against the plain one (both kernels)."""
  from blasst_jax.kernels import decode_triton  # pylint: disable=g-import-not-at-top
  q, k, v = cache_inputs(testing.key_for("decode_prefetch"), max_len=288)
  v = v.at[2, 150:].set(jnp.nan)   # Garbage past the length must not leak.
  kv_lengths = jnp.array([288, 31, 150], jnp.int32)
  results = [bj.decode_attention(
      q, k, v, kv_lengths, threshold=3e-2, block_kv=32, num_splits=2,
      max_mode="anchored", implementation="pallas_triton", return_stats=True,
      kernel_config=decode_triton.DecodeConfig(prefetch_v=prefetch))
             for prefetch in (False, True)]
  (out_a, stats_a), (out_b, stats_b) = results
  assert bool(jnp.all(jnp.isfinite(out_b)))
  np.testing.assert_allclose(out_a, out_b, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(stats_a.skipped_blocks, stats_b.skipped_blocks)
  assert int(jnp.sum(stats_b.skipped_blocks)) > 0


def test_more_splits_skip_less_unless_the_max_is_shared():
  q, k, v = cache_inputs(testing.key_for("decode_splits"), max_len=512)
  lengths = jnp.array([512, 400, 300], jnp.int32)
  sparsity = {}
  for mode in MODES:
    for splits in (1, 8):
      _, stats = bj.decode_attention(
          q, k, v, lengths, threshold=1e-2, block_kv=32, num_splits=splits,
          max_mode=mode, implementation="reference", return_stats=True)
      sparsity[mode, splits] = float(stats.total_sparsity)
  assert sparsity["split", 8] < sparsity["split", 1]
  assert (sparsity["global", 8] == sparsity["global", 1]
          >= sparsity["split", 1])
  # The sink and the recent tokens hold every row's max here: the anchors
  # give every split the global max.
  assert sparsity["anchored", 8] == sparsity["global", 8]


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_skip_sets_nest_split_anchored_global(num_splits):
  """Each mode's reference max bounds the next one's from below, so its skips
  are a subset: split ⊆ anchored ⊆ global, for any inputs."""
  key = testing.key_for("decode_nest", num_splits)
  kq, kk, kv, kl = jax.random.split(key, 4)
  # Unstructured scores: the anchors usually do not hold the max.
  q = jax.random.normal(kq, (4, 6, 16)) * 3.0
  k = jax.random.normal(kk, (4, 200, 3, 16))
  v = jax.random.normal(kv, (4, 200, 3, 16))
  lengths = jax.random.randint(kl, (4,), 0, 201).at[0].set(200)
  masks = {
      mode: bj.reference.blockwise_decode_attention(
          q, k, v, lengths, block_kv=16, threshold=0.05,
          num_splits=num_splits, max_mode=mode).skip_mask
      for mode in MODES}
  assert not bool(jnp.any(masks["split"] & ~masks["anchored"]))
  assert not bool(jnp.any(masks["anchored"] & ~masks["global"]))
  assert int(masks["global"].sum()) > 0


def _masked_scores(q, k, kv_lengths):
  """f32 [b, kv_heads, group, max_len]: sm_scale·q·kᵀ, -inf past lengths."""
  b, hq, d = q.shape
  _, max_len, hkv, _ = k.shape
  s = jnp.einsum("bhgd,bkhd->bhgk", q.reshape(b, hkv, hq // hkv, d), k,
                 precision=jax.lax.Precision.HIGHEST) / np.sqrt(d)
  return jnp.where(jnp.arange(max_len) < kv_lengths[:, None, None, None], s,
                   -jnp.inf)


def test_split_walk_from_the_anchors_is_the_anchored_walk():
  q, k, v = cache_inputs(testing.key_for("decode_anchor_start"))
  kv_lengths = jnp.array([320, 177, 1], jnp.int32)
  opts = dict(block_kv=32, threshold=0.05, num_splits=3)
  anchored = bj.reference.blockwise_decode_attention(
      q, k, v, kv_lengths, max_mode="anchored", **opts)
  m_blk = jnp.max(_masked_scores(q, k, kv_lengths).reshape(3, 2, 4, 10, 32),
                  axis=-1)
  start = bj.reference.decode_anchor_max(m_blk, kv_lengths, 32).reshape(3, 8)
  split = bj.reference.blockwise_decode_attention(
      q, k, v, kv_lengths, max_mode="split", initial_max=start, **opts)
  np.testing.assert_array_equal(split.skip_mask, anchored.skip_mask)
  np.testing.assert_allclose(split.out, anchored.out, atol=1e-6)
  assert int(anchored.skip_mask.sum()) > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=jnp.zeros((2, 3, 4, 32))), "one token"),
    (dict(q=jnp.zeros((2, 32))), r"\[batch, q_heads, head_dim\]"),
    (dict(kv_lengths=None), "kv_lengths.*required"),
    (dict(kv_lengths=jnp.zeros((3,), jnp.int32)), "kv_lengths"),
    (dict(kv_lengths=jnp.zeros((2,), jnp.float32)), "kv_lengths"),
    (dict(k=jnp.zeros((2, 64, 3, 32))), "multiple of num_kv_heads"),
    (dict(q=jnp.zeros((2, 4, 32), jnp.bfloat16)), "dtype"),
    (dict(threshold=1.5), "threshold"),
    (dict(num_splits=0), "num_splits"),
    (dict(block_kv=48), "block_kv"),
    (dict(max_mode="shared"), "max_mode"),
    (dict(implementation="pallas_mosaic"), "implementation"),
])
def test_bad_input_raises_clear_errors(kwargs, match):
  args = dict(q=jnp.zeros((2, 4, 32)), k=jnp.zeros((2, 64, 2, 32)),
              v=jnp.zeros((2, 64, 2, 32)), kv_lengths=jnp.array([64, 3]))
  opts = {n: kwargs.pop(n) for n in list(kwargs) if n not in args}
  args.update(kwargs)
  if args["k"].shape != args["v"].shape:
    args["v"] = jnp.zeros(args["k"].shape)
  with pytest.raises(ValueError, match=match):
    bj.decode_attention(args["q"], args["k"], args["v"], args["kv_lengths"],
                        implementation=opts.pop("implementation",
                                                "pallas_triton"), **opts)


def test_bad_page_table_raises():
  with pytest.raises(ValueError, match="page_table"):
    bj.paged_decode_attention(jnp.zeros((2, 4, 32)), jnp.zeros((8, 16, 2, 32)),
                              jnp.zeros((8, 16, 2, 32)),
                              jnp.zeros((2, 4), jnp.float32),
                              jnp.array([10, 20]))


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_heads_first_pools_read_as_their_nhd_copy(implementation):
  """kv_layout="HND" pools [pages, kv_heads, page_size, d] give the NHD
  pool's outputs and stats bit for bit (these ops read an NHD copy)."""
  q, k, v = cache_inputs(testing.key_for("decode_hnd", implementation),
                         batch=2, max_len=256)
  kv_lengths = jnp.array([256, 150])
  pool_k, pool_v, table = testing.paged_cache(k, v, 32)
  options = dict(threshold=1e-2, num_splits=2, return_stats=True,
                 implementation=implementation)
  out, stats = bj.paged_decode_attention(q, pool_k, pool_v, table,
                                         kv_lengths, **options)
  hnd = lambda x: jnp.swapaxes(x, 1, 2)  # pylint: disable=g-long-lambda
  out_h, stats_h = bj.paged_decode_attention(
      q, hnd(pool_k), hnd(pool_v), table, kv_lengths, kv_layout="HND",
      **options)
  assert 0 < float(stats.total_sparsity) < 1
  np.testing.assert_array_equal(np.asarray(out_h), np.asarray(out))
  for a, b in zip(jax.tree.leaves(stats_h), jax.tree.leaves(stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kv_layout,v_shape,match", [
    ("NHWC", (8, 16, 2, 32), "kv_layout"),
    ("HND", (8, 2, 16), "num_pages, kv_heads, page_size, head_dim"),
    ("NHD", (8, 2, 16, 32), "same shape"),
])
def test_bad_kv_layout_raises(kv_layout, v_shape, match):
  with pytest.raises(ValueError, match=match):
    bj.paged_decode_attention(
        jnp.zeros((2, 4, 32)), jnp.zeros((8, 16, 2, 32)), jnp.zeros(v_shape),
        jnp.zeros((2, 4), jnp.int32), jnp.array([10, 20]),
        kv_layout=kv_layout)


def test_decode_kernel_lowers_for_cuda():
  from blasst_jax.kernels import decode_triton  # pylint: disable=g-import-not-at-top
  sds = jax.ShapeDtypeStruct
  for mode in MODES:
    for initial_max in ((), (sds((2, 8, 16), jnp.float32),)):
      fn = lambda *a, mode=mode: decode_triton.decode_partials(  # pylint: disable=g-long-lambda
          *a, group=4, sm_scale=0.1, num_splits=4, max_mode=mode)
      lowered = testing.lower_for_h100(
          fn, sds((2, 8, 16, 128), jnp.bfloat16),
          sds((64, 64, 8, 128), jnp.bfloat16),
          sds((64, 64, 8, 128), jnp.bfloat16), sds((2, 32), jnp.int32),
          sds((2,), jnp.int32), sds((2,), jnp.float32), *initial_max)
      assert lowered.as_text().count("blasst_decode") >= 1


def test_scattered_pattern_keeps_isolated_hit_blocks():
  """The decode benchmark's scattered cache: far from the sink and the
  window, a λ keeps mostly the blocks holding a hit, in short runs, and a
  larger λ keeps a subset of them."""
  block, n_blocks = 32, 64
  q, k, v = patterns.scattered_qkv(
      testing.key_for("scattered"), batch=2, seq_len=block * n_blocks,
      q_heads=4, kv_heads=2, head_dim=32, block=block, density=0.3)
  q, lengths = q[:, -1], jnp.full((2,), block * n_blocks, jnp.int32)
  hit = np.asarray(k[..., -1], np.float32).reshape(
      2, n_blocks, block, 2).max(axis=2).transpose(0, 2, 1) > 0  # [b, hkv, n]
  kept = {}
  for threshold in (1e-3, 1e-1):
    oracle = bj.reference.blockwise_decode_attention(
        q, k, v, lengths, block_kv=block, threshold=threshold, num_splits=1,
        max_mode="anchored")
    kept[threshold] = ~np.asarray(oracle.skip_mask)
  far = slice(1, n_blocks - 4)   # past the sink block, before the window
  far_kept = kept[1e-3][..., far]
  # (Far blocks without a hit still see the window's cosine side lobes.)
  hits = hit[..., far]
  assert far_kept[hits].mean() > 4 * far_kept[~hits].mean()
  assert (kept[1e-1] <= kept[1e-3]).all()
  assert kept[1e-1][..., far].sum() < far_kept.sum()
  # Short runs: most kept far blocks have a skipped neighbour.
  far_kept = far_kept.astype(int)
  runs = np.count_nonzero(np.diff(far_kept, axis=-1) == 1)
  assert far_kept.sum() > 8 and far_kept.sum() / max(runs, 1) < 2.0
