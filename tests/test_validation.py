"""Bad and edge inputs get a clear ValueError before any kernel is traced;
traced values that cannot be checked are clamped as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import nn as bjnn

KEY = jax.random.key(7)
K = jax.random.normal(KEY, (2, 64, 2, 16))        # [b, len, kv_heads, d]
Q1 = jax.random.normal(jax.random.key(1), (2, 4, 16))
Q = jax.random.normal(jax.random.key(2), (2, 64, 4, 16))
PAGES = K.reshape(8, 16, 2, 16)
TABLE = jnp.array([[0, 1, 2, 99], [4, 5, 6, 7]])  # 99: outside the pool


def _xattn(**kw):
  kw = {"block_size": 16, "stride": 4, **kw}
  q, k = kw.pop("q", Q), kw.pop("k", K)
  return bj.xattention.select_blocks(q, k, **kw)


BAD = {
    "decode length past the cache": (
        lambda: bj.decode_attention(Q1, K, K, jnp.array([65, 3])),
        "kv_lengths` must lie in \\[0, 64\\]"),
    "decode negative length": (
        lambda: bj.decode_attention(Q1, K, K, jnp.array([-1, 3])),
        "kv_lengths` must lie"),
    "decode q/cache batch": (
        lambda: bj.decode_attention(Q1[:1], K, K, jnp.array([3])),
        "batch 1 but the cache has 2"),
    "decode block_kv 0": (
        lambda: bj.decode_attention(Q1, K, K, jnp.array([3, 3]), block_kv=0),
        "block_kv"),
    "paged page outside the pool": (
        lambda: bj.paged_decode_attention(Q1, PAGES, PAGES, TABLE,
                                          jnp.array([64, 10])),
        "page_table`\\[0, 3\\] = 99 is outside the pool of 8 pages"),
    "paged length past the table": (
        lambda: bj.paged_decode_attention(Q1, PAGES, PAGES, TABLE,
                                          jnp.array([65, 10])),
        "kv_lengths` must lie in \\[0, 64\\]"),
    "causal as a string": (lambda: bj.attention(Q, K, K, causal="False"),
                           "causal` must be True or False"),
    "causal as a list": (lambda: bj.attention(Q, K, K, causal=[True]),
                         "causal` must be True or False"),
    "causal in the Flax factory": (
        lambda: bjnn.make_attention_fn(causal="yes"), "causal"),
    "λ as a string": (lambda: bj.attention(Q, K, K, threshold="abc"),
                      "threshold` \\(λ\\) must be a number"),
    "λ as a dict": (lambda: bj.attention(Q, K, K, threshold={"a": 1}),
                    "threshold` \\(λ\\) must be a number"),
    "scale factor as a string": (
        lambda: bj.SkipSoftmaxConfig(threshold_scale_factor="abc"),
        "threshold_scale_factor` must be a non-negative number"),
    "scale factor as a list": (
        lambda: bj.SkipSoftmaxConfig(threshold_scale_factor=[1, 2]),
        "threshold_scale_factor"),
    "scale factor NaN": (
        lambda: bj.SkipSoftmaxConfig(threshold_scale_factor=float("nan")),
        "threshold_scale_factor"),
    "XAttention τ NaN": (lambda: _xattn(threshold=float("nan")),
                         "τ must be in \\(0, 1\\]"),
    "XAttention τ a string": (lambda: _xattn(threshold="high"), "τ"),
    "XAttention integer q/k": (
        lambda: _xattn(q=Q.astype(jnp.int32), k=K.astype(jnp.int32)),
        "must be a float array"),
    "XAttention mixed dtypes": (lambda: _xattn(k=K.astype(jnp.bfloat16)),
                                "share one dtype"),
    "XAttention negative sm_scale": (lambda: _xattn(sm_scale=-1.0),
                                     "sm_scale"),
    "XAttention kv_lengths shape": (
        lambda: _xattn(kv_lengths=jnp.array([1, 2, 3])),
        "kv_lengths` must have shape \\[batch\\]"),
    "XAttention causal string": (lambda: _xattn(causal="True"), "causal"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_names_the_argument(name):
  fn, match = BAD[name]
  with pytest.raises(ValueError, match=match):
    fn()


def test_unused_page_table_entries_are_free():
  """Entries past a sequence's length are never read, so any value goes."""
  out = bj.paged_decode_attention(Q1, PAGES, PAGES, TABLE,
                                  jnp.array([48, 10]))
  ok_table = TABLE.at[0, 3].set(3)
  ref = bj.paged_decode_attention(Q1, PAGES, PAGES, ok_table,
                                  jnp.array([48, 10]))
  np.testing.assert_array_equal(out, ref)


def test_traced_decode_lengths_are_clamped_to_the_cache():
  f = jax.jit(lambda lengths: bj.decode_attention(Q1, K, K, lengths))
  np.testing.assert_allclose(f(jnp.array([100, 64])),
                             bj.decode_attention(Q1, K, K,
                                                 jnp.array([64, 64])),
                             atol=1e-6)
  out = f(jnp.array([-5, 0]))            # no keys: zeros, never NaN
  assert np.all(np.asarray(out) == 0)


def test_numpy_bools_and_numbers_are_accepted():
  bj.attention(Q, K, K, causal=np.bool_(True), threshold=np.float32(0.1))
  bj.SkipSoftmaxConfig(threshold_scale_factor=np.float32(2.0))
