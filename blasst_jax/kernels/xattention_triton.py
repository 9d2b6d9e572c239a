"""Fused XAttention estimate (Pallas, Triton lowering).

One program per (band of query groups, batch, q-head). A query group is
`stride` consecutive tokens; its strided score against a key group is the sum
of q·k along the antidiagonal (query `stride-1-t` with key `t`), i.e. a sum of
`stride` [rows, head_dim] x [head_dim, cols] products, which the program
accumulates chunk by chunk of key groups without materialising the strided
(reversed, concatenated) copies of q and k: it reads token slot `t` of every
group straight from the [batch, groups, stride, heads, head_dim] view.

Per chunk of key groups the program writes, per query group, the chunk's row
max `M` (log2 units) and the block sums `E = sum exp2(s - M)` over the key
groups of each kv block. The softmax normaliser needs the row max over all
chunks, which one pass cannot know up front; `combine` rescales the chunks
in XLA (E is `1/(block_size/stride)` the size of the scores), so the kernel
reads q and k once and never writes the [q_groups, kv_groups] scores.

Chunks above the causal diagonal or past `kv_lengths` are written as E = 0,
M = -inf. Cost: `stride * head_dim` multiply-adds per (query group, visible
key group), 1/stride of dense attention's q·kᵀ.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from blasst_jax.kernels import tiles

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class EstimateConfig:
  """Performance knobs of the estimate kernel (no effect on results).

  Attributes:
    block_rows: query groups per program (a power of two >= 16).
    block_cols: key groups per chunk (a power of two, a multiple of the
      groups per kv block).
    num_warps: warps per program.
    num_stages: software-pipelining depth of the loop over token slots.
  """

  block_rows: int = 64
  block_cols: int = 128
  num_warps: int = 4
  num_stages: int = 3


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def supports(block_size: int, stride: int, config: EstimateConfig) -> bool:
  """Whether the kernel handles this block size / stride (else use XLA)."""
  gpb = block_size // stride
  return (_is_pow2(gpb) and _is_pow2(config.block_rows)
          and config.block_rows >= 16 and _is_pow2(config.block_cols)
          and config.block_cols >= max(16, gpb))


def _kernel(q_ref, k_ref, kv_len_ref, e_ref, m_ref, *, scale: float,
            stride: int, causal: bool, block_rows: int, block_cols: int,
            groups_per_block: int, n_chunks: int):
  # q_ref [rows, stride, d]: this band's query groups; k_ref [kv_groups,
  # stride, d]; kv_len_ref []. e_ref [rows, n_chunks * cols / gpb]: block
  # sums; m_ref [n_chunks, rows]: chunk row maxima (log2 units).
  band = pl.program_id(0)
  if causal:  # Heavy (late) bands first: a shorter tail in the last wave.
    band = pl.num_programs(0) - 1 - band
  row0 = band * block_rows
  rows = row0 + jnp.arange(block_rows)                  # [rows] query groups
  kv_len = kv_len_ref[...]
  # Key group j is visible when its first token is below kv_len.
  kv_groups = tiles.cdiv(kv_len, stride)
  n_visit = tiles.cdiv(kv_groups, block_cols)
  n_full = kv_groups // block_cols
  if causal:  # Query group i sees key groups j <= i.
    n_visit = jnp.minimum(n_visit, (row0 + block_rows - 1) // block_cols + 1)
    n_full = jnp.minimum(n_full, (row0 + 1) // block_cols)
  n_full = jnp.minimum(n_full, n_visit)
  blocks_per_chunk = block_cols // groups_per_block

  def scores(c):
    def slot(t, s):  # query slot stride-1-t meets key slot t
      q = q_ref[:, stride - 1 - t, :]                   # [rows, d]
      k = k_ref[pl.ds(c * block_cols, block_cols), t, :]  # [cols, d]
      return s + plgpu.dot(q, k, trans_b=True)
    init = jnp.zeros((block_rows, block_cols), jnp.float32)
    return lax.fori_loop(0, stride, slot, init)         # [rows, cols]

  def write(c, e, m):
    e_ref[:, pl.ds(c * blocks_per_chunk, blocks_per_chunk)] = e
    m_ref[c, :] = m

  def chunk(c, carry, *, masked: bool):
    s = scores(c) * scale                               # [rows, cols], log2
    if masked:
      cols = c * block_cols + jnp.arange(block_cols)
      visible = cols[None, :] < kv_groups
      if causal:
        visible = visible & (cols[None, :] <= rows[:, None])
      s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=1)                              # [rows]
    m_safe = jnp.where(m == -jnp.inf, 0.0, m) if masked else m
    p = jnp.exp2(s - m_safe[:, None])
    e = jnp.sum(p.reshape(block_rows, blocks_per_chunk, groups_per_block),
                axis=2)                                 # [rows, blocks]
    write(c, e, m)
    return carry

  def empty(c, carry):
    write(c, jnp.zeros((block_rows, blocks_per_chunk), jnp.float32),
          jnp.full((block_rows,), -jnp.inf, jnp.float32))
    return carry

  lax.fori_loop(0, n_full, functools.partial(chunk, masked=False), 0)
  lax.fori_loop(n_full, n_visit, functools.partial(chunk, masked=True), 0)
  lax.fori_loop(n_visit, n_chunks, empty, 0)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "stride", "causal", "sm_scale", "config",
                     "interpret"))
def chunk_sums(q, k, kv_lengths, *, block_size: int, stride: int,
               causal: bool, sm_scale: float,
               config: EstimateConfig = EstimateConfig(),
               interpret: bool = False):
  """Per-chunk block sums and row maxima of the strided scores.

  Args:
    q: [batch, q_len, q_heads, head_dim].
    k: [batch, kv_len, kv_heads, head_dim].
    kv_lengths: int32 [batch].

  Returns:
    e: f32 [batch, q_heads, q_groups_padded, n_chunks * blocks_per_chunk],
      sum over each kv block's key groups of exp2(s - M).
    m: f32 [batch, q_heads, n_chunks, q_groups_padded], the chunk row max M
      (log2 units; -inf where the chunk is invisible to the row).
  """
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  group = hq // hkv
  gpb = block_size // stride
  br, bc = config.block_rows, config.block_cols
  nq, nk = tiles.cdiv(lq, block_size), tiles.cdiv(lk, block_size)
  n_bands, n_chunks = tiles.cdiv(nq * gpb, br), tiles.cdiv(nk * gpb, bc)
  dp = tiles.padded_head_dim(d)
  # Zero padding: padded query groups are dropped by `combine`, padded keys
  # lie past kv_lengths, zero head_dim columns change no dot product.
  q = tiles.pad_to(q, n_bands * br * stride, dp)
  k = tiles.pad_to(k, n_chunks * bc * stride, dp)
  q = q.reshape(b, n_bands * br, stride, hq, dp)
  k = k.reshape(b, n_chunks * bc, stride, hkv, dp)

  def band_of(i):
    return n_bands - 1 - i if causal else i

  kernel = functools.partial(
      _kernel, scale=sm_scale / stride * LOG2E, stride=stride, causal=causal,
      block_rows=br, block_cols=bc, groups_per_block=gpb, n_chunks=n_chunks)
  blocks_per_chunk = bc // gpb
  return pl.pallas_call(
      kernel,
      grid=(n_bands, b, hq),
      in_specs=[
          pl.BlockSpec((None, br, stride, None, dp),
                       lambda i, bi, h: (bi, band_of(i), 0, h, 0)),
          pl.BlockSpec((None, n_chunks * bc, stride, None, dp),
                       lambda i, bi, h: (bi, 0, 0, h // group, 0)),
          pl.BlockSpec((None,), lambda i, bi, h: (bi,)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, br, n_chunks * blocks_per_chunk),
                       lambda i, bi, h: (bi, h, band_of(i), 0)),
          pl.BlockSpec((None, None, n_chunks, br),
                       lambda i, bi, h: (bi, h, 0, band_of(i))),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(
              (b, hq, n_bands * br, n_chunks * blocks_per_chunk), jnp.float32),
          jax.ShapeDtypeStruct((b, hq, n_chunks, n_bands * br), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="blasst_xattention_estimate",
  )(q, k, kv_lengths.astype(jnp.int32))


def combine(e, m, *, n_q_groups: int, n_q_blocks: int, n_kv_blocks: int,
            groups_per_block: int):
  """Block masses from the chunk partials, f32 [batch, q_heads, n_q_blocks,
  n_kv_blocks]: every real query group's softmax sums to 1."""
  b, hq, n_chunks, rows = m.shape
  m_row = jnp.max(m, axis=2)                              # [b, hq, rows]
  m_row = jnp.where(m_row == -jnp.inf, 0.0, m_row)
  w = jnp.exp2(m - m_row[:, :, None])                     # [b, hq, nc, rows]
  e = e.reshape(b, hq, rows, n_chunks, -1) * jnp.moveaxis(w, 2, 3)[..., None]
  e = e.reshape(b, hq, rows, -1)
  total = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.maximum(total, 1e-30)
  p = jnp.where((jnp.arange(rows) < n_q_groups)[:, None], p, 0.0)
  p = p[:, :, :n_q_blocks * groups_per_block, :n_kv_blocks]
  return jnp.sum(p.reshape(b, hq, n_q_blocks, groups_per_block, n_kv_blocks),
                 axis=3)
