"""Mosaic GPU kernel on a GPU (marker `gpu`): the shared suites compiled, the
API's choice of it, and its high-sparsity builds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import testing
from tests import test_base

pytestmark = pytest.mark.gpu

# The checks through the public API (GQA, head_dim 128).
API_SHAPE = testing.AttentionShape(batch=2, q_len=1024, kv_len=1024,
                                   q_heads=4, kv_heads=2, head_dim=128)


class TestMosaicGpu(test_base.AttentionTestBase):
  """The shared suite, compiled (bf16), on the kernel's default tiles."""

  implementation = "pallas_mosaic"
  shapes = testing.GPU_TEST_SHAPES
  mask_shapes = testing.GPU_TEST_SHAPES
  dtype = jnp.bfloat16
  low_precision_dtypes = (jnp.float16,)
  interpret = False

  def tiles_for(self, shape):
    from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
    return 64, pallas_mosaic.default_block_kv(shape.head_dim)


class TestMosaicGpuGradients(test_base.WideGradientTestBase):
  """The gradient suite compiled (forward and Hopper backward), bf16 on
  64 x 64 tiles."""

  implementation = "pallas_mosaic"
  interpret = False


@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_through_the_api(causal):
  shape = API_SHAPE
  q, k, v = shape.inputs(testing.key_for("mosaic_api", causal),
                         dtype=jnp.bfloat16)
  common = dict(threshold=1e-2, causal=causal, return_stats=True)
  out, stats = bj.attention(q, k, v, implementation="pallas_mosaic", **common)
  ref, ref_stats = bj.attention(q, k, v, implementation="reference",
                                block_q=64, block_kv=128, **common)
  testing.assert_close(out, ref, jnp.bfloat16)
  np.testing.assert_array_equal(stats.visited_blocks,
                                ref_stats.visited_blocks)
  assert int(jnp.sum(jnp.abs(stats.skipped_blocks
                             - ref_stats.skipped_blocks))) <= 2
  g = jax.grad(lambda q: jnp.sum(bj.attention(
      q, k, v, threshold=1e-2, causal=causal,
      implementation="pallas_mosaic").astype(jnp.float32) ** 2))(q)
  assert g.shape == q.shape and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("causal", [False, True])
def test_xattention_mask_runs_on_mosaic_by_default(causal, monkeypatch):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  shape = API_SHAPE
  q, k, v = shape.inputs(testing.key_for("mosaic_xattn", causal),
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
  testing.assert_close(out, ref, jnp.bfloat16)
  np.testing.assert_array_equal(stats.visited_blocks,
                                ref_stats.visited_blocks)
  np.testing.assert_array_equal(stats.masked_blocks, ref_stats.masked_blocks)
  assert int(jnp.sum(stats.masked_blocks)) > 0
  assert int(jnp.sum(jnp.abs(stats.skipped_blocks
                             - ref_stats.skipped_blocks))) <= 2


@pytest.mark.parametrize("copy_v_if_kept", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_skip_structures_match_oracle_at_high_sparsity(
    causal, copy_v_if_kept):
  """Most blocks skipped by both tiles (so most V copies are elided, or
  all streamed): outputs, lse and skip counts follow the oracle."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  shape = testing.AttentionShape(batch=2, q_len=1536, kv_len=1536, q_heads=9,
                                 kv_heads=3, head_dim=64)
  q, k, v = shape.inputs(testing.key_for("mosaic_v", causal),
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
  testing.assert_skips_match(skipped, oracle, 0.3, jnp.bfloat16)
  testing.assert_close(out, oracle.out, jnp.bfloat16)
  testing.assert_lse_close(lse, oracle.lse, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("head_dim,causal", [(64, True), (128, False),
                                             (128, True)])
def test_mosaic_clusters_match_single_programs(head_dim, causal, skip):
  """`cluster_q=2` (K/V multicast to two programs along q, slots released
  through cluster barriers) computes what single programs compute, bit for
  bit, and what the oracle does; odd lengths give a padded cluster."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  shape = testing.AttentionShape(batch=2, q_len=1100, kv_len=1400, q_heads=6,
                                 kv_heads=2, head_dim=head_dim)
  q, k, v = shape.inputs(testing.key_for("mosaic_clusters", head_dim, causal),
                         dtype=jnp.bfloat16, sharpness=(16.0, 24.0))
  kv_lengths = jnp.array([1400, 1337], jnp.int32)
  threshold = 0.1 if skip else 0.0
  lam = jnp.full((2,), threshold, jnp.float32)
  block_kv = pallas_mosaic.default_block_kv(head_dim)

  def run(cluster_q):
    return pallas_mosaic.attention_forward(
        q, k, v, kv_lengths, config_lib.log_threshold(lam), causal=causal,
        sm_scale=head_dim ** -0.5, block_q=64, block_kv=block_kv,
        skip_enabled=skip,
        config=pallas_mosaic.MosaicConfig(cluster_q=cluster_q))

  out, lse, skipped, visited = run(2)
  single = run(1)
  for got, want in zip((out, lse, skipped, visited), single):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=64, block_kv=block_kv, threshold=threshold,
      causal=causal, kv_lengths=kv_lengths)
  testing.assert_skips_match(skipped, oracle, threshold, jnp.bfloat16)
  testing.assert_close(out, oracle.out, jnp.bfloat16)
