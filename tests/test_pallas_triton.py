"""The portable Pallas kernel (interpret mode on CPU): the shared suite, and
per-tile skip decisions against the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import patterns
from blasst_jax import reference
from blasst_jax import testing
from blasst_jax.kernels import pallas_triton
from tests import test_base


class TestPallasTriton(test_base.AttentionTestBase):
  implementation = "pallas_triton"


def run_kernel(q, k, v, threshold, *, causal, block_q, block_kv,
               kv_lengths=None, config=pallas_triton.TritonConfig()):
  b, lk = q.shape[0], k.shape[1]
  kv_lengths = bj.reference.kv_lengths_or_full(kv_lengths, b, lk)
  lam = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (b,))
  return pallas_triton.attention_forward(
      q, k, v, kv_lengths, config_lib.log_threshold(lam), causal=causal,
      sm_scale=q.shape[-1] ** -0.5, block_q=block_q, block_kv=block_kv,
      config=config, interpret=True)


@pytest.mark.parametrize("load_v_in_branch", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_per_tile_skips_and_lse_match_oracle(causal, load_v_in_branch):
  shape = testing.AttentionShape(batch=2, q_len=120, kv_len=250, q_heads=4,
                                 kv_heads=2, head_dim=32)
  q, k, v = shape.inputs(test_base.key_for("tiles", causal),
                         sharpness=(4.0, 10.0, 18.0), window=12)
  kv_lengths = jnp.array([250, 131], jnp.int32)
  threshold = jnp.array([0.03, 0.003])
  out, lse, skipped, visited = run_kernel(
      q, k, v, threshold, causal=causal, block_q=32, block_kv=16,
      kv_lengths=kv_lengths,
      config=pallas_triton.TritonConfig(load_v_in_branch=load_v_in_branch))
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=32, block_kv=16, threshold=threshold, causal=causal,
      kv_lengths=kv_lengths)
  np.testing.assert_array_equal(visited, jnp.sum(oracle.visited_mask, -1))
  assert int(jnp.sum(skipped)) > 0
  test_base.assert_skips_match(skipped, oracle, threshold, jnp.float32)
  if not bool(jnp.any(test_base.near_tie_tiles(oracle, threshold, 1e-3))):
    test_base.assert_close(out, oracle.out, jnp.float32)
    np.testing.assert_allclose(lse, oracle.lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("with_block_mask", [False, True])
def test_recorded_skip_mask_is_the_oracles(with_block_mask):
  """The per-block skip decisions the backward reuses."""
  shape = testing.AttentionShape(batch=2, q_len=200, kv_len=200, q_heads=2,
                                 kv_heads=1, head_dim=32)
  key = test_base.key_for("skip_mask", with_block_mask)
  q, k, v = shape.inputs(key, sharpness=(6.0, 16.0), window=12)
  kv_lengths = jnp.array([200, 117], jnp.int32)
  threshold = jnp.array([0.02, 0.005])
  block_mask = None
  if with_block_mask:
    block_mask = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.7,
                                      (2, 2, 7, 13)).at[..., 0].set(True)
  lam = config_lib.log_threshold(threshold)
  args = (q, k, v, kv_lengths, lam) + (
      () if block_mask is None else (block_mask,))
  *_, skipped, _, skip_mask = pallas_triton.attention_forward(
      *args, causal=True, sm_scale=32 ** -0.5, block_q=32, block_kv=16,
      interpret=True, return_skip_mask=True)
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=32, block_kv=16, threshold=threshold, causal=True,
      kv_lengths=kv_lengths, block_mask=block_mask)
  assert skip_mask.shape == oracle.skip_mask.shape
  assert int(jnp.sum(skip_mask)) > 0
  np.testing.assert_array_equal(jnp.sum(skip_mask, -1), skipped)
  near = test_base.near_tie_tiles(oracle, threshold, 1e-3)
  differ = jnp.any(skip_mask != oracle.skip_mask, axis=-1)
  assert not bool(jnp.any(differ & ~near))


def test_head_dim_padding_and_short_sequences():
  # head_dim 24 is padded to 32; 5 queries and 9 keys fit one 16-row tile.
  q, k, v = testing.AttentionShape(1, 5, 9, 2, 1, 24).inputs(
      test_base.key_for("tiny"), pattern="random")
  out = bj.attention(q, k, v, implementation="pallas_triton", causal=True)
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  test_base.assert_close(out, expected, jnp.float32)


def test_interpret_flag_is_explicit():
  q, k, v = testing.CPU_TEST_SHAPES[0].inputs(test_base.key_for("interp"))
  out = bj.attention(q, k, v, implementation="pallas_triton", interpret=True,
                     block_q=64, block_kv=64)
  test_base.assert_close(out, bj.reference.dense_attention(q, k, v),
                         jnp.float32)


@pytest.mark.parametrize("threshold", [0.0, 0.02])
def test_gradients_of_the_sparse_forward(threshold):
  shape = testing.CPU_TEST_SHAPES[1]
  q, k, v = shape.inputs(test_base.key_for("grad", threshold),
                         sharpness=10.0, window=8)

  def loss(impl, q, k, v):
    out = bj.attention(q, k, v, threshold=threshold, causal=True,
                       implementation=impl, block_q=32, block_kv=32)
    return jnp.sum(jnp.sin(out))

  grads = jax.jit(jax.grad(lambda *a: loss("pallas_triton", *a),
                           argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(
      q, k, v)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)
  if threshold == 0.0:
    dense = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
        jax.nn.dot_product_attention(q, k, v, is_causal=True))),
                     argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, dense):
      np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)


def test_static_zero_threshold_uses_the_dense_build():
  q, k, v = testing.CPU_TEST_SHAPES[1].inputs(test_base.key_for("static0"))
  common = dict(causal=True, block_q=32, block_kv=32, return_stats=True,
                implementation="pallas_triton")
  out_static, stats_static = bj.attention(q, k, v, threshold=0.0, **common)
  out_traced, stats_traced = jax.jit(
      lambda t: bj.attention(q, k, v, threshold=t, **common))(jnp.float32(0))
  test_base.assert_close(out_static, out_traced, jnp.float32)
  assert int(jnp.sum(stats_static.skipped_blocks)) == 0
  np.testing.assert_array_equal(stats_static.visited_blocks,
                                stats_traced.visited_blocks)
  text = jax.jit(lambda: bj.attention(q, k, v, threshold=0.0, **common)
                 ).trace().jaxpr.pretty_print()
  assert " cond[" not in text and "while[" in text


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_return_lse_matches_dense_lse(implementation):
  q, k, v = patterns.sink_local_qkv(jax.random.PRNGKey(31), batch=2,
                                    seq_len=48, q_heads=4, kv_heads=2,
                                    head_dim=32)
  kv_lengths = jnp.asarray([48, 0], jnp.int32)   # the second row sees none
  (out, lse), stats = bj.attention(
      q, k, v, causal=True, kv_lengths=kv_lengths, block_q=16, block_kv=16,
      implementation=implementation, return_lse=True, return_stats=True)
  want, want_lse = reference.dense_attention(
      q, k, v, causal=True, kv_lengths=kv_lengths, return_lse=True)
  assert lse.shape == (2, 4, 48) and lse.dtype == jnp.float32
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse[0], want_lse[0], atol=1e-4, rtol=1e-5)
  assert bool(jnp.all(lse[1] == -jnp.inf)) and not jnp.any(jnp.isnan(out))
  assert int(jnp.sum(stats.visited_blocks[1])) == 0


def check_initial_max_chaining(implementation, *, seq_len=128, cut=48,
                               dtype=jnp.float32, interpret=None, tol=2e-5,
                               block_q=32, block_kv=16, head_dim=32,
                               max_tol=1e-4):
  """Two calls over consecutive key parts, the second started from the
  first's final row max, skip what one call over all keys skips; merged by
  lse they give its output. Without the start the second part skips less.
  The final max is the row max of all scores (a skipped block never holds
  a larger one)."""
  from blasst_jax import sharding  # pylint: disable=g-import-not-at-top
  b, hq, hkv, d = 2, 4, 2, head_dim
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(28), batch=b, seq_len=seq_len, q_heads=hq,
      kv_heads=hkv, head_dim=d, window=24, sharpness=(4.0, 12.0, 20.0),
      dtype=dtype)
  opts = dict(block_q=block_q, block_kv=block_kv, threshold=0.05,
              return_stats=True,
              implementation=implementation, interpret=interpret)
  want, want_stats = bj.attention(q, k, v, **opts)
  start = jnp.full((b, hq, seq_len), -jnp.inf)
  (out0, lse0, max0), stats0 = bj.attention(
      q, k[:, :cut], v[:, :cut], return_lse=True, initial_max=start, **opts)
  (out1, lse1, max1), stats1 = bj.attention(
      q, k[:, cut:], v[:, cut:], return_lse=True, initial_max=max0, **opts)
  _, alone = bj.attention(q, k[:, cut:], v[:, cut:], **opts)
  np.testing.assert_array_equal(
      stats0.skipped_blocks + stats1.skipped_blocks, want_stats.skipped_blocks)
  assert bool(jnp.all(alone.skipped_blocks <= stats1.skipped_blocks))
  assert int(jnp.sum(alone.skipped_blocks)) < int(jnp.sum(
      stats1.skipped_blocks))
  merged = sharding.merge_parts(jnp.stack([out0, out1]),
                                jnp.swapaxes(jnp.stack([lse0, lse1]), 2, 3))
  np.testing.assert_allclose(merged, want.astype(jnp.float32), atol=tol,
                             rtol=tol)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                 jnp.repeat(k, hq // hkv, axis=2).astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * d ** -0.5
  np.testing.assert_allclose(max1, jnp.max(s, axis=-1), rtol=max_tol,
                             atol=max_tol)


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_initial_max_chains_key_parts_like_one_call(implementation):
  check_initial_max_chaining(implementation)
