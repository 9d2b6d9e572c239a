"""The portable Pallas kernel (interpret mode on CPU): the shared suite, and
what is particular to it (its config knobs, head_dim padding, the dense
build)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax import testing
from blasst_jax.kernels import pallas_triton
from tests import test_base


class TestPallasTriton(test_base.AttentionTestBase):
  implementation = "pallas_triton"
  tiles = (32, 16)   # q tiles taller than KV blocks


def run_kernel(q, k, v, threshold, *, causal, block_q, block_kv,
               kv_lengths=None, config=pallas_triton.TritonConfig()):
  b, lk = q.shape[0], k.shape[1]
  kv_lengths = bj.reference.kv_lengths_or_full(kv_lengths, b, lk)
  lam = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (b,))
  return pallas_triton.attention_forward(
      q, k, v, kv_lengths, config_lib.log_threshold(lam), causal=causal,
      sm_scale=q.shape[-1] ** -0.5, block_q=block_q, block_kv=block_kv,
      config=config, interpret=True)


# The suite runs the default config (V loaded in the taken branch); this is
# the other V load.
@pytest.mark.parametrize("load_v_in_branch", [False])
@pytest.mark.parametrize("causal", [False, True])
def test_per_tile_skips_and_lse_match_oracle(causal, load_v_in_branch):
  shape = testing.AttentionShape(batch=2, q_len=120, kv_len=250, q_heads=4,
                                 kv_heads=2, head_dim=32)
  q, k, v = shape.inputs(testing.key_for("tiles", causal),
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
  testing.assert_skips_match(skipped, oracle, threshold, jnp.float32)
  if not bool(jnp.any(testing.near_tie_tiles(oracle, threshold, 1e-3))):
    testing.assert_close(out, oracle.out, jnp.float32)
    np.testing.assert_allclose(lse, oracle.lse, atol=1e-4, rtol=1e-5)


def test_head_dim_padding_and_short_sequences():
  # head_dim 24 is padded to 32; 5 queries and 9 keys fit one 16-row tile.
  q, k, v = testing.AttentionShape(1, 5, 9, 2, 1, 24).inputs(
      testing.key_for("tiny"), pattern="random")
  out = bj.attention(q, k, v, implementation="pallas_triton", causal=True)
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  testing.assert_close(out, expected, jnp.float32)


def test_interpret_flag_is_explicit():
  q, k, v = testing.CPU_TEST_SHAPES[0].inputs(testing.key_for("interp"))
  out = bj.attention(q, k, v, implementation="pallas_triton", interpret=True,
                     block_q=64, block_kv=64)
  testing.assert_close(out, bj.reference.dense_attention(q, k, v),
                       jnp.float32)


def test_static_zero_threshold_uses_the_dense_build():
  q, k, v = testing.CPU_TEST_SHAPES[1].inputs(testing.key_for("static0"))
  common = dict(causal=True, block_q=32, block_kv=32, return_stats=True,
                implementation="pallas_triton")
  out_static, stats_static = bj.attention(q, k, v, threshold=0.0, **common)
  out_traced, stats_traced = jax.jit(
      lambda t: bj.attention(q, k, v, threshold=t, **common))(jnp.float32(0))
  testing.assert_close(out_static, out_traced, jnp.float32)
  assert int(jnp.sum(stats_static.skipped_blocks)) == 0
  np.testing.assert_array_equal(stats_static.visited_blocks,
                                stats_traced.visited_blocks)
  text = jax.jit(lambda: bj.attention(q, k, v, threshold=0.0, **common)
                 ).trace().jaxpr.pretty_print()
  assert " cond[" not in text and "while[" in text
