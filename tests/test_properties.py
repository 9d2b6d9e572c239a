"""Property tests (hypothesis): error bounds and oracle agreement on random
shapes, masks and score sharpness."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import blasst_jax as bj
from blasst_jax import analysis
from blasst_jax import testing


# Shapes, patterns and options come from small fixed sets: every distinct
# value of a static argument is a compilation (the time of these tests), so
# examples reuse programs; the seed varies the data freely.
SHAPES = testing.PROPERTY_TEST_SHAPES
SHARPNESS = (1.0, 8.0, 30.0)
WINDOWS = (2, 12)


@st.composite
def problems(draw):
  return dict(
      shape=draw(st.sampled_from(SHAPES)), causal=draw(st.booleans()),
      block_q=draw(st.sampled_from([16, 32])),
      block_kv=draw(st.sampled_from([16, 32])),
      threshold=draw(st.sampled_from([0.0, 1e-4, 1e-2, 0.1, 0.5])),
      sharpness=draw(st.sampled_from(SHARPNESS)),
      window=draw(st.sampled_from(WINDOWS)),
      short=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@functools.partial(jax.jit, static_argnames=("shape", "sharpness", "window"))
def pattern_inputs(key, *, shape, sharpness, window):
  """`shape.inputs` as one program (its eager ops compile one by one)."""
  return shape.inputs(key, sharpness=sharpness, window=window)


def make(p):
  shape = p["shape"]
  q, k, v = pattern_inputs(jax.random.PRNGKey(p["seed"]), shape=shape,
                           sharpness=p["sharpness"], window=p["window"])
  kv_lengths = None
  if p["short"]:
    kv_lengths = jnp.maximum(shape.kv_len - 7 * jnp.arange(shape.batch), 0)
  return q, k, v, kv_lengths


@functools.partial(jax.jit, static_argnames=(
    "causal", "block_q", "block_kv", "threshold", "bq", "bkv"))
def bound_terms(q, k, v, kv_lengths, *, causal, block_q, block_kv, threshold,
                bq, bkv):
  """The oracle, dense attention and both bounds of one example, as one
  program (one compilation per example instead of one per eager op)."""
  r = bj.reference.blockwise_attention(
      q, k, v, block_q=block_q, block_kv=block_kv, threshold=threshold,
      causal=causal, kv_lengths=kv_lengths)
  dense = bj.reference.dense_attention(q, k, v, causal=causal,
                                       kv_lengths=kv_lengths)
  bound = analysis.skip_error_bound(v, r.skip_mask, threshold, block_q=bq,
                                    block_kv=bkv, q_len=q.shape[1])
  err = jnp.max(jnp.abs(r.out - dense), axis=-1).transpose(0, 2, 1)
  mass = analysis.dropped_attention_mass(
      q, k, r.skip_mask, block_q=bq, block_kv=bkv, causal=causal,
      kv_lengths=kv_lengths)
  n_skip = jnp.sum(r.skip_mask, -1).astype(jnp.float32)
  dropped = jnp.repeat(n_skip * bkv * threshold, bq, axis=-1)
  dropped = dropped[..., :q.shape[1]]
  return dict(out=r.out, skipped=jnp.sum(r.stats.skipped_blocks), err=err,
              bound=bound, mass=mass, dropped=dropped,
              skipped_unvisited=jnp.sum(r.skip_mask & ~r.visited_mask))


# Examples per run: the active profile's (tests/conftest.py; 12 in CI).
@hypothesis.given(problems())
def test_error_against_dense_is_bounded_by_lambda(p):
  q, k, v, kv_lengths = make(p)
  bq, bkv = bj.config.effective_block_sizes(p["shape"].q_len,
                                            p["shape"].kv_len, p["block_q"],
                                            p["block_kv"])
  t = bound_terms(q, k, v, kv_lengths, causal=p["causal"],
                  block_q=p["block_q"], block_kv=p["block_kv"],
                  threshold=p["threshold"], bq=bq, bkv=bkv)
  assert not bool(jnp.any(jnp.isnan(t["out"])))
  if p["threshold"] == 0.0:
    assert int(t["skipped"]) == 0
  assert bool(jnp.all(t["err"] <= t["bound"] + 1e-5)), float(
      jnp.max(t["err"] - t["bound"]))
  # The dropped mass obeys the same bound: δ <= D / (1 + D).
  assert bool(jnp.all(t["mass"] <= t["dropped"] / (1 + t["dropped"]) + 1e-6))
  assert int(t["skipped_unvisited"]) == 0


@hypothesis.given(problems())
@hypothesis.settings(max_examples=6)
def test_kernel_agrees_with_oracle(p):
  q, k, v, kv_lengths = make(p)
  common = dict(block_q=p["block_q"], block_kv=p["block_kv"],
                threshold=p["threshold"], causal=p["causal"],
                kv_lengths=kv_lengths, return_stats=True)
  out, stats = bj.attention(q, k, v, implementation="pallas_triton", **common)
  oracle = bj.reference.blockwise_attention(
      q, k, v, block_q=p["block_q"], block_kv=p["block_kv"],
      threshold=p["threshold"], causal=p["causal"], kv_lengths=kv_lengths)
  np.testing.assert_array_equal(stats.visited_blocks,
                                oracle.stats.visited_blocks)
  near = testing.near_tie_tiles(oracle, p["threshold"], 1e-3)
  if not bool(jnp.any(near)):
    np.testing.assert_array_equal(stats.skipped_blocks,
                                  oracle.stats.skipped_blocks)
    testing.assert_close(out, oracle.out, jnp.float32)
