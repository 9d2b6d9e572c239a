"""experiments.lm.gpt: shapes, causality, config errors; synthetic_lm data."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lm import gpt
from experiments.lm import synthetic_lm


def small_model(**kwargs):
  args = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
              block_q=16, block_kv=16, rngs=nnx.Rngs(0))
  args.update(kwargs)
  return gpt.GPT(50, 64, **args)


@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_stats(tie):
  model = small_model(tie_embeddings=tie)
  tokens = jnp.zeros((3, 48), jnp.int32)
  logits, stats = model(tokens, threshold=0.5, return_stats=True)
  assert logits.shape == (3, 48, 50) and logits.dtype == jnp.float32
  assert len(stats) == 2
  assert all(s.skipped_blocks.shape == (3, 4) for s in stats)
  assert (model.head is None) == tie


def test_causal():
  model = small_model()
  rng = np.random.default_rng(0)
  a = rng.integers(50, size=(1, 48))
  b = a.copy()
  b[:, 30:] = rng.integers(50, size=(1, 18))   # change tokens after t=29
  la, lb = model(jnp.asarray(a)), model(jnp.asarray(b))
  np.testing.assert_allclose(la[:, :30], lb[:, :30], atol=1e-5)
  assert not np.allclose(la[:, 30:], lb[:, 30:], atol=1e-3)


def test_bad_config():
  with pytest.raises(ValueError, match="multiple of num_heads"):
    small_model(d_model=30)
  with pytest.raises(ValueError, match="num_layers"):
    small_model(num_layers=0)
  with pytest.raises(ValueError, match="max_len"):
    small_model()(jnp.zeros((1, 65), jnp.int32))


def test_synthetic_lm_deterministic_and_copies():
  source = synthetic_lm.SyntheticLM(64, copy_prob=0.05, copy_len=8,
                                    min_copy_distance=16)
  x = source.batch(3, batch_size=4, seq_len=256)
  assert x.shape == (4, 257) and x.dtype == np.int32
  assert x.min() >= 0 and x.max() < 64
  np.testing.assert_array_equal(x, source.batch(3, batch_size=4, seq_len=256))
  assert not np.array_equal(x, source.batch(3, batch_size=4, seq_len=256,
                                            split="eval"))
  # Copy spans repeat 8-grams from earlier in the sequence.
  repeats = sum(
      any(np.array_equal(row[t:t + 8], row[s:s + 8])
          for s in range(0, t - 15))
      for row in x for t in range(16, 249, 8))
  assert repeats > 0
  # The bos token starts every sequence and appears nowhere else.
  np.testing.assert_array_equal(x[:, 0], 63)
  assert not np.any(x[:, 1:] == 63)
  plain = synthetic_lm.SyntheticLM(64, bos=False).batch(0, batch_size=4,
                                                         seq_len=256)
  assert np.any(plain[:, 0] != 63) and np.any(plain == 63)
  with pytest.raises(ValueError, match="copy_prob"):
    synthetic_lm.SyntheticLM(64, copy_prob=1.0)
