"""RoPE in blasst_jax.nn / experiments.lm.gpt: relative positions, causality."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lm import gpt
from blasst_jax import nn as bjnn


forward = nnx.jit(lambda model, tokens: model(tokens))


def small_model(**kwargs):
  args = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
              block_q=16, block_kv=16, position="rope", rngs=nnx.Rngs(0))
  args.update(kwargs)
  return gpt.GPT(50, 64, **args)


def test_apply_rope_scores_depend_on_offset_only():
  kq, kk = jax.random.split(jax.random.PRNGKey(0))
  q = jax.random.normal(kq, (1, 1, 2, 16))
  k = jax.random.normal(kk, (1, 1, 2, 16))

  def score(i, j, scale=1.0):
    qi = bjnn.apply_rope(q, jnp.array([i]), scale=scale)
    kj = bjnn.apply_rope(k, jnp.array([j]), scale=scale)
    return jnp.sum(qi * kj, -1)                          # [1, 1, heads]

  for i, j in ((7, 3), (3, 7), (40, 40)):
    for shift in (1, 17, 1000):
      np.testing.assert_allclose(score(i, j), score(i + shift, j + shift),
                                 rtol=1e-4, atol=1e-4)
  assert not np.allclose(score(7, 3), score(7, 4), atol=1e-3)
  # Rotations keep norms; position 0 is the identity.
  np.testing.assert_allclose(bjnn.apply_rope(q, jnp.array([0])), q)
  np.testing.assert_allclose(jnp.linalg.norm(bjnn.apply_rope(
      q, jnp.array([123])), axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  # Interpolation: scale s at position s * p is position p unscaled.
  np.testing.assert_allclose(score(14, 6, scale=2.0), score(7, 3),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="even head_dim"):
    bjnn.apply_rope(q[..., :15], jnp.array([0]))


def test_layer_scores_invariant_to_position_shift():
  layer = bjnn.SkipSelfAttention(4, 32, num_kv_heads=2, rope=True,
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 24, 32))

  def scores(positions):
    q, k, _ = layer.project_qkv(x, positions)
    k = jnp.repeat(k, 2, axis=2)
    return jnp.einsum("bqhd,bkhd->bhqk", q, k)

  base = scores(None)
  np.testing.assert_allclose(base, scores(jnp.arange(24) + 500), rtol=1e-3,
                             atol=1e-3)
  plain = bjnn.SkipSelfAttention(4, 32, num_kv_heads=2, rngs=nnx.Rngs(0))
  q, k, _ = plain.project_qkv(x)
  assert not np.allclose(base, jnp.einsum(
      "bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)), atol=1e-3)


def test_decode_matches_prefill_with_rope():
  layer = bjnn.SkipSelfAttention(4, 32, num_kv_heads=2, rope=True,
                                 implementation="reference", block_q=16,
                                 block_kv=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 32))
  full = nnx.jit(lambda layer, x: layer(x))(layer, x)
  layer.init_cache(2, 16)
  step = nnx.jit(lambda layer, x: layer.decode(x))
  steps = [step(layer, x[:, t:t + 1]) for t in range(12)]
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4,
                             atol=1e-4)


def test_causal_prefix_unchanged_when_appending():
  model = small_model(norm="rmsnorm")
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(50, size=(2, 48)))
  full = forward(model, tokens)
  prefix = forward(model, tokens[:, :30])
  np.testing.assert_allclose(prefix, full[:, :30], rtol=1e-4, atol=1e-4)
  changed = tokens.at[:, 30:].set((tokens[:, 30:] + 1) % 50)
  assert not np.allclose(forward(model, changed)[:, 30:], full[:, 30:],
                         atol=1e-3)
  model.set_rope_scale(2.0)
  assert all(b.attn.rope_scale == 2.0 for b in model.blocks)
  assert not np.allclose(forward(model, tokens), full, atol=1e-4)
  # No position table: longer than max_len runs (for interpolation).
  assert jax.eval_shape(lambda t: model(t), jnp.zeros(
      (1, 80), jnp.int32)).shape == (1, 80, 50)


def test_param_count():
  def count(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

  learned = small_model(position="learned")
  rope = small_model()
  rms = small_model(norm="rmsnorm")
  d, layers = 32, 2
  assert count(learned) - count(rope) == 64 * d      # the position table
  assert count(rope) - count(rms) == (2 * layers + 1) * d   # LN biases
  # GQA: q/out d x d, k/v d x (kv_heads * head_dim); MLP 4d; embed tied.
  per_layer = 2 * d * d + 2 * d * (2 * 8) + 2 * d * 4 * d + 4 * d + d
  per_layer += 2 * 2 * d                               # two LayerNorms
  assert count(rope) == 50 * d + layers * per_layer + 2 * d


def test_bad_options():
  with pytest.raises(ValueError, match="position"):
    small_model(position="alibi")
  with pytest.raises(ValueError, match="norm"):
    small_model(norm="batchnorm")
  with pytest.raises(ValueError, match="even head_dim"):
    bjnn.SkipSelfAttention(2, 6, rope=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rope_scale"):
    bjnn.SkipSelfAttention(2, 8, rope=True, rope_scale=0.0,
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="position='rope'"):
    small_model(position="learned").set_rope_scale(2.0)
