"""Lists of the KV blocks a block mask selects, built in XLA for the kernels.

Given a block mask [batch, q_heads, n_q_tiles, n_kv_blocks], a prefill
kernel walks ascending lists of the selected blocks instead of the whole KV
range, so unselected blocks cost no K/V reads. Blocks that the causal or
length masks hide from every row of a tile are dropped from its list, as the
oracle (`reference.visited_blocks_mask`) does not visit them either.
"""

from __future__ import annotations

import jax.numpy as jnp

from blasst_jax import reference
from blasst_jax.kernels import tiles


def walked_blocks(block_mask, kv_lengths, *, q_len: int, block_q: int,
                  block_kv: int, causal: bool):
  """bool [batch, q_heads, n_q_tiles, n_kv_blocks]: the blocks a tile visits:
  selected, with at least one key some row of the tile may see."""
  nk = block_mask.shape[-1]
  return block_mask & reference.visited_blocks_mask(
      q_len, nk * block_kv, block_q, block_kv, kv_lengths, causal)


def unmasked_blocks(kv_lengths, n_q_tiles: int, n_kv_blocks: int, *,
                    block_q: int, block_kv: int, causal: bool):
  """bool [batch, 1, n_q_tiles or 1, n_kv_blocks]: the blocks no causal or
  length mask touches for any row of a tile (a prefix of the blocks)."""
  n_full = (kv_lengths // block_kv)[:, None]                       # [b, 1]
  if causal:  # The tile's first row sees every key of the blocks before it.
    n_full = jnp.minimum(n_full,
                         (jnp.arange(n_q_tiles) * block_q + 1) // block_kv)
  return (jnp.arange(n_kv_blocks) < n_full[..., None])[:, None]


def compact(select):
  """The positions where `select` (bool [..., n]) holds.

  Returns:
    ids int32 [..., n]: those positions ascending, then zeros; count int32
    [...]: how many.
  """
  count = jnp.sum(select, axis=-1, dtype=jnp.int32)
  # Stable sort of "not selected": selected positions first, ascending.
  ids = jnp.argsort(~select, axis=-1, stable=True).astype(jnp.int32)
  ids = jnp.where(jnp.arange(select.shape[-1]) < count[..., None], ids, 0)
  return ids, count


def kernel_list(select):
  """`compact`, with the ids padded to a power of two (the length a kernel
  loads): ids int32 [..., next_pow2(n)], count int32 [...]."""
  ids, count = compact(select)
  pad = tiles.next_pow2(select.shape[-1]) - select.shape[-1]
  return jnp.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, pad)]), count


def pair_union(visit, pair: int = 2):
  """The blocks each program of `pair` consecutive tiles streams.

  Args:
    visit: bool [batch, heads, n_tiles, n_blocks]: the blocks each tile
      visits.

  Returns:
    entries int32 [batch, heads, n_programs, n_blocks]: the union of the
    program's tiles' blocks, ascending, each as `block << pair |
    membership` (bit t: in tile t's list), then zeros; n_union int32
    [batch, heads, n_programs]; visit padded to whole programs and
    reshaped to [batch, heads, n_programs, pair, n_blocks].
  """
  b, h, n_tiles, nk = visit.shape
  n_prog = tiles.cdiv(n_tiles, pair)
  # A padding tile (a tile count not a multiple of pair) visits nothing.
  visit = jnp.pad(visit, ((0, 0), (0, 0), (0, n_prog * pair - n_tiles),
                          (0, 0))).reshape(b, h, n_prog, pair, nk)
  ids, n_union = compact(jnp.any(visit, axis=3))
  member = sum(visit[:, :, :, t].astype(jnp.int32) << t for t in range(pair))
  entries = (ids << pair) | jnp.take_along_axis(member, ids, axis=-1)
  entries = jnp.where(jnp.arange(nk) < n_union[..., None], entries, 0)
  return entries, n_union, visit


def cut_tiles(mask, q_len: int, kv_len: int, block_q: int, block_kv: int,
              to_q: int, to_kv: int):
  """A [batch, heads, n_q_tiles, n_kv_blocks] tile mask on tiles of
  to_q x to_kv (block sizes that are multiples of them are cut; others are
  kept): (mask, block_q, block_kv)."""
  fq = block_q // to_q if block_q % to_q == 0 else 1
  fk = block_kv // to_kv if block_kv % to_kv == 0 else 1
  if fq == fk == 1:
    return mask, block_q, block_kv
  block_q, block_kv = block_q // fq, block_kv // fk
  mask = jnp.repeat(jnp.repeat(mask, fq, axis=2), fk, axis=3)
  return (mask[:, :, :tiles.cdiv(q_len, block_q),
               :tiles.cdiv(kv_len, block_kv)], block_q, block_kv)


def tile_lists(block_mask, kv_lengths, *, q_len: int, block_q: int,
               block_kv: int, causal: bool):
  """Per-tile lists of the blocks a block mask selects (one tile a program).

  Args:
    block_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks].
    kv_lengths: int32 [batch].

  Returns:
    index int32 [batch, q_heads, n_q_tiles, nk_pow2]: the selected blocks
    that causal and length masks leave, ascending, then zeros; n_full int32
    [batch, q_heads, n_q_tiles]: how many of them no mask touches (a prefix:
    those lie before the tile's first masked block); n_sel: how many.
  """
  nq, nk = block_mask.shape[2:]
  visit = walked_blocks(block_mask, kv_lengths, q_len=q_len, block_q=block_q,
                        block_kv=block_kv, causal=causal)
  full = unmasked_blocks(kv_lengths, nq, nk, block_q=block_q,
                         block_kv=block_kv, causal=causal)
  index, n_sel = kernel_list(visit)
  return index, jnp.sum(visit & full, axis=-1, dtype=jnp.int32), n_sel
