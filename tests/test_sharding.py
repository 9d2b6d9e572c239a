"""Sharded skip-softmax attention equals one device's, stats included.

CPU runs these on 8 host devices (tests/conftest.py sets
--xla_force_host_platform_device_count=8 before jax starts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import sharding

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS="
    "--xla_force_host_platform_device_count=8 on CPU)")

# (batch_axis, head_axis) over a 2 x 4 ("data", "model") mesh.
LAYOUTS = [("data", None), (None, "model"), ("data", "model"),
           (("data", "model"), None), (None, ("model", "data"))]


def _mesh():
  return jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])


def _inputs(seed, *, batch=8, seq_len=96, q_heads=8, kv_heads=8,
            head_dim=32):
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(seed), batch=batch, seq_len=seq_len,
      q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, window=24,
      sharpness=(4.0, 12.0, 20.0))
  return q, k, v


def _assert_stats_equal(a, b):
  np.testing.assert_array_equal(a.skipped_blocks, b.skipped_blocks)
  np.testing.assert_array_equal(a.visited_blocks, b.visited_blocks)
  if b.masked_blocks is None:
    assert a.masked_blocks is None
  else:
    np.testing.assert_array_equal(a.masked_blocks, b.masked_blocks)


@pytest.mark.parametrize("batch_axis,head_axis", LAYOUTS)
def test_prefill_sharded_equals_one_device(batch_axis, head_axis):
  q, k, v = _inputs(0)
  rng = np.random.default_rng(1)
  kv_lengths = jnp.asarray(rng.integers(40, 97, size=8), jnp.int32)
  opts = dict(causal=True, threshold=0.05, kv_lengths=kv_lengths,
              block_q=16, block_kv=16, implementation="reference")
  want, want_stats = bj.attention(q, k, v, return_stats=True, **opts)
  assert float(want_stats.total_sparsity) > 0.05   # something to compare
  mesh = _mesh()
  fn = jax.jit(lambda q, k, v: sharding.attention(
      q, k, v, mesh=mesh, batch_axis=batch_axis, head_axis=head_axis,
      return_stats=True, **opts))
  got, stats = fn(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _assert_stats_equal(stats, want_stats)
  spec = P(batch_axis, None, head_axis, None)
  assert got.sharding.is_equivalent_to(NamedSharding(mesh, spec), got.ndim)


def test_prefill_gqa_threshold_array_block_mask_and_grad():
  q, k, v = _inputs(2, q_heads=8, kv_heads=4)
  rng = np.random.default_rng(3)
  thr = jnp.asarray(rng.choice([0.0, 0.01, 0.1], size=8), jnp.float32)
  block_mask = jnp.asarray(rng.random((8, 8, 6, 6)) < 0.7)
  opts = dict(causal=False, threshold=thr, block_mask=block_mask,
              implementation="reference")
  want, want_stats = bj.attention(q, k, v, return_stats=True, **opts)
  mesh = _mesh()
  got, stats = sharding.attention(q, k, v, mesh=mesh, batch_axis="data",
                                  head_axis="model", return_stats=True,
                                  **opts)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _assert_stats_equal(stats, want_stats)
  assert stats.masked_blocks is not None and int(
      jnp.sum(stats.masked_blocks)) > 0

  w = jax.random.normal(jax.random.PRNGKey(4), q.shape)
  def loss(f):
    return lambda q, k, v: jnp.sum(w * f(q, k, v))
  one = loss(lambda q, k, v: bj.attention(q, k, v, **opts))
  many = loss(lambda q, k, v: sharding.attention(
      q, k, v, mesh=mesh, batch_axis="data", head_axis="model", **opts))
  g_want = jax.grad(one, argnums=(0, 1, 2))(q, k, v)
  g_got = jax.jit(jax.grad(many, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_prefill_pallas_kernel_per_shard():
  q, k, v = _inputs(5, batch=2, seq_len=64, q_heads=4, kv_heads=4)
  opts = dict(causal=True, threshold=0.05, block_q=16, block_kv=16,
              implementation="pallas_triton", interpret=True)
  want, want_stats = bj.attention(q, k, v, return_stats=True, **opts)
  got, stats = sharding.attention(q, k, v, mesh=_mesh(), batch_axis="data",
                                  head_axis="model", return_stats=True,
                                  **opts)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _assert_stats_equal(stats, want_stats)


# Each layout once, the query's rank alternating (a [batch, 1, heads, d]
# query keeps its shape).
@pytest.mark.parametrize("batch_axis,head_axis,q_rank", [
    (*layout, 3 + i % 2) for i, layout in enumerate(LAYOUTS[:3])])
def test_decode_sharded_equals_one_device(batch_axis, head_axis, q_rank):
  rng = np.random.default_rng(6)
  b, max_len, hq, hkv, d = 8, 200, 8, 4, 32
  _, k, v = _inputs(7, batch=b, seq_len=max_len, q_heads=hq, kv_heads=hkv,
                    head_dim=d)
  q = jax.random.normal(jax.random.PRNGKey(8), (b, hq, d)) * 3.0
  if q_rank == 4:
    q = q[:, None]
  kv_lengths = jnp.asarray(rng.integers(1, max_len + 1, size=b), jnp.int32)
  opts = dict(threshold=0.1, block_kv=16, num_splits=3,
              implementation="reference")
  want, want_stats = bj.decode_attention(q, k, v, kv_lengths,
                                         return_stats=True, **opts)
  assert int(jnp.sum(want_stats.skipped_blocks)) > 0
  got, stats = jax.jit(lambda *a: sharding.decode_attention(
      *a, mesh=_mesh(), batch_axis=batch_axis, head_axis=head_axis,
      return_stats=True, **opts))(q, k, v, kv_lengths)
  assert got.shape == q.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _assert_stats_equal(stats, want_stats)
  np.testing.assert_allclose(stats.bytes_read, want_stats.bytes_read)


def test_errors_name_the_argument():
  q, k, v = _inputs(9, q_heads=8, kv_heads=2)
  mesh = _mesh()
  with pytest.raises(ValueError, match="kv_heads.*head_axis"):
    sharding.attention(q, k, v, mesh=mesh, head_axis="model")
  with pytest.raises(ValueError, match="batch_axis.*'rows'"):
    sharding.attention(q, k, v, mesh=mesh, batch_axis="rows")
  with pytest.raises(ValueError, match="named twice"):
    sharding.attention(q, k, v, mesh=mesh, batch_axis="data",
                       head_axis="data")
  with pytest.raises(ValueError, match="mesh"):
    sharding.attention(q, k, v, mesh=None, batch_axis="data")
  q3, k3, v3 = _inputs(9, batch=3)
  with pytest.raises(ValueError, match="batch.*batch_axis"):
    sharding.attention(q3, k3, v3, mesh=mesh, batch_axis="data")
  with pytest.raises(ValueError, match="threshold"):
    sharding.attention(q, k, v, mesh=mesh, batch_axis="data",
                       threshold=jnp.zeros((3,)))


def test_inside_set_mesh_with_sharded_inputs():
  q, k, v = _inputs(10, batch=4, seq_len=64, q_heads=4, kv_heads=4)
  opts = dict(causal=True, threshold=0.05, block_q=16, block_kv=16,
              implementation="reference")
  want = bj.attention(q, k, v, **opts)
  mesh = _mesh()
  with jax.set_mesh(mesh):   # Explicit axes: inputs carry their layout
    placed = [jax.device_put(x, NamedSharding(mesh, P(None, "data")))
              for x in (q, k, v)]
    got = jax.jit(lambda q, k, v: sharding.attention(
        q, k, v, mesh=mesh, batch_axis="data", head_axis="model",
        **opts))(*placed)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_flax_layer_with_mesh_matches_unsharded_and_annotates_kernels():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from blasst_jax import nn  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  common = dict(num_kv_heads=4, threshold=0.1, block_q=16, block_kv=16,
                implementation="reference", rope=True)
  plain = nn.SkipSelfAttention(8, 64, rngs=nnx.Rngs(0), **common)
  sharded = nn.SkipSelfAttention(8, 64, rngs=nnx.Rngs(0), mesh=mesh,
                                 batch_axis="data", head_axis="model",
                                 **common)
  # Same initialisation; the kernels carry the head axis annotation.
  np.testing.assert_array_equal(plain.q_proj.kernel[...],
                                sharded.q_proj.kernel[...])
  assert sharded.q_proj.kernel[...].sharding.spec == P(None, "model")
  assert sharded.out_proj.kernel[...].sharding.spec == P("model", None)
  x = jax.random.normal(jax.random.PRNGKey(11), (4, 48, 64)) * 4.0
  want, want_stats = plain(x, return_stats=True)
  got, stats = sharded(x, return_stats=True)
  # The out projection contracts over sharded heads: a different sum order.
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  _assert_stats_equal(stats, want_stats)
  for layer in (plain, sharded):     # one decode step after a short prompt
    layer.init_cache(4, 64)
    for t in range(3):
      y = layer.decode(x[:, t:t + 1])
    layer.last = y
  np.testing.assert_allclose(sharded.last, plain.last, atol=2e-4, rtol=2e-4)
  with pytest.raises(ValueError, match="num_kv_heads"):
    nn.SkipSelfAttention(8, 64, num_kv_heads=2, mesh=mesh,
                         head_axis="model", rngs=nnx.Rngs(0))


def _decode_inputs(seed, *, b=4, max_len=256, hq=8, hkv=4, d=32):
  _, k, v = _inputs(seed, batch=b, seq_len=max_len, q_heads=hq,
                    kv_heads=hkv, head_dim=d)
  q = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, hq, d)) * 3.0
  return q, k, v


@pytest.mark.parametrize("batch_axis,head_axis,context_axis", [
    (None, None, "model"), ("data", None, "model"), (None, "data", "model"),
    (None, None, ("data", "model"))])
def test_context_parallel_decode_dense_equals_one_device(
    batch_axis, head_axis, context_axis):
  q, k, v = _decode_inputs(12)
  kv_lengths = jnp.asarray([256, 1, 100, 37], jnp.int32)   # ragged, short
  opts = dict(block_kv=16, implementation="reference")
  want, want_stats = bj.decode_attention(q, k, v, kv_lengths, threshold=0.0,
                                         return_stats=True, **opts)
  got, stats = jax.jit(lambda *a: sharding.decode_attention(
      *a, mesh=_mesh(), batch_axis=batch_axis, head_axis=head_axis,
      context_axis=context_axis, threshold=0.0, return_stats=True,
      **opts))(q, k, v, kv_lengths)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _assert_stats_equal(stats, want_stats)
  np.testing.assert_allclose(stats.bytes_read, want_stats.bytes_read)


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_context_parallel_decode_skips_as_split_k(implementation):
  # Full rows: the 4 parts are exactly one device's 4 splits ("split" mode:
  # each part skips against its own running max).
  b, max_len = 2, 128
  q, k, v = _decode_inputs(14, b=b, max_len=max_len, hq=4, hkv=2)
  kv_lengths = jnp.full((b,), max_len, jnp.int32)
  opts = dict(block_kv=16, max_mode="split", implementation=implementation)
  if implementation == "pallas_triton":
    opts["interpret"] = True
  want, want_stats = bj.decode_attention(
      q, k, v, kv_lengths, threshold=0.2, num_splits=4, return_stats=True,
      **{**opts, "implementation": "reference"})
  assert int(jnp.sum(want_stats.skipped_blocks)) > 0
  got, stats = sharding.decode_attention(
      q, k, v, kv_lengths, mesh=_mesh(), context_axis="model",
      threshold=0.2, num_splits=1, return_stats=True, **opts)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _assert_stats_equal(stats, want_stats)
  # A scale-factor config takes λ from the whole sequence, not the part.
  cfg = bj.SkipSoftmaxConfig(threshold_scale_factor={"prefill": 1.0,
                                                     "decode": 0.2 * max_len})
  got_cfg = sharding.decode_attention(
      q, k, v, kv_lengths, mesh=_mesh(), context_axis="model",
      threshold=cfg, num_splits=1, **opts)
  np.testing.assert_allclose(got_cfg, want, atol=1e-5, rtol=1e-5)


def _shared_max_decode_case(max_mode):
  """(q, k, v, kv_lengths, λ, one device's splits, splits per part)."""
  if max_mode == "global":
    # Ragged rows (one ends inside a part, one in the first part, one
    # empty) and unrelated split counts: still one device's decisions.
    q, k, v = _decode_inputs(30, hq=8, hkv=2)
    return q, k, v, jnp.asarray([256, 150, 20, 0], jnp.int32), 0.05, 3, 2
  # "anchored": the sink and the newest keys sit on the first and last
  # device; full rows, one split per part = one device's 4.
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(31), batch=2, seq_len=256, q_heads=8, kv_heads=2,
      head_dim=32, window=16, sharpness=(8.0, 16.0))
  return q[:, -1], k, v, jnp.full((2,), 256, jnp.int32), 0.02, 4, 1


@pytest.mark.parametrize("max_mode", ["global", "anchored"])
@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_context_parallel_decode_sharing_the_max_equals_one_device(
    implementation, max_mode):
  q, k, v, kv_lengths, thr, one_splits, part_splits = (
      _shared_max_decode_case(max_mode))
  opts = dict(block_kv=16, max_mode=max_mode, threshold=thr,
              implementation=implementation, return_stats=True)
  if implementation == "pallas_triton":
    opts["interpret"] = True
  want, want_stats = bj.decode_attention(q, k, v, kv_lengths,
                                         num_splits=one_splits, **opts)
  unshared = sharding.decode_attention(
      q, k, v, kv_lengths, mesh=_mesh(), context_axis="model",
      num_splits=part_splits, **opts)[1]
  got, stats = jax.jit(lambda *a: sharding.decode_attention(
      *a, mesh=_mesh(), batch_axis="data", context_axis="model",
      share_max=True, num_splits=part_splits, **opts))(q, k, v, kv_lengths)
  # Without the shared max the parts decide otherwise.
  assert (int(jnp.sum(unshared.skipped_blocks))
          != int(jnp.sum(want_stats.skipped_blocks)))
  _assert_stats_equal(stats, want_stats)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_context_axis_errors():
  q, k, v = _decode_inputs(16, max_len=90)
  with pytest.raises(ValueError, match="max_len.*context_axis"):
    sharding.decode_attention(q, k, v, jnp.full((4,), 90, jnp.int32),
                              mesh=_mesh(), context_axis="model")
  with pytest.raises(ValueError, match="named twice"):
    sharding.decode_attention(q, k, v, jnp.full((4,), 90, jnp.int32),
                              mesh=_mesh(), batch_axis="model",
                              context_axis="model")
  q, k, v = _decode_inputs(16, max_len=96)
  lengths = jnp.full((4,), 96, jnp.int32)
  for opts, match in [
      (dict(), "share_max.*context_axis"),
      (dict(context_axis="model", max_mode="split"), "share_max.*'split'"),
      (dict(context_axis="model", block_kv=16), "multiple of block_kv"),
  ]:
    with pytest.raises(ValueError, match=match):
      sharding.decode_attention(q, k, v, lengths, mesh=_mesh(),
                                share_max=True, **opts)
  with pytest.raises(ValueError, match="max_axis_name.*'global'"):
    bj.decode_attention(q, k, v, lengths, max_axis_name="model")
  with pytest.raises(ValueError, match=r"initial_max.*\[batch, q_heads\]"):
    bj.decode_attention(q, k, v, lengths, initial_max=jnp.zeros((4, 2)))


# Each layout once, causal and not alternating (load balancing with both).
@pytest.mark.parametrize(
    "causal,batch_axis,head_axis,context_axis,load_balance", [
        (True, None, None, "model", False),
        (False, "data", None, "model", False),
        (True, None, "data", "model", False),
        (True, "data", None, "model", True),
        (False, None, "model", "data", True)])
def test_context_parallel_prefill_dense_equals_one_device(
    causal, batch_axis, head_axis, context_axis, load_balance):
  q, k, v = _inputs(20, batch=4, seq_len=128, q_heads=8, kv_heads=4)
  kv_lengths = jnp.asarray([128, 1, 70, 33], jnp.int32)
  opts = dict(causal=causal, kv_lengths=kv_lengths, block_q=16, block_kv=16,
              implementation="reference")
  want, want_stats = bj.attention(q, k, v, threshold=0.0, return_stats=True,
                                  **opts)
  got, stats = jax.jit(lambda q, k, v: sharding.attention(
      q, k, v, mesh=_mesh(), batch_axis=batch_axis, head_axis=head_axis,
      context_axis=context_axis, threshold=0.0, return_stats=True,
      load_balance=load_balance, **opts))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(stats.visited_blocks,
                                want_stats.visited_blocks)
  assert int(jnp.sum(stats.skipped_blocks)) == 0


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_context_parallel_prefill_skips_a_subset_of_one_device(
    implementation):
  q, k, v = _inputs(22, batch=2, seq_len=128, q_heads=4, kv_heads=4)
  opts = dict(causal=True, block_q=16, block_kv=16,
              implementation=implementation)
  if implementation == "pallas_triton":
    opts["interpret"] = True
  dense = bj.attention(q, k, v, threshold=0.0, **opts)
  want, want_stats = bj.attention(q, k, v, threshold=0.05,
                                  return_stats=True, **opts)
  got, stats = sharding.attention(q, k, v, mesh=_mesh(),
                                  context_axis="model", threshold=0.05,
                                  return_stats=True, **opts)
  np.testing.assert_array_equal(stats.visited_blocks,
                                want_stats.visited_blocks)
  # Each part's running max is at most one device's: it skips a subset.
  assert int(jnp.sum(stats.skipped_blocks)) > 0
  assert bool(jnp.all(stats.skipped_blocks <= want_stats.skipped_blocks))
  assert float(stats.total_sparsity) < float(want_stats.total_sparsity)
  # Skipping drops little mass: close to dense, closer than one device.
  err = float(jnp.max(jnp.abs(got - dense)))
  assert err <= float(jnp.max(jnp.abs(want - dense))) + 1e-6
  assert err < 0.1


# Causal and not, with and without load balancing, each once on the
# reference and once on the kernel (which takes the shared max as
# `initial_max`).
@pytest.mark.parametrize("implementation,causal,load_balance", [
    ("reference", True, False), ("reference", False, True),
    ("pallas_triton", True, True), ("pallas_triton", False, False)])
def test_context_parallel_prefill_sharing_the_max_equals_one_device(
    implementation, causal, load_balance):
  """share_max: GQA, ragged lengths (one ends inside a part, one in the
  first part), 4 context parts of 2 x 2 tiles; the same skip counts as one
  device and the same output."""
  q, k, v = _inputs(26, batch=4, seq_len=128, q_heads=8, kv_heads=4)
  kv_lengths = jnp.asarray([128, 90, 20, 128], jnp.int32)
  opts = dict(causal=causal, block_q=16, block_kv=16, kv_lengths=kv_lengths,
              implementation=implementation)
  if implementation == "pallas_triton":
    opts["interpret"] = True
  want, want_stats = bj.attention(q, k, v, threshold=0.05,
                                  return_stats=True, **opts)
  got, stats = jax.jit(lambda q, k, v: sharding.attention(
      q, k, v, mesh=_mesh(), batch_axis="data", context_axis="model",
      threshold=0.05, return_stats=True, share_max=True,
      load_balance=load_balance, **opts))(q, k, v)
  assert int(jnp.sum(want_stats.skipped_blocks)) > 0
  np.testing.assert_array_equal(stats.skipped_blocks,
                                want_stats.skipped_blocks)
  np.testing.assert_array_equal(stats.visited_blocks,
                                want_stats.visited_blocks)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_context_parallel_prefill_errors():
  q, k, v = _inputs(24, batch=2, seq_len=64, q_heads=4, kv_heads=4)
  with pytest.raises(ValueError, match="block_mask"):
    sharding.attention(q, k, v, mesh=_mesh(), context_axis="model",
                       block_mask=jnp.ones((2, 4, 4, 4), bool))
  with pytest.raises(ValueError, match="q_len == kv_len"):
    sharding.attention(q[:, :32], k, v, mesh=_mesh(), context_axis="model")
  q6, k6, v6 = _inputs(24, batch=2, seq_len=90, q_heads=4, kv_heads=4)
  with pytest.raises(ValueError, match="q_len.*context_axis"):
    sharding.attention(q6, k6, v6, mesh=_mesh(), context_axis="model")
  with pytest.raises(ValueError, match="share_max.*context_axis"):
    sharding.attention(q, k, v, mesh=_mesh(), batch_axis="data",
                       share_max=True)


def test_gpt_with_mesh_matches_one_device():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments.lm import gpt  # pylint: disable=g-import-not-at-top
  common = dict(num_layers=2, d_model=64, num_heads=8, num_kv_heads=4,
                threshold=0.1, implementation="reference", block_q=16,
                block_kv=16, position="rope", norm="rmsnorm")
  plain = gpt.GPT(50, 64, rngs=nnx.Rngs(0), **common)
  sharded = gpt.GPT(50, 64, rngs=nnx.Rngs(0), mesh=_mesh(),
                    batch_axis="data", head_axis="model", **common)
  tokens = jax.random.randint(jax.random.PRNGKey(13), (4, 48), 0, 50)
  want, want_stats = plain(tokens, return_stats=True)
  got, stats = sharded(tokens, return_stats=True)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  for a, b in zip(stats, want_stats):
    _assert_stats_equal(a, b)


def test_eager_sharded_calls_trace_once(monkeypatch):
  # A fresh shard_map per call would trace (and compile) every eager call
  # again; equal calls reuse one jitted map, and a new shape traces anew.
  traces = []
  attention = sharding.api.attention

  def counting(*args, **kwargs):
    traces.append(args[0].shape)
    return attention(*args, **kwargs)

  monkeypatch.setattr(sharding.api, "attention", counting)
  q, k, v = _inputs(31, batch=4, seq_len=32, q_heads=4, kv_heads=4,
                    head_dim=16)
  call = lambda q, k, v, thr: sharding.attention(  # pylint: disable=g-long-lambda
      q, k, v, mesh=_mesh(), batch_axis="data", head_axis="model",
      threshold=thr, block_q=16, block_kv=16, implementation="reference",
      return_stats=True)
  first, stats = call(q, k, v, 0.1)
  again, stats_again = call(q, k, v, 0.1)
  assert len(traces) == 1
  np.testing.assert_array_equal(first, again)
  assert (stats_again.block_q, stats_again.block_kv) == (stats.block_q,
                                                         stats.block_kv)
  call(q, k, v, 0.2)                       # another static λ: a new body
  call(q[:2], k[:2], v[:2], 0.1)           # another shape
  assert len(traces) == 3
