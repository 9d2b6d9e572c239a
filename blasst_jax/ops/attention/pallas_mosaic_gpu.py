"""The Hopper kernel (Pallas Mosaic GPU) as an op: capability checks, tiles
(64-row wgmma tiles, block masks cut into them), the shared-memory budget,
and the backward choice (`kernels/pallas_mosaic_bwd.py` at head_dim 64/128,
the Triton backward otherwise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blasst_jax import config as config_lib
from blasst_jax.kernels import pallas_mosaic
from blasst_jax.kernels import pallas_mosaic_bwd
from blasst_jax.ops import base
from blasst_jax.ops.attention import base as attention_base
from blasst_jax.ops.attention import pallas_triton

DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128, 256)
# One wgmma tile: the smallest q tile and KV block the kernel runs.
MIN_TILE = 64


def tile_counts(q_len, kv_len, block_q, block_kv) -> tuple[int, int]:
  """(q tiles, KV blocks) of a sequence pair."""
  return -(-q_len // block_q), -(-kv_len // block_kv)


def widened_tile_counts(q_len, kv_len, block_q, block_kv) -> tuple[int, int]:
  """`tile_counts` once the tiles are widened to one wgmma tile."""
  return tile_counts(q_len, kv_len, max(block_q, MIN_TILE),
                     max(block_kv, MIN_TILE))


class PallasMosaicGpuAttention(attention_base.PallasAttentionOp):
  """`implementation="pallas_mosaic"`: Hopper, bf16/f16, head_dim
  64/128/256. Tiles default to 64 x 128 (64 x 64 at head_dim 256): a q tile
  is one compute warpgroup's rows."""

  name = "pallas_mosaic"
  config_class = pallas_mosaic.MosaicConfig

  def default_tiles(self, head_dim):
    return (pallas_mosaic.DEFAULT_BLOCK_Q,
            pallas_mosaic.default_block_kv(head_dim))

  def fits(self, dtype=None, head_dim=None) -> bool:
    """Whether the kernel takes this dtype and head_dim (None: any)."""
    return ((dtype is None or jnp.dtype(dtype) in map(jnp.dtype, DTYPES))
            and (head_dim is None or head_dim in HEAD_DIMS))

  def mask_split(self, block_q, block_kv, head_dim):
    """(q, kv) factors that cut mask blocks of block_q x block_kv into this
    op's default tiles (e.g. XAttention's 128 x 128 blocks -> 2 x 1 tiles of
    64 x 128), or None when they are those tiles or do not divide
    evenly."""
    tq, tk = self.default_tiles(head_dim)
    if block_q % tq or block_kv % tk or (block_q, block_kv) == (tq, tk):
      return None
    return block_q // tq, block_kv // tk

  def mask_tiles_fit(self, q_len, kv_len, block_q, block_kv,
                     head_dim) -> bool:
    """Whether a block mask's tiles are ones the kernel is built and
    measured for (64-row q tiles, KV blocks up to its default), so that
    implementation=None may pick it."""
    tq, tk = self.default_tiles(head_dim)
    return (widened_tile_counts(q_len, kv_len, block_q, block_kv)
            == tile_counts(q_len, kv_len, block_q, block_kv)
            and max(block_q, MIN_TILE) == tq
            and max(block_kv, MIN_TILE) <= tk)

  def supports(self, *, backend=None, dtype=None, head_dim=None,
               interpret=None, q_len=None, kv_len=None, mask_tiles=None,
               mask_inferred=False) -> bool:
    if not (base.on_gpu(backend) and self.fits(dtype, head_dim)
            and base.is_hopper()):
      return False
    if interpret:
      return False
    if mask_tiles is None:
      return True
    return bool((mask_inferred and self.mask_split(*mask_tiles, head_dim))
                or self.mask_tiles_fit(q_len, kv_len, *mask_tiles, head_dim))

  def prepare(self, *, q_len, kv_len, head_dim, dtype, block_q, block_kv,
              block_mask=None, mask_inferred=False, kernel_config=None,
              interpret=None) -> attention_base.Plan:
    if not interpret and not base.is_hopper():
      raise ValueError(
          "implementation='pallas_mosaic' needs an NVIDIA Hopper GPU "
          f"(sm_90), this is {jax.devices()[0].device_kind!r}; use "
          "'pallas_triton', 'reference', or interpret=True (a slow "
          "simulation, for debugging).")
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
      raise ValueError(
          f"implementation='pallas_mosaic' takes bfloat16 or float16, got "
          f"{dtype}; cast q, k, v or use 'pallas_triton'.")
    if head_dim not in HEAD_DIMS:
      raise ValueError(
          f"implementation='pallas_mosaic' supports head_dim 64, 128 or 256, "
          f"got {head_dim}; use 'pallas_triton'.")
    split = (self.mask_split(block_q, block_kv, head_dim)
             if block_mask is not None and mask_inferred else None)
    if split:
      # Repeat each mask block per kernel tile (tiles wholly past the
      # sequence end are dropped).
      block_q, block_kv = block_q // split[0], block_kv // split[1]
      nq, nk = tile_counts(q_len, kv_len, block_q, block_kv)
      block_mask = jnp.repeat(jnp.repeat(block_mask, split[0], axis=2),
                              split[1], axis=3)[:, :, :nq, :nk]
    default_q, default_kv = self.default_tiles(head_dim)
    block_q, block_kv = config_lib.effective_block_sizes(
        q_len, kv_len, default_q if block_q is None else block_q,
        default_kv if block_kv is None else block_kv)
    n_listed = 0
    if block_mask is not None:
      if widened_tile_counts(q_len, kv_len, block_q, block_kv) != (
          tile_counts(q_len, kv_len, block_q, block_kv)):
        raise ValueError(
            f"`block_mask` tiles of {block_q}x{block_kv} are smaller than "
            "the 64x64 wgmma tiles of implementation='pallas_mosaic'; build "
            "the mask with block size >= 64 or use 'pallas_triton'.")
      n_listed = tile_counts(q_len, kv_len, block_q, block_kv)[1]
    # Tiles smaller than 64 only arise for short sequences, where widening
    # them to one wgmma tile changes no decision (one tile either way).
    block_q, block_kv = max(block_q, MIN_TILE), max(block_kv, MIN_TILE)
    config = self.kernel_config(kernel_config)
    pallas_mosaic.check_exp2_fma_cols(config, block_kv)
    self.check_shared_memory(block_q, block_kv, head_dim, config, n_listed,
                             tile_counts(q_len, kv_len, block_q, block_kv)[1])
    return attention_base.Plan(
        block_q=block_q, block_kv=block_kv, config=config,
        interpret=base.gpu_interpret_params(interpret), block_mask=block_mask)

  def check_shared_memory(self, block_q, block_kv, head_dim, config,
                          n_listed, n_recorded) -> None:
    """ValueError unless the tiles, pipeline, a block list of `n_listed`
    KV blocks and the skip record of `n_recorded` (the differentiated
    forward records its skips) fit in shared memory."""
    config = config.resolved(head_dim)
    smem = pallas_mosaic.shared_memory_bytes(
        block_q, block_kv, head_dim, config.num_stages, n_listed, n_recorded,
        k_stages=pallas_mosaic.k_ring_depth(config, block_q, block_kv,
                                            head_dim, n_listed, n_recorded),
        compute_wgs=config.compute_wgs)
    if smem > pallas_mosaic.MAX_SHARED_MEMORY:
      raise ValueError(
          f"block_q={block_q}, block_kv={block_kv}, head_dim={head_dim}, "
          f"num_stages={config.num_stages}, "
          f"extra_k_stages={config.extra_k_stages}, "
          f"compute_wgs={config.compute_wgs}"
          + (f", a block list of {n_listed} KV blocks" if n_listed else "")
          + f" need {smem} bytes of shared memory (max "
          f"{pallas_mosaic.MAX_SHARED_MEMORY}); lower `block_kv` or "
          "num_stages" + (", or use larger mask blocks" if n_listed else "")
          + ".")

  def kernel_forward(self, *args, **kwargs):
    return pallas_mosaic.attention_forward(*args, **kwargs)

  def kernel_options(self, plan):
    return dict(config=plan.config, interpret=plan.interpret)

  def backward(self, q, k, v, out, lse, d_out, kv_lengths, keep, options):
    if not pallas_mosaic_bwd.supports(q.shape[-1], q.dtype):
      # head_dim 256: the Triton backward.
      return pallas_triton.backward(q, k, v, out, lse, d_out, kv_lengths,
                                    keep, options)
    return pallas_mosaic_bwd.attention_backward(
        q, k, v, out, lse, d_out, kv_lengths, keep, causal=options["causal"],
        sm_scale=options["sm_scale"], block_q=options["block_q"],
        block_kv=options["block_kv"], interpret=options.get("interpret"))


OP = PallasMosaicGpuAttention()
