"""The fused XAttention estimate kernel (Pallas interpret mode on CPU, and
its CUDA lowering) against the XLA estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blasst_jax import patterns
from blasst_jax import xattention
from blasst_jax import testing
from blasst_jax.kernels import xattention_triton

SMALL = xattention_triton.EstimateConfig(block_rows=16, block_cols=32)


def estimates(q, k, kv_lengths, *, causal, block_size, stride, config=SMALL):
  common = dict(block_size=block_size, stride=stride, causal=causal,
                kv_lengths=kv_lengths)
  want = xattention.block_scores(q, k, implementation="xla", **common)
  got = xattention.block_scores(q, k, implementation="pallas_triton",
                                config=config, interpret=True, **common)
  return got, want


@pytest.mark.parametrize(
    "q_len,kv_len,q_heads,kv_heads,head_dim,block_size,stride,causal,lengths",
    [(1000, 1000, 4, 2, 32, 64, 8, True, None),        # GQA, ragged tail
     (700, 700, 2, 1, 48, 64, 4, False, (500, 333)),   # MQA, odd head_dim
     (1024, 1024, 2, 2, 64, 128, 16, True, (1024, 600)),
     (300, 900, 3, 3, 16, 32, 2, False, (900, 1)),     # rectangular, 1 key
     (512, 512, 2, 2, 32, 64, 8, True, (0, 512))])     # empty sequence
def test_kernel_matches_xla_estimate(q_len, kv_len, q_heads, kv_heads,
                                     head_dim, block_size, stride, causal,
                                     lengths):
  key = testing.key_for("xattn_kernel", q_len, kv_len, stride, causal)
  kq, kk = jax.random.split(key)
  q, k, _ = patterns.sink_local_qkv(
      kq, batch=2, seq_len=max(q_len, kv_len), q_heads=q_heads,
      kv_heads=kv_heads, head_dim=head_dim, window=48, sharpness=(4.0, 12.0))
  q, k = q[:, :q_len], k[:, :kv_len]
  k = k + 0.3 * jax.random.normal(kk, k.shape)  # no exact ties
  kv_lengths = None if lengths is None else jnp.asarray(lengths)
  got, want = estimates(q, k, kv_lengths, causal=causal,
                        block_size=block_size, stride=stride)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  # Every real query group's softmax sums to one (none when no key is
  # visible), so a row of blocks sums to its real groups.
  rows = np.asarray(got).sum(-1)
  assert np.all(rows <= block_size // stride + 1e-3) and np.all(rows >= 0)


def test_kernel_selection_matches_xla_selection():
  q, k, _ = patterns.sink_local_qkv(
      testing.key_for("xattn_kernel_select"), batch=1, seq_len=1024,
      q_heads=4, kv_heads=2, head_dim=32, window=64, sharpness=(4.0, 12.0))
  kwargs = dict(block_size=64, stride=8, threshold=0.9, causal=True)
  want = xattention.select_blocks(q, k, implementation="xla", **kwargs)
  got = xattention.select_blocks(q, k, implementation="pallas_triton",
                                 config=SMALL, interpret=True, **kwargs)
  # f32 rounding may flip a block at the exact threshold: allow a few.
  assert np.mean(np.asarray(got) != np.asarray(want)) < 0.01


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("stride", [8, 16])
def test_kernel_lowers_for_cuda(causal, stride):
  b, length, hq, hkv, d = 1, 4000, 8, 2, 128
  sds = jax.ShapeDtypeStruct

  def fn(q, k, kv_lengths):
    return xattention_triton.chunk_sums(
        q, k, kv_lengths, block_size=128, stride=stride, causal=causal,
        sm_scale=d ** -0.5)

  lowered = testing.lower_for_h100(
      fn, sds((b, length, hq, d), jnp.bfloat16),
      sds((b, length, hkv, d), jnp.bfloat16), sds((b,), jnp.int32))
  assert lowered.as_text().count("blasst_xattention_estimate") >= 1


def test_bad_estimate_options_are_rejected():
  q = jnp.zeros((1, 96, 2, 16))
  with pytest.raises(ValueError, match="implementation"):
    xattention.block_scores(q, q, block_size=32, stride=8,
                            implementation="cuda")
  with pytest.raises(ValueError, match="power of two"):  # 96 / 8 = 12 groups
    xattention.block_scores(q, q, block_size=96, stride=8,
                            implementation="pallas_triton")
  # The default falls back to XLA for such shapes.
  assert xattention.block_scores(q, q, block_size=96, stride=8,
                                 interpret=True).shape == (1, 2, 1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("stride", [8, 16])
def test_compiled_kernel_matches_xla_on_gpu(causal, stride):
  q, k, _ = patterns.sink_local_qkv(
      testing.key_for("xattn_gpu", causal, stride), batch=2, seq_len=5000,
      q_heads=8, kv_heads=2, head_dim=128, window=256, sharpness=(4.0, 20.0),
      dtype=jnp.bfloat16)
  kv_lengths = jnp.array([5000, 3001])
  common = dict(block_size=128, stride=stride, causal=causal,
                kv_lengths=kv_lengths)
  want = xattention.block_scores(q, k, implementation="xla", **common)
  got = xattention.block_scores(q, k, implementation="pallas_triton", **common)
  # bf16 inputs, f32 accumulation in both; the order of the sums differs.
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)
