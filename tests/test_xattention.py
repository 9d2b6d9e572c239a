"""XAttention block selection and block-masked kernels (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import xattention
from blasst_jax import testing


def inputs(key, *, batch=2, seq_len=1000, q_heads=4, kv_heads=2, head_dim=32,
           dtype=jnp.float32):
  return patterns.sink_local_qkv(key, batch=batch, seq_len=seq_len,
                                 q_heads=q_heads, kv_heads=kv_heads,
                                 head_dim=head_dim, window=48,
                                 sharpness=(4.0, 12.0), dtype=dtype)


def causal_allowed(n_blocks):
  return np.tril(np.ones((n_blocks, n_blocks), bool))


def test_block_scores_match_a_direct_antidiagonal_computation():
  """Each score is the softmax mass of the strided antidiagonal sums."""
  kq, kk = jax.random.split(testing.key_for("xattn_scores"))
  b, n, h, d, stride, bs = 1, 64, 2, 8, 4, 16
  q = jax.random.normal(kq, (b, n, h, d))
  k = jax.random.normal(kk, (b, n, h, d))
  got = xattention.block_scores(q, k, block_size=bs, stride=stride,
                                causal=True, q_chunk_blocks=3)
  qn, kn = np.asarray(q[0]), np.asarray(k[0])
  groups = n // stride
  s = np.zeros((h, groups, groups))
  for i in range(groups):
    for j in range(groups):
      for t in range(stride):
        s[:, i, j] += np.einsum("hd,hd->h", qn[i * stride + stride - 1 - t],
                                kn[j * stride + t])
  s = s / np.sqrt(d) / stride
  s = np.where(np.tril(np.ones((groups, groups), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  gpb = bs // stride
  want = p.reshape(h, n // bs, gpb, n // bs, gpb).sum(axis=(2, 4))
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_threshold_one_keeps_every_causal_block(kv_heads):
  q, k, _ = inputs(testing.key_for("xattn_all", kv_heads), kv_heads=kv_heads)
  mask = xattention.select_blocks(q, k, block_size=64, stride=8,
                                  threshold=1.0, causal=True)
  assert mask.shape == (2, 4, 16, 16) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(
      mask, np.broadcast_to(causal_allowed(16), mask.shape))


def test_sink_and_diagonal_kept_nothing_above_the_diagonal():
  q, k, _ = inputs(testing.key_for("xattn_forced"))
  mask = np.asarray(xattention.select_blocks(
      q, k, block_size=64, stride=16, threshold=0.3, causal=True))
  assert mask[..., 0].all()
  assert np.diagonal(mask, axis1=2, axis2=3).all()
  assert not (mask & ~causal_allowed(16)).any()
  assert mask.mean() < 0.5 * causal_allowed(16).mean()   # It selects.
  # Without forced blocks: the fewest blocks of largest mass reaching τ.
  free = np.asarray(xattention.select_blocks(
      q, k, block_size=64, stride=16, threshold=0.3, causal=True,
      keep_sink=False, keep_diagonal=False))
  scores = np.asarray(xattention.block_scores(q, k, block_size=64, stride=16,
                                              causal=True))
  kept = np.where(free, scores, 0.0)
  total = scores.sum(-1)
  smallest = np.where(free, scores, np.inf).min(-1)
  assert (kept.sum(-1) >= 0.3 * total * (1 - 1e-5)).all()
  assert (kept.sum(-1) - smallest < 0.3 * total * (1 + 1e-5)).all()
  # Every unselected block is no heavier than the lightest selected one.
  assert (np.where(free, -np.inf, scores).max(-1) <= smallest + 1e-6).all()


def test_selection_is_monotone_in_threshold_and_reaches_its_mass():
  q, k, _ = inputs(testing.key_for("xattn_monotone"), seq_len=768)
  scores = xattention.block_scores(q, k, block_size=64, stride=8, causal=True)
  previous = None
  for tau in (0.2, 0.5, 0.8, 0.95, 1.0):
    mask = xattention.select_blocks(q, k, block_size=64, stride=8,
                                    threshold=tau, causal=True)
    kept = jnp.sum(jnp.where(mask, scores, 0.0), axis=-1)
    total = jnp.sum(scores, axis=-1)
    assert bool(jnp.all(kept >= tau * total * (1 - 1e-5)))
    if previous is not None:
      assert not bool(jnp.any(previous & ~mask))
    previous = mask


def test_per_head_thresholds():
  q, k, _ = inputs(testing.key_for("xattn_heads"))
  taus = jnp.array([0.3, 1.0, 0.6, 0.9])
  mask = xattention.select_blocks(q, k, block_size=64, threshold=taus,
                                  causal=True)
  for h, tau in enumerate(taus):
    one = xattention.select_blocks(q[:, :, h:h + 1], k[:, :, h // 2:h // 2 + 1],
                                   block_size=64, threshold=float(tau),
                                   causal=True)
    np.testing.assert_array_equal(mask[:, h], one[:, 0])


def test_kv_lengths_blocks_never_selected():
  q, k, _ = inputs(testing.key_for("xattn_len"))
  lengths = jnp.array([1000, 300])
  mask = np.asarray(xattention.select_blocks(
      q, k, block_size=64, threshold=1.0, causal=False, kv_lengths=lengths))
  assert mask[0].all()
  assert mask[1, ..., :5].all() and not mask[1, ..., 5:].any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=0), "stride"),
    (dict(block_size=60, stride=8), "block_size"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=jnp.ones((3,)) * 0.5), "threshold"),
    (dict(k=jnp.zeros((2, 64, 3, 16))), "multiple of num_kv_heads"),
    (dict(q=jnp.zeros((2, 64, 16))), "rank 4"),
])
def test_select_blocks_bad_input(kwargs, match):
  args = dict(q=jnp.zeros((2, 64, 4, 16)), k=jnp.zeros((2, 64, 2, 16)))
  args.update({n: kwargs.pop(n) for n in ("q", "k") if n in kwargs})
  with pytest.raises(ValueError, match=match):
    xattention.select_blocks(args["q"], args["k"], **kwargs)


# --- block-masked attention: kernel == oracle with the same mask ----------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_block_masked_kernel_matches_oracle(causal, kv_heads):
  q, k, v = inputs(testing.key_for("xattn_kernel", causal, kv_heads),
                   seq_len=700, kv_heads=kv_heads)
  kv_lengths = jnp.array([700, 433])
  # τ near 1 leaves light blocks for skip-softmax to prune on top.
  mask = xattention.select_blocks(q, k, block_size=64, stride=8,
                                  threshold=0.99, causal=causal,
                                  kv_lengths=kv_lengths)
  threshold = 5e-2
  out, stats = bj.attention(q, k, v, threshold=threshold, causal=causal,
                            kv_lengths=kv_lengths, block_mask=mask,
                            implementation="pallas_triton", return_stats=True)
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=64, block_kv=64, threshold=threshold, causal=causal,
      kv_lengths=kv_lengths, block_mask=mask)
  testing.assert_close(out, oracle.out, jnp.float32)
  np.testing.assert_array_equal(stats.visited_blocks,
                                oracle.stats.visited_blocks)
  # Per (batch, head) totals equal the oracle's except where a tile holds a
  # near-tie.
  near = np.asarray(testing.near_tie_tiles(
      oracle, threshold, testing.NEAR_TIE[jnp.float32])).any(axis=-1)
  differ = np.asarray(stats.skipped_blocks != oracle.stats.skipped_blocks)
  assert not (differ & ~near).any()
  assert int(jnp.sum(stats.masked_blocks)) > 0
  assert int(jnp.sum(stats.skipped_blocks)) > 0
  ref_out, ref_stats = bj.attention(
      q, k, v, threshold=threshold, causal=causal, kv_lengths=kv_lengths,
      block_mask=mask, implementation="reference", return_stats=True)
  np.testing.assert_array_equal(ref_stats.masked_blocks, stats.masked_blocks)
  testing.assert_close(out, ref_out, jnp.float32)


@pytest.mark.parametrize("impl", ["pallas_triton", "reference"])
def test_full_mask_is_no_mask_and_dense_at_zero_threshold(impl):
  q, k, v = inputs(testing.key_for("xattn_full", impl), seq_len=300)
  full = jnp.ones((2, 4, 5, 5), bool)
  out, stats = bj.attention(q, k, v, causal=True, block_mask=full,
                            implementation=impl, return_stats=True)
  dense = bj.reference.dense_attention(q, k, v, causal=True)
  testing.assert_close(out, dense, jnp.float32)
  assert int(jnp.sum(stats.masked_blocks)) == 0
  assert float(stats.combined_sparsity) == 0.0


def test_masked_blocks_change_the_output_like_the_oracle_says():
  """Dropping a block the oracle keeps changes the output: the mask bites."""
  q, k, v = inputs(testing.key_for("xattn_bites"), seq_len=256)
  mask = jnp.ones((2, 4, 4, 4), bool).at[:, :, 3, 1].set(False)
  out = bj.attention(q, k, v, block_mask=mask, implementation="pallas_triton")
  dense = bj.reference.dense_attention(q, k, v)
  diff = jnp.abs(out - dense).max(axis=(0, 2, 3))             # per position
  assert float(diff[:192].max()) < 1e-5 and float(diff[192:].max()) > 1e-4


def test_block_mask_gradients_follow_the_oracle():
  q, k, v = inputs(testing.key_for("xattn_grad"), seq_len=128, batch=1)
  mask = jnp.ones((1, 4, 2, 2), bool).at[:, 1, 1, 0].set(False)
  loss = lambda impl: lambda q: jnp.sum(bj.attention(  # pylint: disable=g-long-lambda
      q, k, v, block_mask=mask, threshold=1e-3, implementation=impl) ** 2)
  g_kernel = jax.grad(loss("pallas_triton"))(q)
  g_ref = jax.grad(loss("reference"))(q)
  np.testing.assert_allclose(g_kernel, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask,match", [
    (jnp.ones((2, 4, 3, 5), bool), "n_q_tiles"),
    (jnp.ones((2, 4, 5, 5), jnp.int32), "bool"),
    (jnp.ones((2, 4, 5), bool), "block_mask"),
])
def test_bad_block_mask_raises(mask, match):
  q, k, v = inputs(testing.key_for("xattn_bad"), seq_len=300)
  with pytest.raises(ValueError, match=match):
    bj.attention(q, k, v, block_mask=mask, block_q=64, block_kv=64,
                 implementation="pallas_triton")


def test_mask_block_size_inferred_and_small_tiles_refused_by_mosaic():
  q, k, v = inputs(testing.key_for("xattn_infer"), seq_len=1000)
  mask = xattention.select_blocks(q, k, block_size=128, threshold=0.9,
                                  causal=True)
  out = bj.attention(q, k, v, causal=True, block_mask=mask,
                     implementation="reference")
  oracle = bj.reference.blockwise_attention(q, k, v, block_q=128,
                                            block_kv=128, causal=True,
                                            block_mask=mask)
  np.testing.assert_array_equal(out, oracle.out)
  # 32-row tiles: the Hopper kernel's wgmma tiles are 64 x 64.
  q = jnp.zeros((2, 1000, 4, 64), jnp.bfloat16)
  k = jnp.zeros((2, 1000, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="64x64 wgmma tiles"):
    bj.attention(q, k, k, causal=True,
                 block_mask=jnp.ones((2, 4, 32, 32), bool),
                 implementation="pallas_mosaic", interpret=True)
