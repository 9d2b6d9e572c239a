"""FP8 (float8_e4m3fn) KV caches: the quantizer, scalar scales over a page
pool, and the errors for malformed scales. Every implementation against the
oracle on the dequantized cache: the decode suite (tests/test_base.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import testing


def fp8_inputs(name, *, head_dim=64, kv_heads=2, max_len=256):
  """q (bf16) and a cache whose KV heads differ 10x in magnitude, quantized
  per head."""
  shape = testing.DecodeShape(batch=2, q_heads=4 * kv_heads,
                              kv_heads=kv_heads, max_len=max_len,
                              head_dim=head_dim)
  c = testing.fp8_cache(testing.key_for("decode_fp8", name), shape)
  return c.q, c.k8, c.v8, c.k_scale, c.v_scale


def dequantized(cache8, scale):
  return cache8.astype(jnp.float32) * scale[:, None]


def test_quantize_cache_round_trips_within_e4m3_precision():
  _, k, _ = testing.DecodeShape(batch=2, q_heads=8, kv_heads=2, max_len=256,
                                head_dim=64).inputs(
                                    testing.key_for("decode_fp8", "round_trip"))
  k = k * jnp.array([1.0, 10.0])[None, None, :, None]
  k8, k_scale = bj.decode.quantize_cache(k)
  assert k8.dtype == jnp.float8_e4m3fn and k_scale.shape == (2,)
  np.testing.assert_allclose(k_scale, jnp.abs(k).max(axis=(0, 1, 3)) / 448,
                             rtol=1e-6)
  err = jnp.abs(dequantized(k8, k_scale) - k)
  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values,
  # absolute <= 2^-10 of the scale among the subnormals.
  bound = jnp.abs(k) / 16 + k_scale[:, None] * 2.0 ** -9
  assert bool(jnp.all(err <= bound))
  assert float(jnp.max(err)) > 0, "the quantization should lose something"


def test_fp8_paged_pool_with_scalar_scales():
  q, k8, v8, _, _ = fp8_inputs("paged", kv_heads=1)
  b, max_len = k8.shape[:2]
  page = 64
  pool_k = k8.reshape(b * max_len // page, page, 1, 64)[::-1]
  pool_v = v8.reshape(b * max_len // page, page, 1, 64)[::-1]
  n = pool_k.shape[0]
  table = (n - 1 - jnp.arange(n, dtype=jnp.int32)).reshape(b, -1)
  kv_lengths = jnp.array([200, 256], jnp.int32)
  out = bj.paged_decode_attention(q, pool_k, pool_v, table, kv_lengths,
                                  threshold=1e-2, k_scale=0.05, v_scale=0.02,
                                  implementation="reference")
  oracle = bj.reference.blockwise_decode_attention(
      q.astype(jnp.float32), k8.astype(jnp.float32) * 0.05,
      v8.astype(jnp.float32) * 0.02, kv_lengths, block_kv=page,
      threshold=1e-2, max_mode="anchored",
      num_splits=bj.decode.default_num_splits(b, 1, max_len, page))
  testing.assert_close(out, oracle.out, jnp.bfloat16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_scale=None), "needs `k_scale` and `v_scale`"),
    (dict(k_scale=jnp.ones((3,))), r"scalar or \[kv_heads\]"),
    (dict(k_scale=jnp.array([1.0, -1.0])), "positive and finite"),
    (dict(k_scale=jnp.array([1, 2])), "floating point"),
    (dict(plain_cache=True), "dequantize an FP8"),
    (dict(mixed=True), "both be float8_e4m3fn"),
])
def test_bad_fp8_arguments_name_the_fix(kwargs, match):
  q, k8, v8, k_scale, v_scale = fp8_inputs("errors")
  args = dict(k_scale=k_scale, v_scale=v_scale)
  if kwargs.pop("plain_cache", False):
    k8, v8 = k8.astype(q.dtype), v8.astype(q.dtype)
  if kwargs.pop("mixed", False):
    v8 = v8.astype(q.dtype)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    bj.decode_attention(q, k8, v8, jnp.array([256, 150]), threshold=1e-2,
                        **args)
