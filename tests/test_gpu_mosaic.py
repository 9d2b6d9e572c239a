"""Mosaic GPU kernel on a GPU (marker `gpu`): against the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import testing
from tests import test_base

pytestmark = pytest.mark.gpu

SHAPES = (
    testing.AttentionShape(batch=2, q_len=2048, kv_len=2048, q_heads=4, kv_heads=4, head_dim=128),
    testing.AttentionShape(batch=1, q_len=1000, kv_len=1500, q_heads=4, kv_heads=2, head_dim=128),
    testing.AttentionShape(batch=2, q_len=512, kv_len=512, q_heads=2, kv_heads=1, head_dim=64),
    testing.AttentionShape(batch=1, q_len=512, kv_len=640, q_heads=2, kv_heads=2, head_dim=256),
)


@pytest.mark.parametrize("threshold", [0.0, 1e-2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_mosaic_matches_oracle(shape, causal, threshold):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16
  q, k, v = shape.inputs(test_base.key_for("mosaic", shape, causal),
                         dtype=dtype)
  kv_lengths = jnp.array([shape.kv_len - 29 * i for i in range(shape.batch)],
                         jnp.int32)
  bq, bkv = 64, (128 if shape.head_dim < 256 else 64)
  lam = jnp.full((shape.batch,), threshold, jnp.float32)
  out, lse, skipped, visited = pallas_mosaic.attention_forward(
      q, k, v, kv_lengths, config_lib.log_threshold(lam), causal=causal,
      sm_scale=shape.head_dim ** -0.5, block_q=bq, block_kv=bkv,
      skip_enabled=threshold > 0)
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=bq, block_kv=bkv, threshold=threshold, causal=causal,
      kv_lengths=kv_lengths)
  nq = oracle.skip_mask.shape[2]
  np.testing.assert_array_equal(np.asarray(visited[..., :nq]),
                                np.asarray(jnp.sum(oracle.visited_mask, -1)))
  test_base.assert_skips_match(skipped[..., :nq], oracle, threshold, dtype)
  test_base.assert_close(out, oracle.out, dtype)
  test_base.assert_lse_close(lse, oracle.lse, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_through_the_api(causal):
  shape = testing.AttentionShape(batch=2, q_len=1024, kv_len=1024, q_heads=4,
                                 kv_heads=2, head_dim=128)
  q, k, v = shape.inputs(test_base.key_for("mosaic_api", causal),
                         dtype=jnp.bfloat16)
  common = dict(threshold=1e-2, causal=causal, return_stats=True)
  out, stats = bj.attention(q, k, v, implementation="pallas_mosaic", **common)
  ref, ref_stats = bj.attention(q, k, v, implementation="reference",
                                block_q=64, block_kv=128, **common)
  test_base.assert_close(out, ref, jnp.bfloat16)
  np.testing.assert_array_equal(stats.visited_blocks,
                                ref_stats.visited_blocks)
  assert int(jnp.sum(jnp.abs(stats.skipped_blocks
                             - ref_stats.skipped_blocks))) <= 2
  g = jax.grad(lambda q: jnp.sum(bj.attention(
      q, k, v, threshold=1e-2, causal=causal,
      implementation="pallas_mosaic").astype(jnp.float32) ** 2))(q)
  assert g.shape == q.shape and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_block_masked_mosaic_matches_oracle(shape, causal):
  """Per-tile lists that differ within a program (a tile of one block next
  to a fuller one), GQA, ragged lengths."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  dtype, threshold = jnp.bfloat16, 1e-2
  key = test_base.key_for("mosaic_masked", shape, causal)
  q, k, v = shape.inputs(key, dtype=dtype)
  kv_lengths = jnp.array([shape.kv_len - 29 * i for i in range(shape.batch)],
                         jnp.int32)
  bq, bkv = 64, pallas_mosaic.default_block_kv(shape.head_dim)
  nq, nk = -(-shape.q_len // bq), -(-shape.kv_len // bkv)
  mask = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5,
                              (shape.batch, shape.q_heads, nq, nk))
  mask = mask.at[..., 0].set(True)
  mask = mask.at[:, :, 1::4].set(False).at[:, :, 1::4, 0].set(True)
  lam = jnp.full((shape.batch,), threshold, jnp.float32)
  out, lse, skipped, visited = pallas_mosaic.attention_forward(
      q, k, v, kv_lengths, config_lib.log_threshold(lam), mask, causal=causal,
      sm_scale=shape.head_dim ** -0.5, block_q=bq, block_kv=bkv)
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=bq, block_kv=bkv, threshold=threshold, causal=causal,
      kv_lengths=kv_lengths, block_mask=mask)
  np.testing.assert_array_equal(np.asarray(visited),
                                np.asarray(jnp.sum(oracle.visited_mask, -1)))
  test_base.assert_skips_match(skipped, oracle, threshold, dtype)
  test_base.assert_close(out, oracle.out, dtype)
  test_base.assert_lse_close(lse, oracle.lse, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_xattention_mask_runs_on_mosaic_by_default(causal, monkeypatch):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  shape = testing.AttentionShape(batch=2, q_len=1024, kv_len=1024, q_heads=4,
                                 kv_heads=2, head_dim=128)
  q, k, v = shape.inputs(test_base.key_for("mosaic_xattn", causal),
                         dtype=jnp.bfloat16)
  mask = bj.xattention.select_blocks(q, k, block_size=64, stride=8,
                                     threshold=0.95, causal=causal)
  calls = []
  forward = pallas_mosaic.attention_forward
  monkeypatch.setattr(pallas_mosaic, "attention_forward",
                      lambda *a, **kw: calls.append(1) or forward(*a, **kw))
  common = dict(threshold=1e-2, causal=causal, block_mask=mask,
                return_stats=True)
  out, stats = bj.attention(q, k, v, **common)
  assert calls, "implementation=None did not pick pallas_mosaic"
  ref, ref_stats = bj.attention(q, k, v, implementation="reference", **common)
  test_base.assert_close(out, ref, jnp.bfloat16)
  np.testing.assert_array_equal(stats.visited_blocks,
                                ref_stats.visited_blocks)
  np.testing.assert_array_equal(stats.masked_blocks, ref_stats.masked_blocks)
  assert int(jnp.sum(stats.masked_blocks)) > 0
  assert int(jnp.sum(jnp.abs(stats.skipped_blocks
                             - ref_stats.skipped_blocks))) <= 2


@pytest.mark.parametrize("fuse_dq", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mosaic_backward_matches_oracle_autodiff(head_dim, causal, fuse_dq):
  """Both dQ strategies at both head sizes: GQA, ragged lengths (one not a
  multiple of 64), a random keep mask."""
  from tests import test_backward  # pylint: disable=g-import-not-at-top
  test_backward.check_hopper_backward(
      batch=2, length=1000, q_heads=4, kv_heads=2, head_dim=head_dim,
      kv_lengths=(1000, 613), causal=causal, fuse_dq=fuse_dq)


@pytest.mark.parametrize("copy_v_if_kept", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_skip_structures_match_oracle_at_high_sparsity(
    causal, copy_v_if_kept):
  """Most blocks skipped by both tiles (so most V copies are elided, or
  all streamed): outputs, lse and skip counts follow the oracle."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  shape = testing.AttentionShape(batch=2, q_len=1536, kv_len=1536, q_heads=9,
                                 kv_heads=3, head_dim=64)
  q, k, v = shape.inputs(test_base.key_for("mosaic_v", causal),
                         dtype=jnp.bfloat16, sharpness=(16.0, 24.0))
  kv_lengths = jnp.array([1536, 1500], jnp.int32)
  lam = jnp.full((2,), 0.3, jnp.float32)
  out, lse, skipped, visited = pallas_mosaic.attention_forward(
      q, k, v, kv_lengths, config_lib.log_threshold(lam), causal=causal,
      sm_scale=0.125, block_q=64, block_kv=128,
      config=pallas_mosaic.MosaicConfig(copy_v_if_kept=copy_v_if_kept))
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=64, block_kv=128, threshold=0.3, causal=causal,
      kv_lengths=kv_lengths)
  assert float(jnp.sum(skipped)) > 0.5 * float(jnp.sum(visited))
  test_base.assert_skips_match(skipped, oracle, 0.3, jnp.bfloat16)
  test_base.assert_close(out, oracle.out, jnp.bfloat16)
  test_base.assert_lse_close(lse, oracle.lse, atol=5e-2, rtol=1e-2)


def test_mosaic_initial_max_chains_key_parts_on_gpu():
  from tests import test_pallas_triton  # pylint: disable=g-import-not-at-top
  test_pallas_triton.check_initial_max_chaining(
      "pallas_mosaic", seq_len=1024, cut=512, dtype=jnp.bfloat16, tol=2e-2,
      block_q=64, block_kv=128, head_dim=128, max_tol=1e-5)
