"""The oracle: the shared suites, plus checks of the skip rule itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import analysis
from blasst_jax import testing
from tests import test_base


class TestReference(test_base.AttentionTestBase):
  implementation = "reference"


class TestReferenceDecode(test_base.DecodeTestBase):
  implementation = "reference"
  bytes_match_reference = True


@pytest.mark.parametrize("causal", [False, True])
def test_dense_attention_matches_jax(causal):
  shape = testing.CPU_TEST_SHAPES[1]
  q, k, v = shape.inputs(testing.key_for("dense_ref", causal),
                         pattern="random", scale=3.0)
  kvl = jnp.array([150], jnp.int32)
  out, lse = bj.reference.dense_attention(q, k, v, causal=causal,
                                          kv_lengths=kvl, return_lse=True)
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                          key_value_seq_lengths=kvl)
  testing.assert_close(out, expected, jnp.float32)
  s = bj.reference.attention_scores(q, k, causal=causal, kv_lengths=kvl)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(s, axis=-1), rtol=1e-5,
                             atol=1e-5)


def test_skip_rule_on_hand_built_scores():
  """One q-tile, three KV blocks with known block maxima.

  k rows are one-hot so that s = q·k picks a known score per block. Block 0
  sets the running max 0; block 1 sits 5 below it, block 2 at +1.
  """
  d, bq, bkv = 16, 16, 16
  q = jnp.zeros((1, bq, 1, d)).at[..., 0].set(1.0)
  block_scores = jnp.array([0.0, -5.0, 1.0])
  k = jnp.zeros((1, 3 * bkv, 1, d))
  k = k.at[0, :, 0, 0].set(jnp.repeat(block_scores, bkv))
  v = jax.random.normal(jax.random.PRNGKey(0), (1, 3 * bkv, 1, d))
  for lam, expected_skips in [(0.0, [0, 0, 0]), (np.exp(-5.5), [0, 0, 0]),
                              (np.exp(-4.5), [0, 1, 0]), (0.99, [0, 1, 0])]:
    r = bj.reference.blockwise_attention(q, k, v, block_q=bq, block_kv=bkv,
                                         threshold=lam, sm_scale=1.0)
    np.testing.assert_array_equal(r.skip_mask[0, 0, 0], expected_skips)
    np.testing.assert_allclose(r.block_gap[0, 0, 0], [np.inf, -5.0, 1.0])
  # Skipping block 1 drops exactly its 16 weights e^-5 against 16 e^1 + 16.
  mass = analysis.dropped_attention_mass(q, k, r.skip_mask, block_q=bq,
                                         block_kv=bkv, sm_scale=1.0)
  expected = np.exp(-5) / (1 + np.exp(-5) + np.exp(1))
  np.testing.assert_allclose(mass[0, 0], expected, rtol=1e-5)


def test_masked_rows_do_not_forbid_a_skip():
  """A tile whose later rows see no key of a block still skips it."""
  shape = testing.CPU_TEST_SHAPES[0]
  q, k, v = shape.inputs(testing.key_for("rows"), sharpness=20.0, window=4)
  r = bj.reference.blockwise_attention(q, k, v, block_q=32, block_kv=16,
                                       threshold=0.05, causal=True)
  # Diagonal tiles: blocks partially above the diagonal are visited and
  # their gap ignores rows that see none of their keys.
  assert bool(jnp.all(jnp.isfinite(r.block_gap) | ~r.visited_mask
                      | (r.block_gap == -jnp.inf) | (r.block_gap == jnp.inf)))
  assert int(jnp.sum(r.stats.skipped_blocks)) > 0
  assert not bool(jnp.any(r.skip_mask & ~r.visited_mask))
  # The first visited block of a tile is never skipped.
  assert not bool(jnp.any(r.skip_mask[..., 0]))
