"""Bad input gets a ValueError naming the argument, before any kernel runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax.kernels import pallas_triton
from blasst_jax.ops import base as ops_base
from blasst_jax.ops.attention import pallas_mosaic_gpu as mosaic_op
from blasst_jax import testing

B, L, H, D = 2, 40, 4, 16


@pytest.fixture(autouse=True)
def no_kernel_tracing(monkeypatch):
  """Validation must fail before the kernel is traced."""
  def fail(*args, **kwargs):
    raise AssertionError("kernel traced before validation")
  monkeypatch.setattr(pallas_triton, "attention_forward", fail)


def qkv(dtype=jnp.float32, hkv=2):
  key = testing.key_for("api")
  q = jax.random.normal(key, (B, L, H, D), dtype)
  k = jax.random.normal(key, (B, L, hkv, D), dtype)
  return q, k, k


BAD_CALLS = {
    "rank": (lambda q, k, v: (q[0], k, v), {}, r"`q` must have rank 4"),
    "kv_rank": (lambda q, k, v: (q, k[..., None], v), {}, r"`k` must have rank 4"),
    "kv_shapes": (lambda q, k, v: (q, k, v[:, :-1]), {}, r"`k` and `v`"),
    "batch": (lambda q, k, v: (q[:1], k, v), {}, r"batch size"),
    "head_dim": (lambda q, k, v: (q[..., :8], k, v), {}, r"head_dim"),
    "heads": (lambda q, k, v: (q[:, :, :3], k, v), {}, r"multiple of num_kv_heads"),
    "dtype_mix": (lambda q, k, v: (q.astype(jnp.bfloat16), k, v), {}, r"share one dtype"),
    "dtype_int": (lambda q, k, v: tuple(x.astype(jnp.int32) for x in (q, k, v)), {},
                  r"not supported"),
    "not_array": (lambda q, k, v: (q.tolist(), k, v), {}, r"`q` must be an array"),
    "lambda_neg": (None, dict(threshold=-0.1), r"`threshold`.*\[0, 1\)"),
    "lambda_one": (None, dict(threshold=1.0), r"`threshold`.*\[0, 1\)"),
    "lambda_nan": (None, dict(threshold=float("nan")), r"`threshold`"),
    "lambda_shape": (None, dict(threshold=jnp.zeros((3,))), r"`threshold`.*shape"),
    "block_q": (None, dict(block_q=48), r"`block_q` must be a power of two"),
    "block_kv_small": (None, dict(block_kv=8), r"`block_kv` must be a power of two"),
    "implementation": (None, dict(implementation="cuda"), r"`implementation` must be"),
    "kv_lengths_shape": (None, dict(kv_lengths=jnp.array([3])), r"`kv_lengths`.*shape"),
    "kv_lengths_dtype": (None, dict(kv_lengths=jnp.array([3.0, 4.0])), r"`kv_lengths`.*integer"),
    "block_mask_shape": (None, dict(block_mask=jnp.ones((B, H, 2, 2), bool),
                                    block_q=64, block_kv=64),
                         r"`block_mask` must have shape"),
    # 40 queries in 5 blocks: no power-of-two block size does that.
    "block_mask_blocks": (None, dict(block_mask=jnp.ones((B, H, 5, 3), bool)),
                          r"`block_mask` has 5 blocks along q_len"),
    "block_mask_dtype": (None, dict(block_mask=jnp.ones((B, H, 1, 1), jnp.int32),
                                    block_q=64, block_kv=64), r"`block_mask` must be bool"),
    "sm_scale": (None, dict(sm_scale=-1.0), r"`sm_scale`"),
    "sm_scale_bool": (None, dict(sm_scale=True), r"`sm_scale`"),
}


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_value_error(case, implementation):
  transform, kwargs, pattern = BAD_CALLS[case]
  q, k, v = qkv()
  if transform is not None:
    q, k, v = transform(q, k, v)
  kwargs = {"implementation": implementation, **kwargs}
  with pytest.raises(ValueError, match=pattern):
    bj.attention(q, k, v, **kwargs)


def test_kernel_specific_errors():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="`kernel_config`"):
    bj.attention(q, k, v, implementation="reference",
                 kernel_config=pallas_triton.TritonConfig())
  with pytest.raises(ValueError, match="`kernel_config`"):
    bj.attention(q, k, v, implementation="pallas_triton", kernel_config=3)
  big = jnp.zeros((1, 16, 1, 512))
  with pytest.raises(ValueError, match="head_dim 512"):
    bj.attention(big, big, big, implementation="pallas_triton")


def test_config_validation():
  with pytest.raises(ValueError, match="either `threshold` or"):
    bj.SkipSoftmaxConfig(threshold=0.1, threshold_scale_factor=1.0)
  with pytest.raises(ValueError, match="keys must be"):
    bj.SkipSoftmaxConfig(threshold_scale_factor={"train": 1.0})
  with pytest.raises(ValueError, match="non-negative"):
    bj.SkipSoftmaxConfig(threshold_scale_factor=-2.0)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    bj.SkipSoftmaxConfig(threshold=1.5)


def test_config_thresholds():
  cfg = bj.SkipSoftmaxConfig(threshold_scale_factor={"prefill": 100.0,
                                                      "decode": 10.0})
  assert cfg.threshold_for(1000) == pytest.approx(0.1)
  assert cfg.threshold_for(1000, "decode") == pytest.approx(0.01)
  assert cfg.threshold_for(10) == 0.5          # clipped for short contexts
  np.testing.assert_allclose(cfg.threshold_for(jnp.array([1000, 2000])),
                             [0.1, 0.05], rtol=1e-6)
  assert hash(cfg) == hash(bj.SkipSoftmaxConfig(
      threshold_scale_factor={"decode": 10.0, "prefill": 100.0}))
  assert bj.SkipSoftmaxConfig().threshold_for(5) == 0.0
  with pytest.raises(ValueError, match="phase"):
    cfg.threshold_for(10, "train")


def test_stats_sparsity_and_repr():
  stats = bj.SkipStats(jnp.array([[1, 0]]), jnp.array([[4, 0]]))
  np.testing.assert_allclose(stats.sparsity, [[0.25, 0.0]])
  assert float(stats.total_sparsity) == 0.25
  assert "sparsity=0.250" in repr(stats)
  leaves = jax.tree.leaves(jax.jit(lambda s: s)(stats))
  assert len(leaves) == 2


def test_mosaic_needs_a_gpu_and_supported_inputs():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU"):
    bj.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                 v.astype(jnp.bfloat16), implementation="pallas_mosaic")
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    bj.attention(q, k, v, implementation="pallas_mosaic", interpret=True)


def test_default_implementation_follows_device_and_problem(monkeypatch):
  assert bj.default_implementation("cpu") == "reference"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(ops_base, "is_hopper", lambda: True)
  assert bj.default_implementation() == "pallas_mosaic"
  assert bj.default_implementation(dtype=jnp.bfloat16,
                                   head_dim=128) == "pallas_mosaic"
  assert bj.default_implementation(dtype=jnp.float32) == "pallas_triton"
  assert bj.default_implementation(head_dim=96) == "pallas_triton"
  monkeypatch.setattr(ops_base, "is_hopper", lambda: False)
  assert bj.default_implementation(dtype=jnp.bfloat16) == "pallas_triton"


def test_default_tiles_are_stated_and_reported():
  assert bj.api.default_tiles("reference", head_dim=64) == (128, 64)
  assert bj.api.default_tiles("pallas_triton", head_dim=64) == (128, 64)
  assert bj.api.default_tiles("pallas_mosaic", head_dim=128) == (64, 128)
  assert bj.api.default_tiles("pallas_mosaic", head_dim=256) == (64, 64)
  q, k, v = qkv()
  _, stats = bj.attention(q, k, v, threshold=1e-2, return_stats=True)
  assert stats.tiles == (64, 64)        # 128 x 64, shrunk to cover L = 40
  _, stats = bj.attention(q, k, v, threshold=1e-2, return_stats=True,
                          block_q=16, block_kv=32)
  assert stats.tiles == (16, 32) and "tiles=16x32" in repr(stats)
  _, stats = bj.decode_attention(q[:, -1], k, v, jnp.full((B,), L),
                                 block_kv=16, return_stats=True)
  assert stats.tiles == (None, 16) and "block_kv=16" in repr(stats)


@pytest.mark.parametrize("d,block_kv,listed,recorded", [
    (128, 128, 0, 64), (64, 128, 0, 512), (256, 64, 0, 64), (128, 128, 512, 0)])
def test_mosaic_k_ring_takes_the_shared_memory_left(d, block_kv, listed,
                                                     recorded):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  config = pallas_mosaic.MosaicConfig()
  depth = pallas_mosaic.k_ring_depth(config, 64, block_kv, d, listed, recorded)
  assert config.num_stages <= depth
  assert depth <= config.num_stages + pallas_mosaic.MAX_EXTRA_K_STAGES
  bytes_at = lambda k_stages: pallas_mosaic.shared_memory_bytes(
      64, block_kv, d, config.num_stages, listed, recorded, k_stages=k_stages)
  assert depth == config.num_stages or bytes_at(depth) <= (
      pallas_mosaic.MAX_SHARED_MEMORY)
  # The next slot would not fit, or the ring is at its cap.
  assert (depth == config.num_stages + pallas_mosaic.MAX_EXTRA_K_STAGES
          or bytes_at(depth + 1) > pallas_mosaic.MAX_SHARED_MEMORY)
  fixed = pallas_mosaic.MosaicConfig(extra_k_stages=1)
  assert pallas_mosaic.k_ring_depth(fixed, 64, block_kv, d) == 3


def _mosaic_plan(q_len, kv_len, head_dim, block_q, block_kv, config=None,
                 block_mask=None):
  """The Hopper op's plan for a bf16 problem (tiles, config)."""
  return mosaic_op.OP.prepare(
      q_len=q_len, kv_len=kv_len, head_dim=head_dim, dtype=jnp.bfloat16,
      block_q=block_q, block_kv=block_kv, block_mask=block_mask,
      kernel_config=config)


def test_mosaic_shared_memory_check(monkeypatch):
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(ops_base, "is_hopper", lambda: True)
  with pytest.raises(ValueError, match="shared memory"):
    _mosaic_plan(1024, 1024, 128, 64, 128,
                 pallas_mosaic.MosaicConfig(num_stages=3))
  with pytest.raises(ValueError, match="extra_k_stages=2"):
    _mosaic_plan(1024, 1024, 128, 64, 128,
                 pallas_mosaic.MosaicConfig(extra_k_stages=2))
  with pytest.raises(ValueError, match="head_dim 64, 128 or 256"):
    _mosaic_plan(1024, 1024, 96, None, None)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    mosaic_op.OP.prepare(q_len=1024, kv_len=1024, head_dim=128,
                         dtype=jnp.float32, block_q=None, block_kv=None)
  plan = _mosaic_plan(1024, 1024, 128, None, None)
  assert (plan.block_q, plan.block_kv) == (64, 128)
  plan = _mosaic_plan(20, 20, 128, None, None)
  assert (plan.block_q, plan.block_kv) == (64, 64)
  # Emulated exponentials: whole 8-column groups, within a score tile.
  with pytest.raises(ValueError, match="exp2_fma_cols"):
    pallas_mosaic.MosaicConfig(exp2_fma_cols=12)
  with pytest.raises(ValueError, match="exp2_fma_cols.*block_kv=64"):
    _mosaic_plan(1024, 1024, 256, None, None,
                 pallas_mosaic.MosaicConfig(exp2_fma_cols=128))
  assert _mosaic_plan(1024, 1024, 64, None, None, pallas_mosaic.MosaicConfig(
      exp2_fma_cols=128)).config.exp2_fma_cols == 128


def test_block_mask_on_mosaic_tiles_and_shared_memory(monkeypatch):
  fit = mosaic_op.OP.mask_tiles_fit
  assert fit(1024, 1024, 64, 128, 128) and fit(1024, 1024, 64, 64, 256)
  assert not fit(1024, 1024, 128, 128, 128)    # 128-row tiles: Triton
  assert not fit(1024, 1024, 64, 128, 256)     # above its KV block at hd 256
  assert not fit(1024, 1024, 32, 32, 128)      # below one wgmma tile
  assert fit(20, 20, 32, 32, 128)              # one tile covers it all
  monkeypatch.setattr(ops_base, "is_hopper", lambda: True)
  mask = jnp.ones((1, 2, 16, 16), bool)
  with pytest.raises(ValueError, match="64x64 wgmma tiles"):
    _mosaic_plan(1024, 1024, 256, 32, 32, block_mask=mask)
  # The block list of a 600k-key sequence does not fit beside the tiles.
  with pytest.raises(ValueError, match="block list of 9375 KV blocks"):
    _mosaic_plan(1024, 600_000, 256, 64, 64, block_mask=mask)
  plan = _mosaic_plan(1024, 100_000, 256, 64, 64, block_mask=mask)
  assert (plan.block_q, plan.block_kv) == (64, 64)


def test_initial_max_errors_name_the_argument():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="return_lse"):
    bj.attention(q, k, v, initial_max=jnp.zeros((B, H, L)))
  with pytest.raises(ValueError, match="initial_max.*shape"):
    bj.attention(q, k, v, return_lse=True, initial_max=jnp.zeros((B, L)))
  with pytest.raises(ValueError, match="initial_max.*float"):
    bj.attention(q, k, v, return_lse=True,
                 initial_max=jnp.zeros((B, H, L), jnp.int32))
  with pytest.raises(ValueError, match="pallas_mosaic"):
    bj.attention(q, k, v, return_lse=True, initial_max=jnp.zeros((B, H, L)),
                 implementation="pallas_mosaic")
