"""Tests for blasst_jax.nn: the Flax attention_fn and SkipSelfAttention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import blasst_jax
from blasst_jax import patterns
from blasst_jax import reference
from blasst_jax.config import SkipSoftmaxConfig, SkipStats
from blasst_jax.nn import SkipSelfAttention, make_attention_fn

BATCH, SEQ, FEATURES, HEADS = 2, 48, 32, 4
IMPLS = ("reference", "pallas_triton")  # Triton runs in interpret mode on CPU.
ATOL = 1e-5


def _x(seed=0, shape=(BATCH, SEQ, FEATURES)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(a, b, atol=ATOL):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


# ----------------------------------------------------------------- linen ---


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_linen_matches_default_attention(impl, causal):
  x = _x()
  skip = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=FEATURES,
      attention_fn=make_attention_fn(threshold=0.0, causal=causal,
                                     implementation=impl))
  dense = nn.MultiHeadDotProductAttention(num_heads=HEADS,
                                          qkv_features=FEATURES)
  params = dense.init(jax.random.key(1), x)
  mask = nn.make_causal_mask(x[..., 0]) if causal else None
  _close(jax.jit(skip.apply)(params, x), dense.apply(params, x, mask=mask))


def test_linen_extra_batch_dims():
  # Flax allows [*batch, length, features]; the fn flattens and restores.
  x = _x(shape=(2, 3, 16, FEATURES))
  skip = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=FEATURES,
      attention_fn=make_attention_fn(causal=True, implementation="reference"))
  dense = nn.MultiHeadDotProductAttention(num_heads=HEADS,
                                          qkv_features=FEATURES)
  params = dense.init(jax.random.key(1), x)
  out = jax.jit(skip.apply)(params, x)
  assert out.shape == x.shape
  _close(out, dense.apply(params, x, mask=nn.make_causal_mask(x[..., 0])))


def test_linen_sow_stats():
  x = _x()
  fn = make_attention_fn(1e-2, causal=True, block_q=16, block_kv=16,
                         implementation="reference", sow_stats=True)
  mha = nn.MultiHeadDotProductAttention(num_heads=HEADS,
                                        qkv_features=FEATURES,
                                        attention_fn=fn)
  params = mha.init(jax.random.key(1), x)
  # linen passes `module` to the attention_fn only with sow_weights=True.
  _, state = mha.apply(params, x, sow_weights=True, mutable=["intermediates"])
  (stats,) = state["intermediates"]["skip_stats"]
  assert isinstance(stats, SkipStats)
  assert stats.skipped_blocks.shape == (BATCH, HEADS)
  # Causal 3x3 tiles: 6 visited (q-tile, kv-block) pairs per (batch, head).
  np.testing.assert_array_equal(stats.visited_blocks, 6)
  _, state = mha.apply(params, x, mutable=["intermediates"])
  assert "skip_stats" not in state.get("intermediates", {})


# ------------------------------------------------------------------- nnx ---


def _nnx_pair(impl, **fn_kwargs):
  skip = nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=FEATURES, qkv_features=FEATURES,
      decode=False, rngs=nnx.Rngs(0),
      attention_fn=make_attention_fn(implementation=impl, **fn_kwargs))
  dense = nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=FEATURES, qkv_features=FEATURES,
      decode=False, rngs=nnx.Rngs(1))
  nnx.update(dense, nnx.state(skip, nnx.Param))  # share parameters
  return skip, dense


@pytest.mark.parametrize("impl", IMPLS)
def test_nnx_matches_default_attention(impl):
  x = _x()
  skip, dense = _nnx_pair(impl, threshold=0.0)
  want = dense(x, mask=nnx.make_causal_mask(x[..., 0]))
  _close(skip(x, is_causal=True), want)
  _close(skip(x), dense(x))


def test_nnx_factory_causal_flag():
  x = _x()
  skip, dense = _nnx_pair("reference", causal=True)
  _close(skip(x), dense(x, mask=nnx.make_causal_mask(x[..., 0])))


def test_nnx_sow_stats():
  x = _x()
  skip, _ = _nnx_pair("reference", threshold=1e-2, block_q=16, block_kv=16,
                      sow_stats=True)
  out, inter = nnx.capture(skip, nnx.Intermediate)(x, is_causal=True,
                                                   sow_weights=True)
  assert out.shape == x.shape
  (stats,) = inter["skip_stats"].get_value()
  assert isinstance(stats, SkipStats)
  assert stats.sparsity.shape == (BATCH, HEADS)
  assert np.all((stats.sparsity >= 0) & (stats.sparsity <= 1))


# ------------------------------------------ λ > 0 on structured q / k / v ---


class _NnxHolder(nnx.Module):
  """Calls the attention_fn on raw q/k/v so that it can sow into self."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, q, k, v):
    return self.fn(q, k, v, module=self)


class _LinenHolder(nn.Module):
  fn: object

  def __call__(self, q, k, v):
    return self.fn(q, k, v, module=self)


def _sharp_qkv():
  return patterns.sink_local_qkv(jax.random.key(3), batch=2, seq_len=64,
                                 q_heads=4, kv_heads=2, head_dim=32,
                                 window=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_threshold_skips_with_bounded_error(impl):
  q, k, v = _sharp_qkv()
  thr = 1e-2
  fn = make_attention_fn(thr, causal=True, block_q=16, block_kv=16,
                         implementation=impl, sow_stats=True)
  # jit: the eager reference oracle is slow to dispatch on CPU.
  out, inter = jax.jit(lambda *qkv: nnx.capture(_NnxHolder(fn),
                                                nnx.Intermediate)(*qkv))(q, k, v)
  (stats,) = inter["skip_stats"].get_value()
  assert stats.skipped_blocks.shape == (2, 4)
  assert 0 < float(stats.total_sparsity) < 1
  want, want_stats = jax.jit(lambda q, k, v: blasst_jax.attention(
      q, k, v, threshold=thr, causal=True, block_q=16, block_kv=16,
      implementation=impl, return_stats=True))(q, k, v)
  _close(out, want)
  np.testing.assert_array_equal(stats.skipped_blocks,
                                want_stats.skipped_blocks)
  # Each dropped key has weight < λ relative to the row max, so the lost
  # probability mass is < λ·kv_len and the output moves by at most twice
  # that times max|v|.
  err = float(jnp.max(jnp.abs(out - reference.dense_attention(
      q, k, v, causal=True))))
  assert 0 < err <= 2 * thr * k.shape[1] * float(jnp.max(jnp.abs(v)))


def test_linen_module_sow_from_holder():
  q, k, v = _sharp_qkv()
  fn = make_attention_fn(1e-2, causal=True, block_q=16, block_kv=16,
                         implementation="reference", sow_stats=True)
  out, state = _LinenHolder(fn).apply({}, q, k, v, mutable=["intermediates"])
  (stats,) = state["intermediates"]["skip_stats"]
  assert stats.visited_blocks.shape == (2, 4)
  assert float(stats.total_sparsity) > 0
  assert out.shape == q.shape


def test_fn_direct_call_shapes_and_dtype():
  q, k, v = patterns.random_qkv(jax.random.key(4), batch=2, seq_len=16,
                                q_heads=4, kv_heads=2, head_dim=16)
  fn = jax.jit(make_attention_fn(implementation="reference"),
               static_argnames="dtype")
  # No leading batch dims at all.
  _close(fn(q[0], k[0], v[0]), fn(q, k, v)[0])
  assert fn(q, k, v, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  # Mixed dtypes are promoted rather than rejected.
  assert fn(q.astype(jnp.bfloat16), k, v).dtype == jnp.float32
  # Unknown kwargs (e.g. nnx's input_positions) are ignored.
  _close(fn(q, k, v, input_positions=jnp.arange(16)), fn(q, k, v))


# ----------------------------------------------------- SkipSelfAttention ---


def _dense_layer_output(layer, x, kv_lengths=None):
  q, k, v = layer.project_qkv(x)
  o = reference.dense_attention(q, k, v, causal=layer.causal,
                                kv_lengths=kv_lengths)
  return layer.out_proj(o.reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_self_attention_dense_at_zero(impl, kv_heads):
  x = _x()
  layer = SkipSelfAttention(HEADS, FEATURES, num_kv_heads=kv_heads,
                            implementation=impl, block_q=16, block_kv=16,
                            rngs=nnx.Rngs(0))
  assert layer.k_proj.kernel.shape == (FEATURES, kv_heads * FEATURES // HEADS)
  y = layer(x)
  assert y.shape == x.shape
  _close(y, _dense_layer_output(layer, x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_kv_lengths(impl, causal):
  x = _x()
  lengths = jnp.array([30, SEQ], jnp.int32)
  layer = SkipSelfAttention(HEADS, FEATURES, num_kv_heads=2, causal=causal,
                            implementation=impl, block_q=16, block_kv=16,
                            rngs=nnx.Rngs(0))
  y = layer(x, kv_lengths=lengths)
  _close(y, _dense_layer_output(layer, x, lengths))
  # Padding content must not leak into valid positions.
  noise = 5 * _x(seed=7)
  pad = (jnp.arange(SEQ)[None, :] >= lengths[:, None])[..., None]
  y2 = layer(jnp.where(pad, noise, x), kv_lengths=lengths)
  _close(jnp.where(pad, 0, y2), jnp.where(pad, 0, y))


def test_self_attention_jit_stats_and_threshold_override():
  x = 10 * _x()  # sharper scores so that a large λ skips something
  layer = SkipSelfAttention(HEADS, FEATURES, threshold=0.0, block_q=16,
                            block_kv=16, implementation="reference",
                            rngs=nnx.Rngs(0))

  @nnx.jit
  def run(layer, x, thr):
    return layer(x, threshold=thr, return_stats=True)

  y0, s0 = run(layer, x, 0.0)
  _close(y0, layer(x))
  assert isinstance(s0, SkipStats)
  assert s0.skipped_blocks.shape == (BATCH, HEADS)
  np.testing.assert_array_equal(s0.skipped_blocks, 0)
  _, s1 = run(layer, x, 0.9)  # traced λ overrides the layer's 0
  assert int(jnp.sum(s1.skipped_blocks)) > 0
  # And the other way round: a layer with λ > 0, called with λ = 0.
  layer.threshold = 0.9
  _, s2 = layer(x, return_stats=True)
  assert int(jnp.sum(s2.skipped_blocks)) > 0
  _close(layer(x, threshold=0.0), y0)


def test_self_attention_config_threshold_and_dtype():
  x = _x()
  layer = SkipSelfAttention(
      HEADS, FEATURES, head_dim=16, dtype=jnp.bfloat16,
      threshold=SkipSoftmaxConfig(threshold_scale_factor=0.5),
      implementation="reference", rngs=nnx.Rngs(0))
  assert layer.q_proj.kernel.shape == (FEATURES, HEADS * 16)
  y = layer(x)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16


# ---------------------------------------------------------------- errors ---


def test_error_mask():
  skip, _ = _nnx_pair("reference")
  x = _x()
  with pytest.raises(ValueError, match="causal=True"):
    skip(x, mask=nnx.make_causal_mask(x[..., 0]))


def test_error_bias():
  q, k, v = _sharp_qkv()
  with pytest.raises(ValueError, match="bias"):
    make_attention_fn()(q, k, v, bias=jnp.zeros((2, 4, 64, 64)))


def test_error_dropout():
  x = _x()
  mha = nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=FEATURES, decode=False, dropout_rate=0.1,
      attention_fn=make_attention_fn(), rngs=nnx.Rngs(0, dropout=1))
  with pytest.raises(ValueError, match="dropout"):
    mha(x, deterministic=False)
  assert mha(x, deterministic=True).shape == x.shape
  lmha = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, dropout_rate=0.1, attention_fn=make_attention_fn())
  params = lmha.init(jax.random.key(0), x, deterministic=True)
  with pytest.raises(ValueError, match="dropout"):
    lmha.apply(params, x, deterministic=False,
               rngs={"dropout": jax.random.key(1)})


@pytest.mark.parametrize("kwargs", [
    dict(threshold=1.0), dict(threshold=-0.1), dict(threshold=float("nan")),
    dict(implementation="cuda"), dict(implementation="mosaic"),
    dict(block_q=24), dict(sm_scale=-1.0)])
def test_error_factory_arguments(kwargs):
  with pytest.raises(ValueError):
    make_attention_fn(**kwargs)


def test_error_layer_arguments():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="num_kv_heads"):
    SkipSelfAttention(4, 32, num_kv_heads=3, rngs=rngs)
  with pytest.raises(ValueError, match="divisible"):
    SkipSelfAttention(3, 32, rngs=rngs)
  with pytest.raises(ValueError, match="threshold"):
    SkipSelfAttention(4, 32, threshold=1.5, rngs=rngs)
  layer = SkipSelfAttention(4, 32, implementation="reference", rngs=rngs)
  with pytest.raises(ValueError, match="threshold"):
    layer(_x(), threshold=2.0)
  with pytest.raises(ValueError, match="in_features|shape"):
    layer(_x(shape=(2, 8, 16)))


def test_decode_step_runs_the_hopper_decode_kernel_on_a_paged_cache(
    monkeypatch):
  """`decode_implementation="pallas_mosaic"` (interpret mode on CPU) runs
  the Mosaic decode kernel and gives the reference decode's tokens."""
  from blasst_jax.kernels import decode_mosaic  # pylint: disable=g-import-not-at-top
  calls = []
  kernel = decode_mosaic.decode_merged
  monkeypatch.setattr(decode_mosaic, "decode_merged",
                      lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  b, features = 2, 128
  outs = {}
  for impl in ("pallas_mosaic", "reference"):
    layer = SkipSelfAttention(
        2, features, num_kv_heads=1, dtype=jnp.bfloat16, threshold=0.1,
        interpret=True, decode_implementation=impl, rngs=nnx.Rngs(0))
    layer.init_cache(b, max_len=128, dtype=jnp.bfloat16, page_size=64)
    step = nnx.jit(lambda layer, token: layer.decode(
        token, max_mode="anchored", num_splits=1))
    x = jax.random.normal(jax.random.PRNGKey(4), (b, 2, features),
                          jnp.bfloat16)
    outs[impl] = jnp.concatenate([step(layer, x[:, i:i + 1])
                                  for i in range(2)], axis=1)
  assert calls, "the Mosaic decode kernel did not run"
  np.testing.assert_allclose(np.asarray(outs["pallas_mosaic"], np.float32),
                             np.asarray(outs["reference"], np.float32),
                             atol=3e-2, rtol=3e-2)
  with pytest.raises(ValueError, match="implementation"):
    SkipSelfAttention(2, features, decode_implementation="cuda",
                      rngs=nnx.Rngs(0))


def test_decode_step_with_kv_cache_in_nnx_state_matches_full_attention():
  """Token-by-token generation through the decode kernel equals one causal
  pass over the whole sequence (λ = 0), and skips blocks with λ > 0."""
  b, t, features = 2, 40, 64
  layer = SkipSelfAttention(4, features, num_kv_heads=2, causal=True,
                                 implementation="pallas_triton",
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(3), (b, t, features))
  full = layer(x)

  @nnx.jit
  def step(layer, token):
    return layer.decode(token, num_splits=2, return_stats=True)

  layer.init_cache(b, max_len=48)
  outs = []
  for i in range(t):
    y, stats = step(layer, x[:, i:i + 1])
    outs.append(y)
  np.testing.assert_array_equal(layer.cache_lengths[...], [t, t])
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5,
                             rtol=2e-5)
  np.testing.assert_array_equal(stats.visited_blocks, 1)  # 40 keys, 1 block

  layer.threshold = 0.5
  layer.init_cache(b, max_len=48)
  for i in range(t):
    y, stats = layer.decode(x[:, i:i + 1], num_splits=1, return_stats=True)
  assert bool(jnp.all(jnp.isfinite(y)))
  with pytest.raises(ValueError, match="shape"):
    layer.decode(x[:, :2])
