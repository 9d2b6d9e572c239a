"""The Pallas backward (Triton lowering) against the oracle's autodiff over
the same kept blocks, and its CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import config as config_lib
from blasst_jax import testing
from blasst_jax.kernels import pallas_triton
from blasst_jax.kernels import pallas_triton_bwd

BLOCK_Q, BLOCK_KV = 32, 16


@pytest.mark.parametrize(
    "causal,q_len,kv_len,q_heads,kv_heads,threshold,lengths,masked",
    [(True, 200, 200, 4, 2, 0.02, (200, 117), False),   # GQA, ragged
     (False, 120, 250, 2, 1, 0.01, (250, 99), True),    # MQA, block mask
     (True, 64, 64, 2, 2, 0.0, (64, 64), False)])       # dense
def test_backward_matches_oracle_autodiff(causal, q_len, kv_len, q_heads,
                                          kv_heads, threshold, lengths,
                                          masked):
  shape = testing.AttentionShape(batch=2, q_len=q_len, kv_len=kv_len,
                                 q_heads=q_heads, kv_heads=kv_heads,
                                 head_dim=24)   # padded to 32 in the kernel
  key = testing.key_for("backward", causal, q_len, kv_len, masked)
  q, k, v = shape.inputs(key, sharpness=(6.0, 16.0), window=12)
  kv_lengths = jnp.array(lengths, jnp.int32)
  nq, nk = -(-q_len // BLOCK_Q), -(-kv_len // BLOCK_KV)
  block_mask = None
  if masked:
    block_mask = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.7,
                                      (2, q_heads, nq, nk)).at[..., 0].set(True)
  log_thr = config_lib.log_threshold(jnp.full((2,), threshold))
  args = (q, k, v, kv_lengths, log_thr) + (
      () if block_mask is None else (block_mask,))
  common = dict(causal=causal, sm_scale=24 ** -0.5, block_q=BLOCK_Q,
                block_kv=BLOCK_KV, interpret=True)
  out, lse, _, _, skip = pallas_triton.attention_forward(
      *args, return_skip_mask=True, **common)
  if threshold:
    assert int(jnp.sum(skip)) > 0
  keep = ~skip if block_mask is None else block_mask & ~skip
  d_out = jax.random.normal(jax.random.fold_in(key, 2), out.shape)
  grads = pallas_triton_bwd.attention_backward(q, k, v, out, lse, d_out,
                                               kv_lengths, keep, **common)

  def kept_attention(q, k, v):
    return bj.reference.blockwise_attention(
        q, k, v, block_q=BLOCK_Q, block_kv=BLOCK_KV, causal=causal,
        sm_scale=24 ** -0.5, kv_lengths=kv_lengths,
        log_threshold=jnp.full((2,), -jnp.inf), block_mask=keep).out

  _, vjp = jax.vjp(kept_attention, q, k, v)
  for got, want, name in zip(grads, vjp(d_out), ("dq", "dk", "dv")):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=1e-4,
                               err_msg=name)
  # Rows that see no key (the second sequence past its length has keys;
  # rows do not) and padded keys get zero gradients, never NaN.
  for g in grads:
    assert not np.any(np.isnan(np.asarray(g)))
  np.testing.assert_array_equal(grads[1][1, lengths[1]:], 0.0)


def lower_backward(backward, *, d, causal, block_q, block_kv):
  """`backward` (a module's attention_backward) lowered for an H100 on a
  GQA problem of 1000 rows; returns the lowered text."""
  b, hq, hkv, length = 1, 8, 2, 1000
  sds = jax.ShapeDtypeStruct
  nq, nk = -(-length // block_q), -(-length // block_kv)

  def fn(q, k, v, out, lse, d_out, kv_lengths, keep):
    return backward(q, k, v, out, lse, d_out, kv_lengths, keep,
                    causal=causal, sm_scale=d ** -0.5, block_q=block_q,
                    block_kv=block_kv)

  qs = sds((b, length, hq, d), jnp.bfloat16)
  kvs = sds((b, length, hkv, d), jnp.bfloat16)
  return testing.lower_for_h100(
      fn, qs, kvs, kvs, qs, sds((b, hq, length), jnp.float32), qs,
      sds((b,), jnp.int32), sds((b, hq, nq, nk), jnp.bool_)).as_text()


def test_backward_kernels_lower_for_cuda():
  text = lower_backward(pallas_triton_bwd.attention_backward, d=128,
                        causal=True, block_q=128, block_kv=64)
  assert "blasst_backward_dkdv_triton" in text
  assert "blasst_backward_dq_triton" in text


def test_forward_tiles_are_cut_into_backward_tiles():
  """A 128 x 128 keep mask (the forward's tiles) gives the same gradients
  on the 64 x 64 backward tiles as the oracle over the same kept blocks."""
  shape = testing.AttentionShape(batch=1, q_len=300, kv_len=300, q_heads=2,
                                 kv_heads=1, head_dim=16)
  key = testing.key_for("backward_cut")
  q, k, v = shape.inputs(key, sharpness=(6.0, 16.0), window=12)
  kv_lengths = jnp.array([300], jnp.int32)
  keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.6,
                              (1, 2, 3, 3)).at[..., 0].set(True)
  out, lse, *_ = pallas_triton.attention_forward(
      q, k, v, kv_lengths, jnp.full((1,), -jnp.inf), keep, causal=True,
      sm_scale=0.25, block_q=128, block_kv=128, interpret=True)
  d_out = jax.random.normal(jax.random.fold_in(key, 2), out.shape)
  grads = pallas_triton_bwd.attention_backward(
      q, k, v, out, lse, d_out, kv_lengths, keep, causal=True, sm_scale=0.25,
      block_q=128, block_kv=128, interpret=True)
  _, vjp = jax.vjp(lambda q, k, v: bj.reference.blockwise_attention(
      q, k, v, block_q=128, block_kv=128, causal=True, sm_scale=0.25,
      block_mask=keep).out, q, k, v)
  for got, want in zip(grads, vjp(d_out)):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=1e-4)


def check_hopper_backward(*, batch, length, q_heads, kv_heads, head_dim,
                          kv_lengths, causal, fuse_dq, interpret=None):
  """The Mosaic GPU backward against the oracle's autodiff over the same kept
  blocks (a random keep mask on the forward's 64 x 128 tiles, rows of keys
  with sinks and local windows); bf16 gradients within 1.5e-2 of the
  largest; keys past a sequence's length get zero dK."""
  from blasst_jax import patterns  # pylint: disable=g-import-not-at-top
  from blasst_jax.kernels import pallas_mosaic_bwd  # pylint: disable=g-import-not-at-top
  d = head_dim
  key = testing.key_for("hopper_backward", length, head_dim, causal)
  q, k, v = patterns.sink_local_qkv(
      key, batch=batch, seq_len=length, q_heads=q_heads, kv_heads=kv_heads,
      head_dim=d, window=16, sharpness=(8.0, 16.0), dtype=jnp.bfloat16)
  kv_lengths = jnp.array(kv_lengths, jnp.int32)
  keep = jax.random.bernoulli(
      jax.random.fold_in(key, 1), 0.7,
      (batch, q_heads, -(-length // 64), -(-length // 128))).at[..., 0].set(True)

  def kept_attention(q, k, v):
    return bj.reference.blockwise_attention(
        q, k, v, block_q=64, block_kv=128, causal=causal, sm_scale=d ** -0.5,
        kv_lengths=kv_lengths, block_mask=keep)

  oracle = kept_attention(q, k, v)
  d_out = jax.random.normal(jax.random.fold_in(key, 2), q.shape
                            ).astype(jnp.bfloat16)
  grads = jax.block_until_ready(pallas_mosaic_bwd.attention_backward(
      q, k, v, oracle.out, oracle.lse, d_out, kv_lengths, keep, causal=causal,
      sm_scale=d ** -0.5, block_q=64, block_kv=128,
      config=pallas_mosaic_bwd.MosaicBwdConfig(fuse_dq=fuse_dq),
      interpret=interpret))
  f32 = lambda x: x.astype(jnp.float32)
  _, vjp = jax.vjp(lambda *a: kept_attention(*a).out, f32(q), f32(k), f32(v))
  for got, want, name in zip(grads, vjp(f32(d_out)), ("dq", "dk", "dv")):
    assert got.shape == want.shape and got.dtype == jnp.bfloat16, name
    err = float(jnp.max(jnp.abs(f32(got) - want)) / jnp.max(jnp.abs(want)))
    assert err < 1.5e-2, (name, err)   # bf16 P and dS operands
  for i, n in enumerate(np.asarray(kv_lengths)):
    np.testing.assert_array_equal(np.asarray(f32(grads[1][i, n:])), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_dq", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_backward_compiled_matches_oracle_autodiff(head_dim, causal,
                                                         fuse_dq):
  """Compiled on a GPU: both dQ strategies at both head sizes, GQA, ragged
  lengths (one not a multiple of 64), a random keep mask."""
  check_hopper_backward(
      batch=2, length=1000, q_heads=4, kv_heads=2, head_dim=head_dim,
      kv_lengths=(1000, 613), causal=causal, fuse_dq=fuse_dq)


@pytest.mark.parametrize("fuse_dq", [True, False])
def test_hopper_backward_interpreted_matches_oracle_without_races(fuse_dq):
  """The Mosaic GPU backward in Pallas' GPU interpret mode (CPU): causal,
  GQA, a ragged sequence; one kernel with dQ reduced from dS, or a second
  dQ kernel."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  interpret_pallas_call.reset_gpu_interpret_mode_state()
  check_hopper_backward(
      batch=2, length=200, q_heads=2, kv_heads=1, head_dim=64,
      kv_lengths=(200, 150), causal=True, fuse_dq=fuse_dq,
      interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("d,causal", [(128, True), (64, False)])
def test_hopper_backward_lowers_for_cuda(d, causal):
  from blasst_jax.kernels import pallas_mosaic_bwd  # pylint: disable=g-import-not-at-top
  text = lower_backward(pallas_mosaic_bwd.attention_backward, d=d,
                        causal=causal, block_q=64, block_kv=128)
  if d == 64:   # one kernel, dQ reduced in it
    assert "blasst_backward_mosaic" in text and "dq_mosaic" not in text
  else:
    assert "blasst_backward_dkdv_mosaic" in text
    assert "blasst_backward_dq_mosaic" in text


@pytest.mark.parametrize("kwargs,message", [
    (dict(compute_registers=240), "compute_registers"),   # over-commits
    (dict(memory_registers=20), "memory_registers"),
    (dict(compute_registers=228), "multiple of 8"),
    (dict(num_stages=1), "num_stages"),
    (dict(fuse_dq="yes"), "fuse_dq"),
    (dict(extra_k_stages=-1), "extra_k_stages"),
    (dict(raster="batch"), "raster"),
    (dict(overlap_qk=1), "overlap_qk"),
    (dict(overlap_dense=1), "overlap_dense"),
    (dict(one_barrier_vote="yes"), "one_barrier_vote"),
    (dict(cluster_q=4), "cluster_q"),
    (dict(cluster_q=2, copy_v_if_kept=True), "copy_v_if_kept"),
    (dict(trace_dir="/tmp/t"), "trace_events"),
    (dict(trace_events=64), "trace_dir"),
    (dict(trace_dir="/tmp/t", trace_events=-1), "trace_events"),
    (dict(compute_wgs=4), "compute_wgs"),
    (dict(compute_wgs=3, overlap_qk=False), "overlap_qk"),
    # Three compute warpgroups of 168 registers over-commit the file.
    (dict(compute_wgs=3, compute_registers=168), "compute_registers")])
def test_hopper_configs_reject_knobs_that_cannot_run(kwargs, message):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  from blasst_jax.kernels import pallas_mosaic_bwd  # pylint: disable=g-import-not-at-top
  if {"extra_k_stages", "raster", "overlap_qk", "overlap_dense",
      "one_barrier_vote",
      "cluster_q", "trace_dir", "trace_events",
      "compute_wgs"} & set(kwargs):  # forward's
    with pytest.raises(ValueError, match=message):
      pallas_mosaic.MosaicConfig(**kwargs)
    return
  with pytest.raises(ValueError, match=message):
    pallas_mosaic_bwd.MosaicBwdConfig(**kwargs)
  if not {"fuse_dq", "memory_registers"} & set(kwargs):
    with pytest.raises(ValueError, match=message):
      pallas_mosaic.MosaicConfig(**kwargs)
  # With a smaller memory warpgroup the compute warpgroups may have 240.
  pallas_mosaic_bwd.MosaicBwdConfig(compute_registers=240, memory_registers=24)


def test_hopper_forward_config_resolves_warpgroups_and_registers():
  """compute_wgs and compute_registers left to None are filled in per
  head_dim; explicit registers that over-commit the resolved warpgroups
  raise before anything is traced."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  for d in (64, 128, 256):
    cfg = pallas_mosaic.MosaicConfig().resolved(d)
    assert cfg.compute_wgs == pallas_mosaic.default_compute_wgs(d)
    assert cfg.compute_registers == pallas_mosaic.REGISTERS[cfg.compute_wgs][0]
  three = pallas_mosaic.MosaicConfig(compute_wgs=3).resolved(128)
  assert (three.compute_wgs, three.compute_registers) == (
      3, pallas_mosaic.REGISTERS[3][0])
  assert three.memory_registers == pallas_mosaic.REGISTERS[3][1]
  # A larger memory warpgroup leaves the compute warpgroups the rest.
  roomy = pallas_mosaic.MosaicConfig(compute_wgs=3, memory_registers=56)
  assert roomy.resolved(64).compute_registers == 152
  # The dense build overlaps three at head_dim 64 with its softmax under a
  # branch (`overlap_dense`), else it keeps the ping-pong of two.
  assert pallas_mosaic.MosaicConfig().resolved(
      64, skip_enabled=False).compute_wgs == 3
  assert pallas_mosaic.MosaicConfig(overlap_dense=False).resolved(
      64, skip_enabled=False).compute_wgs == 2
  # The two-turn pipeline is built for two warpgroups whatever the head_dim.
  assert pallas_mosaic.MosaicConfig(overlap_qk=False).resolved(
      64).compute_wgs == 2
  # setmaxnreg shares out the launch's registers: 3 x 168 a thread with
  # two compute warpgroups, 4 x 128 with three.
  assert [pallas_mosaic.register_budget(c) for c in (2, 3)] == [504, 512]
  assert pallas_mosaic.MosaicConfig(memory_registers=48).resolved(
      128).compute_registers == 224
  with pytest.raises(ValueError, match="share 504 registers"):
    pallas_mosaic.MosaicConfig(compute_registers=232, memory_registers=48)
  with pytest.raises(ValueError, match="compute_wgs"):
    pallas_mosaic.MosaicConfig(compute_wgs=3.0)
  wide = pallas_mosaic.MosaicConfig(compute_registers=232)
  assert wide.resolved(128).compute_registers == 232
  if pallas_mosaic.default_compute_wgs(64) == 3:
    with pytest.raises(ValueError, match="compute_registers"):
      wide.resolved(64)
