"""Portable skip-softmax prefill kernel (Pallas, Triton lowering).

One program per (q-tile, batch, q-head). The program keeps its q tile in
registers and walks over KV blocks in increasing order with a running row
max in base 2 (the scale `sm_scale * log2(e)` is folded into the scores so
that `exp2` is used). For each block it computes the scores, the block row
max, and the skip decision `max_rows(m_blk - m_prev) < log2(λ)`; a skipped
block costs one q·kᵀ product and a row max: its exponentials, row sum, V load
and P·V product are inside the branch that is not taken.

KV blocks are walked in two loops: first the blocks that no mask touches
(no per-element masking), then the blocks crossed by the causal diagonal or
the end of `kv_lengths`. Query rows past `q_len` (padding of the last tile)
take no part in the decision.

On CPU the kernel runs through Pallas interpret mode.
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

from blasst_jax.kernels import block_lists as lists_lib
from blasst_jax.kernels import tiles

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Performance knobs of the Triton kernel (no effect on results).

  The defaults come from the tuning sweep in
  benchmarks/results/prefill_h100.json (`tuning`, H100, 8k): 128x64 tiles,
  4 warps, 3 stages, V loaded in the branch is the fastest non-causal
  setting when skipping; dense, loading V outside the branch or 128x128
  tiles with 8 warps are up to 10 % faster.

  Attributes:
    num_warps: warps per program; None: 8 for tiles of 128x128 or more
      (4 warps spill there: 2.6x slower on H100), else 4.
    num_stages: software-pipelining depth of the KV loop.
    load_v_in_branch: load V only for blocks that are kept. Loading inside
      the conditional saves bandwidth on skipped blocks but may cost Triton's
      pipelining of the V load; benchmark both.
    list_in_registers: with a block mask, read the tile's block list once
      into registers and pick entry `pos` by a reduction, instead of a
      memory load per step whose latency the K load then waits on.
  """

  num_warps: int | None = None
  num_stages: int = 3
  load_v_in_branch: bool = True
  list_in_registers: bool = True


def _kernel(q_ref, k_ref, v_ref, kv_len_ref, log2_thr_ref, *refs,
            sm_scale: float, causal: bool, block_q: int, block_kv: int,
            q_len: int, load_v_in_branch: bool, skip_enabled: bool,
            block_lists: bool, list_in_registers: bool,
            record_skips: int, chained: bool):
  # q_ref [block_q, d]; k_ref, v_ref [kv_len_padded, d]; kv_len_ref,
  # log2_thr_ref []. With block_lists: list_ref [nk_pow2] (this tile's
  # selected blocks, ascending), n_full_ref, n_sel_ref []. Outputs: o_ref
  # [block_q, d]; lse_ref [block_q]; skipped_ref, visited_ref []; with
  # record_skips (= nk_pow2 > 0): skip_ref [nk_pow2], 1 where skipped.
  # chained: m0_ref [block_q] in (the running max to start from, natural
  # log units, -inf: none), m_ref [block_q] out (the running max at the end).
  if block_lists:
    list_ref, n_full_ref, n_sel_ref, *refs = refs
  if chained:
    m0_ref, *refs = refs
    *refs, m_ref = refs
  o_ref, lse_ref, skipped_ref, visited_ref, *skip_ref = refs
  tile = pl.program_id(0)
  if causal:  # Heavy (late) tiles first: a shorter tail in the last wave.
    tile = pl.num_programs(0) - 1 - tile
  q_start = tile * block_q
  kv_len = kv_len_ref[...]
  log2_thr = log2_thr_ref[...]
  scale = sm_scale * LOG2E
  q = q_ref[...]
  rows = q_start + jnp.arange(block_q)                  # [block_q]
  row_real = rows < q_len

  # Blocks with at least one visible key: [0, n_visit); blocks no mask
  # touches: [0, n_full).
  n_visit = tiles.cdiv(kv_len, block_kv)
  n_full = kv_len // block_kv
  if causal:
    last_row = jnp.minimum(q_start + block_q, q_len) - 1
    n_visit = jnp.minimum(n_visit, last_row // block_kv + 1)
    n_full = jnp.minimum(n_full, (q_start + 1) // block_kv)
  n_full = jnp.minimum(n_full, n_visit)
  if block_lists:  # Loop positions index the tile's list of selected blocks.
    n_full, n_visit = n_full_ref[...], n_sel_ref[...]
    if list_in_registers:
      ids = list_ref[...]                               # [nk_pow2]
      block_at = lambda pos: tiles.list_entry(ids, pos)  # pylint: disable=g-long-lambda
    else:
      block_at = lambda pos: list_ref[pos]  # pylint: disable=g-long-lambda
  else:
    block_at = lambda pos: pos  # pylint: disable=g-long-lambda

  def load_v(j):
    return v_ref[pl.ds(j * block_kv, block_kv), :]      # [block_kv, d]

  def step(pos, carry, *, masked: bool):
    acc, l, m, n_skipped, skips = carry  # [bq, d], [bq], [bq], [], [nk_pow2]
    j = block_at(pos)
    k = k_ref[pl.ds(j * block_kv, block_kv), :]         # [block_kv, d]
    # Raw scores; the scale is applied as max(s) * scale and inside
    # exp2(s * scale - m), which compiles to one FMA per element.
    s = plgpu.dot(q, k, trans_b=True)                   # [bq, bkv]
    if masked:
      keys = j * block_kv + jnp.arange(block_kv)
      visible = keys[None, :] < kv_len
      if causal:
        visible = visible & (keys[None, :] <= rows[:, None])
      s = jnp.where(visible, s, -jnp.inf)
    m_blk = jnp.max(s, axis=1) * scale                  # [bq], log2 units
    v_early = None if (load_v_in_branch and skip_enabled) else load_v(j)

    def keep():
      m_new = jnp.maximum(m, m_blk)
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m - m_safe)
      p = jnp.exp2(s * scale - m_safe[:, None])
      v = load_v(j) if v_early is None else v_early
      if masked:  # Padding keys may hold NaN: 0 * NaN must not reach acc.
        v = jnp.where((j * block_kv + jnp.arange(block_kv) < kv_len)[:, None],
                      v, jnp.zeros_like(v))
      pv = plgpu.dot(p.astype(v.dtype), v)
      return (acc * alpha[:, None] + pv, l * alpha + jnp.sum(p, axis=1),
              m_new, n_skipped, skips)

    def drop():
      if record_skips:  # The backward skips exactly these blocks.
        return (acc, l, m, n_skipped + 1,
                jnp.where(jnp.arange(record_skips) == j, 1, skips))
      return acc, l, m, n_skipped + 1, skips

    if not skip_enabled:  # Dense build: no decision, no branch.
      return keep()
    gap = jnp.where(row_real & (m_blk > -jnp.inf), m_blk - m, -jnp.inf)
    skip = ((pos > 0) | seen) & (jnp.max(gap) < log2_thr)
    return lax.cond(skip, drop, keep)

  d = q_ref.shape[-1]
  if chained:   # A finite start: the tile has seen keys elsewhere.
    m0 = m0_ref[...] * LOG2E
    seen = jnp.max(jnp.where(row_real, m0, -jnp.inf)) > -jnp.inf
  else:
    m0, seen = jnp.full((block_q,), -jnp.inf, jnp.float32), False
  init = (jnp.zeros((block_q, d), jnp.float32),
          jnp.zeros((block_q,), jnp.float32),
          m0,
          jnp.int32(0),
          jnp.zeros((record_skips,), jnp.int32) if record_skips else
          jnp.int32(0))
  carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), init)
  acc, l, m, n_skipped, skips = lax.fori_loop(
      n_full, n_visit, functools.partial(step, masked=True), carry)

  has_mass = l > 0
  l_safe = jnp.where(has_mass, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_mass, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
  skipped_ref[...] = n_skipped
  visited_ref[...] = n_visit.astype(jnp.int32)
  if record_skips:
    skip_ref[0][...] = skips
  if chained:
    m_ref[...] = m * LN2


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sm_scale", "block_q", "block_kv", "config",
                     "interpret", "skip_enabled", "return_skip_mask"))
def attention_forward(q, k, v, kv_lengths, log_threshold, block_mask=None,
                      initial_max=None, *, causal: bool, sm_scale: float,
                      block_q: int, block_kv: int,
                      config: TritonConfig = TritonConfig(),
                      interpret: bool = False, skip_enabled: bool = True,
                      return_skip_mask: bool = False):
  """Skip-softmax forward pass.

  Inputs are expected validated (see `blasst_jax.api`); block sizes are the
  effective ones (`config.effective_block_sizes`).

  Args:
    q: [batch, q_len, q_heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim].
    kv_lengths: int32 [batch], valid keys per sequence (<= kv_len).
    log_threshold: f32 [batch], natural log of λ (-inf: never skip).
    block_mask: optional bool [batch, q_heads, n_q_tiles, n_kv_blocks]:
      each program walks the list of its tile's selected blocks
      (`block_lists.tile_lists`), so unselected blocks cost no K/V reads.
    skip_enabled: False builds the plain dense kernel (no skip decision and
      no branch); `log_threshold` is then ignored.
    initial_max: optional f32 [batch, q_heads, q_len]: the running max to
      start from (`reference.blockwise_attention`'s `initial_max`).
    return_skip_mask: also return which blocks were skipped (for a
      backward that skips exactly those).

  Returns:
    out [batch, q_len, q_heads, head_dim] (q's dtype),
    lse f32 [batch, q_heads, q_len] (natural log),
    skipped, visited: int32 [batch, q_heads, n_q_tiles],
    with return_skip_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks],
    with initial_max: the running max at the end, f32 [batch, q_heads,
    q_len].
  """
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  group = hq // hkv
  nq, nk = tiles.cdiv(lq, block_q), tiles.cdiv(lk, block_kv)
  # Triton tiles need power-of-two sizes >= 16: pad head_dim and lengths.
  # Zero padding of head_dim changes no dot product; padded keys lie past
  # kv_lengths and padded query rows are dropped.
  dp = tiles.padded_head_dim(d)
  q = tiles.pad_to(q, nq * block_q, dp)
  k = tiles.pad_to(k, nk * block_kv, dp)
  v = tiles.pad_to(v, nk * block_kv, dp)
  log2_thr = (log_threshold * LOG2E).astype(jnp.float32)
  nk_pow2 = tiles.next_pow2(nk)

  num_warps = config.num_warps or (8 if block_q * block_kv >= 128 * 128
                                   else 4)
  kernel = functools.partial(
      _kernel, sm_scale=sm_scale, causal=causal, block_q=block_q,
      block_kv=block_kv, q_len=lq, load_v_in_branch=config.load_v_in_branch,
      skip_enabled=skip_enabled, block_lists=block_mask is not None,
      list_in_registers=config.list_in_registers,
      record_skips=nk_pow2 if return_skip_mask and skip_enabled else 0,
      chained=initial_max is not None)

  def tile_of(i):  # The kernel walks causal q tiles in reverse.
    return nq - 1 - i if causal else i

  kv_spec = pl.BlockSpec((None, nk * block_kv, None, dp),
                         lambda i, bi, h: (bi, 0, h // group, 0))
  per_batch = pl.BlockSpec((None,), lambda i, bi, h: (bi,))
  per_program = pl.BlockSpec((None, None, None),
                             lambda i, bi, h: (bi, h, tile_of(i)))
  q_spec = pl.BlockSpec((None, block_q, None, dp),
                        lambda i, bi, h: (bi, tile_of(i), h, 0))
  in_specs = [q_spec, kv_spec, kv_spec, per_batch, per_batch]
  inputs = [q, k, v, kv_lengths.astype(jnp.int32), log2_thr]
  if block_mask is not None:
    lists = lists_lib.tile_lists(
        block_mask, kv_lengths.astype(jnp.int32), q_len=lq, block_q=block_q,
        block_kv=block_kv, causal=causal)
    in_specs += [pl.BlockSpec((None, None, None, lists[0].shape[-1]),
                              lambda i, bi, h: (bi, h, tile_of(i), 0)),
                 per_program, per_program]
    inputs += list(lists)
  row_spec = pl.BlockSpec((None, None, block_q),
                          lambda i, bi, h: (bi, h, tile_of(i)))
  if initial_max is not None:   # padded rows start at -inf
    in_specs.append(row_spec)
    inputs.append(jnp.pad(initial_max.astype(jnp.float32),
                          ((0, 0), (0, 0), (0, nq * block_q - lq)),
                          constant_values=-jnp.inf))
  record = return_skip_mask and skip_enabled
  out_specs = [q_spec, row_spec, per_program, per_program]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, hq, nq * block_q), jnp.float32),
               jax.ShapeDtypeStruct((b, hq, nq), jnp.int32),
               jax.ShapeDtypeStruct((b, hq, nq), jnp.int32)]
  if record:
    out_specs.append(pl.BlockSpec((None, None, None, nk_pow2),
                                  lambda i, bi, h: (bi, h, tile_of(i), 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, hq, nq, nk_pow2), jnp.int32))
  if initial_max is not None:
    out_specs.append(row_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, hq, nq * block_q), jnp.float32))
  out, lse, skipped, visited, *extra = pl.pallas_call(
      kernel,
      grid=(nq, b, hq),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(
          num_warps=num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="blasst_prefill_triton",
  )(*inputs)
  result = (out[:, :lq, :, :d], lse[:, :, :lq], skipped, visited)
  if return_skip_mask:
    result += (extra[0][..., :nk] != 0 if record else
               jnp.zeros((b, hq, nq, nk), bool),)
  if initial_max is not None:
    result += (extra[-1][:, :, :lq],)
  return result
