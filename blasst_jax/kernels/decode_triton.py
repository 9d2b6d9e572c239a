"""Skip-softmax decode kernels (Pallas, Triton lowering), paged KV cache.

One program per (batch, kv-head, split). Its rows are the `group` query
heads that share the KV head (padded to 16 rows, the smallest tensor-core
tile), so a block of K is read once for the whole group. The program walks
its split's KV blocks; the cache is paged (`pages [n_pages, block_kv,
kv_heads, head_dim]` with a page table per sequence), and a contiguous cache
is the special case of an identity page table (a free reshape).

Three modes (`max_mode`, semantics in `reference.blockwise_decode_attention`):

- "split", one pass: split-K with a running max per split; a skipped block
  is never multiplied with V *and its V page is never read*;
- "anchored", one pass: as "split", but every split first scores the
  sequence's first and last blocks (K reads that every split of a head
  shares, so they come from L2) and starts its running max there;
- "global", two passes: `decode_scores` reads K once and writes the scaled
  scores of the real rows (f32, 1/16 of the K bytes at group 4, head_dim
  128) and each split's row max; the global max follows from those; then
  `decode_from_scores` decides every block against the global max, reads V
  only for kept blocks, and needs no rescaling (all splits share one max).

Partials (unnormalized f32 accumulators, row sums, maxima) are merged by
the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

LOG2E = math.log2(math.e)
MIN_ROWS = 16   # Smallest M of a Triton dot.


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Speed knobs of the decode kernels (no effect on results)."""

  num_warps: int = 4
  # Triton pipeline depth of the K (and dense V) loads; None: 4 for the dense
  # build, 2 with the skip check (both best in the H100 sweep).
  num_stages: int | None = None
  # Skipping kernels: request block j's V (masked by its decision) before
  # block j-1's exponentials and P·V, so that a kept block's V load overlaps
  # work instead of stalling in a branch.
  prefetch_v: bool = True


def padded_rows(group: int) -> int:
  return max(MIN_ROWS, 1 << (group - 1).bit_length())


def _split_range(kv_len, split, num_splits: int, block_kv: int):
  """[start, end) blocks of this split (empty when start >= end)."""
  n_blocks = (kv_len + block_kv - 1) // block_kv
  per_split = jnp.maximum((n_blocks + num_splits - 1) // num_splits, 1)
  start = split * per_split
  return start, jnp.minimum(n_blocks, start + per_split)


def _page(table_ref, pages_ref, j):
  """[block_kv, head_dim] page of logical block j."""
  return pages_ref[table_ref[j]]


def _masked_scores(q, k, j, kv_len, block_kv, scale):
  """Scaled scores (log2 units) of one block, keys >= kv_len at -inf."""
  s = plgpu.dot(q, k, trans_b=True) * scale                  # [rows, bkv]
  keys = j * block_kv + jnp.arange(block_kv)
  return jnp.where((keys < kv_len)[None, :], s, -jnp.inf), keys < kv_len


def _pv(p, v, visible):
  # Past kv_len the cache may hold garbage or NaN: 0 * NaN must not reach acc.
  v = jnp.where(visible[:, None], v, jnp.zeros_like(v))
  return plgpu.dot(p.astype(v.dtype), v)


def _anchor_max(q, table_ref, k_ref, kv_len, block_kv, scale):
  """[rows] row max over the sequence's first and last block (-inf if empty)."""
  def scores_max():
    last = (kv_len + block_kv - 1) // block_kv - 1
    m = jnp.full((q.shape[0],), -jnp.inf, jnp.float32)
    for j in (0, last):
      s, _ = _masked_scores(q, _page(table_ref, k_ref, j), j, kv_len,
                            block_kv, scale)
      m = jnp.maximum(m, jnp.max(s, axis=1))
    return m
  # An empty sequence's page table entries may point anywhere: read none.
  return lax.cond(kv_len > 0, scores_max,
                  lambda: jnp.full((q.shape[0],), -jnp.inf, jnp.float32))


def _one_pass_kernel(q_ref, k_ref, v_ref, table_ref, kv_len_ref, log2_thr_ref,
                     *refs, sm_scale, block_kv, group, num_splits, skip_enabled,
                     anchored, prefetch_v, given_max):
  # q_ref [rows, d]; k_ref, v_ref [n_pages, block_kv, d]; table_ref [pages];
  # given_max: refs start with the initial max [rows]; then the outputs:
  # acc_ref [rows, d]; m_ref, l_ref [rows]; the rest [].
  if given_max:
    init_max_ref, *refs = refs
  acc_ref, m_ref, l_ref, skipped_ref, visited_ref = refs
  kv_len = kv_len_ref[...]
  start, end = _split_range(kv_len, pl.program_id(2), num_splits, block_kv)
  q = q_ref[...]
  rows, d = q.shape
  scale = sm_scale * LOG2E
  m_init = jnp.full((rows,), -jnp.inf, jnp.float32)
  if given_max and skip_enabled:
    m_init = init_max_ref[...]
  if anchored and skip_enabled:
    m_init = jnp.maximum(
        m_init, _anchor_max(q, table_ref, k_ref, kv_len, block_kv, scale))
  blocks = functools.partial(
      _skip_prefetch_loop if skip_enabled and prefetch_v else _block_loop,
      q=q, k_ref=k_ref, v_ref=v_ref, table_ref=table_ref, kv_len=kv_len,
      start=start, end=end, m_init=m_init, block_kv=block_kv, scale=scale)
  if skip_enabled:
    acc, l, m, n_skipped = blocks(row_real=jnp.arange(rows) < group,
                                  log2_thr=log2_thr_ref[...])
  else:
    acc, l, m, n_skipped = blocks(row_real=None, log2_thr=None)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l
  skipped_ref[...] = n_skipped
  visited_ref[...] = jnp.maximum(end - start, 0).astype(jnp.int32)


def _accumulate(acc, l, m_old, m_new, s, pv_fn):
  """Online-softmax update with a block's scores s [rows, bkv]."""
  alpha = jnp.exp2(m_old - m_new)       # 0 while m_old = -inf.
  p = jnp.exp2(s - m_new[:, None])
  return acc * alpha[:, None] + pv_fn(p), l * alpha + p.sum(axis=1)


def _block_loop(*, q, k_ref, v_ref, table_ref, kv_len, start, end, m_init,
                block_kv, scale, row_real, log2_thr):
  """Blocks [start, end) in order, V read inside the kept branch (dense when
  row_real is None). Returns acc [rows, d], l, m [rows], skipped count."""
  rows, d = q.shape

  def step(j, carry):
    acc, l, m, n_skipped = carry
    s, visible = _masked_scores(q, _page(table_ref, k_ref, j), j, kv_len,
                                block_kv, scale)
    m_blk = jnp.max(s, axis=1)                               # [rows]

    def keep():
      m_new = jnp.maximum(m, m_blk)   # Finite: the block has a visible key.
      pv = lambda p: _pv(p, _page(table_ref, v_ref, j), visible)  # pylint: disable=g-long-lambda
      return (*_accumulate(acc, l, m, m_new, s, pv), m_new, n_skipped)

    if row_real is None:
      return keep()
    # m = -inf (a split's first block without anchors) gives gap +inf.
    gap = jnp.where(row_real, m_blk - m, -jnp.inf)
    return lax.cond(jnp.max(gap) < log2_thr,
                    lambda: (acc, l, m, n_skipped + 1), keep)

  init = (jnp.zeros((rows, d), jnp.float32), jnp.zeros((rows,), jnp.float32),
          m_init, jnp.int32(0))
  return lax.fori_loop(start, end, step, init)


def _skip_prefetch_loop(*, q, k_ref, v_ref, table_ref, kv_len, start, end,
                        m_init, block_kv, scale, row_real, log2_thr):
  """`_block_loop` with skipping, software-pipelined by one block.

  Iteration j scores block j, decides it against the running max (which
  already holds block j-1's max: the decision needs no exponentials), and
  issues block j's V load masked by that decision (a skipped block's V is
  never requested); then it accumulates block j-1, whose V was requested
  one iteration earlier. The last pending block is accumulated after the
  loop. Same decisions and sums as `_block_loop`.
  """
  rows, d = q.shape
  bkv = block_kv

  def accumulate_pending(acc, l, m_acc, m, pending):
    s_p, keep_p, v_p = pending
    return lax.cond(
        keep_p,
        lambda: (*_accumulate(acc, l, m_acc, m, s_p, lambda p: plgpu.dot(
            p.astype(v_p.dtype), v_p)), m),
        lambda: (acc, l, m_acc))

  def step(j, carry):
    acc, l, m_acc, m, n_skipped, pending = carry
    s, visible = _masked_scores(q, _page(table_ref, k_ref, j), j, kv_len,
                                bkv, scale)
    m_blk = jnp.max(s, axis=1)
    gap = jnp.where(row_real, m_blk - m, -jnp.inf)
    keep = jnp.max(gap) >= log2_thr
    # Past kv_len the cache may hold NaN: those rows load as 0.
    v = plgpu.load(v_ref.at[table_ref[j]],
                   mask=jnp.broadcast_to((visible & keep)[:, None], (bkv, d)),
                   other=0.0)
    acc, l, m_acc = accumulate_pending(acc, l, m_acc, m, pending)
    m_next = jnp.where(keep, jnp.maximum(m, m_blk), m)
    return (acc, l, m_acc, m_next, n_skipped + 1 - keep.astype(jnp.int32),
            (s, keep, v))

  nothing = (jnp.full((rows, bkv), -jnp.inf, jnp.float32), jnp.bool_(False),
             jnp.zeros((bkv, d), v_ref.dtype))
  init = (jnp.zeros((rows, d), jnp.float32), jnp.zeros((rows,), jnp.float32),
          m_init, m_init, jnp.int32(0), nothing)
  acc, l, m_acc, m, n_skipped, pending = lax.fori_loop(start, end, step, init)
  acc, l, m_acc = accumulate_pending(acc, l, m_acc, m, pending)
  return acc, l, m_acc, n_skipped


def _scores_kernel(q_ref, k_ref, table_ref, kv_len_ref, s_ref, m_ref, *,
                   sm_scale, block_kv, group, num_splits):
  # s_ref [rows, per_split * block_kv]: this split's scores, log2 units.
  kv_len = kv_len_ref[...]
  start, end = _split_range(kv_len, pl.program_id(2), num_splits, block_kv)
  q = q_ref[...]
  rows = q.shape[0]
  row_real = (jnp.arange(rows) < group)[:, None]
  scale = sm_scale * LOG2E

  def step(j, m):
    s, _ = _masked_scores(q, _page(table_ref, k_ref, j), j, kv_len, block_kv,
                          scale)
    # Only the real rows are written: the padding rows would triple the bytes.
    plgpu.store(s_ref.at[:, pl.ds((j - start) * block_kv, block_kv)], s,
                mask=jnp.broadcast_to(row_real, s.shape))
    return jnp.maximum(m, jnp.max(s, axis=1))

  m_ref[...] = lax.fori_loop(start, end, step,
                             jnp.full((rows,), -jnp.inf, jnp.float32))


def _from_scores_kernel(s_ref, v_ref, table_ref, kv_len_ref, log2_thr_ref,
                        m_ref, acc_ref, l_ref, skipped_ref, visited_ref, *,
                        block_kv, group, num_splits, skip_enabled):
  # m_ref [rows]: the global row max (log2 units); acc_ref [rows, d].
  kv_len = kv_len_ref[...]
  start, end = _split_range(kv_len, pl.program_id(2), num_splits, block_kv)
  m_star = m_ref[...]
  rows = m_star.shape[0]
  row_real = jnp.arange(rows) < group
  m_safe = jnp.where(row_real & (m_star > -jnp.inf), m_star, 0.0)
  log2_thr = log2_thr_ref[...]

  def step(j, carry):
    acc, l, n_skipped = carry
    s = plgpu.load(s_ref.at[:, pl.ds((j - start) * block_kv, block_kv)],
                   mask=jnp.broadcast_to(row_real[:, None], (rows, block_kv)),
                   other=-jnp.inf)                            # [rows, bkv]
    visible = j * block_kv + jnp.arange(block_kv) < kv_len

    def keep():
      p = jnp.exp2(s - m_safe[:, None])
      pv = _pv(p, _page(table_ref, v_ref, j), visible)
      return acc + pv, l + p.sum(axis=1), n_skipped

    if not skip_enabled:
      return keep()
    gap = jnp.where(row_real, jnp.max(s, axis=1) - m_star, -jnp.inf)
    return lax.cond(jnp.max(gap) < log2_thr,
                    lambda: (acc, l, n_skipped + 1), keep)

  d = acc_ref.shape[-1]
  init = (jnp.zeros((rows, d), jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.int32(0))
  acc, l, n_skipped = lax.fori_loop(start, end, step, init)
  acc_ref[...] = acc
  l_ref[...] = l
  skipped_ref[...] = n_skipped
  visited_ref[...] = jnp.maximum(end - start, 0).astype(jnp.int32)


def _specs(group_rows, head_dim, n_pages, block_kv, pages_per_seq):
  """BlockSpecs shared by the kernels; grid (batch, kv_head, split)."""
  return dict(
      q=pl.BlockSpec((None, None, group_rows, head_dim),
                     lambda b, h, s: (b, h, 0, 0)),
      pages=pl.BlockSpec((n_pages, block_kv, None, head_dim),
                         lambda b, h, s: (0, 0, h, 0)),
      table=pl.BlockSpec((None, pages_per_seq), lambda b, h, s: (b, 0)),
      per_batch=pl.BlockSpec((None,), lambda b, h, s: (b,)),
      rows=pl.BlockSpec((None, None, None, group_rows),
                        lambda b, h, s: (b, h, s, 0)),
      acc=pl.BlockSpec((None, None, None, group_rows, head_dim),
                       lambda b, h, s: (b, h, s, 0, 0)),
      count=pl.BlockSpec((None, None, None), lambda b, h, s: (b, h, s)),
  )


def _out_shapes(b, hkv, splits, rows, d):
  return dict(
      acc=jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
      rows=jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
      count=jax.ShapeDtypeStruct((b, hkv, splits), jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("group", "sm_scale", "num_splits", "max_mode",
                              "config", "interpret", "skip_enabled",
                              "max_axis_name"))
def decode_partials(q, k_pages, v_pages, page_table, kv_lengths,
                    log_threshold, initial_max=None, *, group: int,
                    sm_scale: float, num_splits: int,
                    max_mode: str = "split",
                    config: DecodeConfig = DecodeConfig(),
                    interpret: bool = False, skip_enabled: bool = True,
                    max_axis_name=None):
  """Per-split partials of skip-softmax decode attention.

  Args:
    q: [batch, kv_heads, rows, head_dim]: the `group` query heads of each
      KV head, zero-padded to `rows = padded_rows(group)`; head_dim a power
      of two >= 16.
    k_pages, v_pages: [n_pages, block_kv, kv_heads, head_dim].
    page_table: int32 [batch, pages_per_seq]: page of each logical block.
    kv_lengths: int32 [batch]; log_threshold: f32 [batch] (natural log).
    initial_max: optional f32 [batch, kv_heads, rows], log2 units (-inf:
      none): every split's running max starts at least there ("split",
      "anchored"); "global" compares with at least it.
    num_splits: split-K factor.
    max_mode: "split", "anchored" (one pass) or "global" (two passes).
    skip_enabled: False builds the dense kernels (no decision, no branch).
    max_axis_name: inside `shard_map` over cache positions: "global" mode
      takes the global max over this mesh axis between its passes.

  Returns:
    acc f32 [batch, kv_heads, splits, rows, head_dim] (unnormalized),
    m f32 [batch, kv_heads, splits, rows] (row max, log2 units; in "global"
    mode the global max for every split), l f32 (row sums, same shape),
    skipped, visited int32 [batch, kv_heads, splits].
  """
  b, hkv, rows, d = q.shape
  n_pages, block_kv = k_pages.shape[:2]
  pages_per_seq = page_table.shape[1]
  specs = _specs(rows, d, n_pages, block_kv, pages_per_seq)
  shapes = _out_shapes(b, hkv, num_splits, rows, d)
  grid = (b, hkv, num_splits)
  stages = config.num_stages or (2 if skip_enabled else 4)
  params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=stages)
  log2_thr = (log_threshold * LOG2E).astype(jnp.float32)
  common = dict(block_kv=block_kv, group=group, num_splits=num_splits)

  given = initial_max is not None
  if max_mode != "global":
    kernel = functools.partial(_one_pass_kernel, sm_scale=sm_scale,
                               skip_enabled=skip_enabled,
                               anchored=max_mode == "anchored",
                               prefetch_v=config.prefetch_v, given_max=given,
                               **common)
    max_spec = pl.BlockSpec((None, None, rows), lambda b_, h, s: (b_, h, 0))
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[specs["q"], specs["pages"], specs["pages"], specs["table"],
                  specs["per_batch"], specs["per_batch"]]
        + [max_spec] * given,
        out_specs=[specs["acc"], specs["rows"], specs["rows"],
                   specs["count"], specs["count"]],
        out_shape=[shapes["acc"], shapes["rows"], shapes["rows"],
                   shapes["count"], shapes["count"]],
        compiler_params=params, interpret=interpret,
        name="blasst_decode_triton",
    )(q, k_pages, v_pages, page_table, kv_lengths, log2_thr,
      *([initial_max.astype(jnp.float32)] if given else []))

  per_split = -(-pages_per_seq // num_splits)
  scores_spec = pl.BlockSpec((None, None, None, rows, per_split * block_kv),
                             lambda b_, h, s: (b_, h, s, 0, 0))
  scores, m_split = pl.pallas_call(
      functools.partial(_scores_kernel, sm_scale=sm_scale, **common),
      grid=grid,
      in_specs=[specs["q"], specs["pages"], specs["table"],
                specs["per_batch"]],
      out_specs=[scores_spec, specs["rows"]],
      out_shape=[jax.ShapeDtypeStruct(
          (b, hkv, num_splits, rows, per_split * block_kv), jnp.float32),
                 shapes["rows"]],
      compiler_params=params, interpret=interpret,
      name="blasst_decode_scores_triton",
  )(q, k_pages, page_table, kv_lengths)
  m_star = jnp.max(m_split, axis=2)                          # [b, hkv, rows]
  if max_axis_name is not None:
    m_star = lax.pmax(m_star, max_axis_name)
  if given:
    m_star = jnp.maximum(m_star, initial_max.astype(jnp.float32))
  acc, l, skipped, visited = pl.pallas_call(
      functools.partial(_from_scores_kernel, skip_enabled=skip_enabled,
                        **common),
      grid=grid,
      in_specs=[scores_spec, specs["pages"], specs["table"],
                specs["per_batch"], specs["per_batch"],
                pl.BlockSpec((None, None, rows), lambda b_, h, s: (b_, h, 0))],
      out_specs=[specs["acc"], specs["rows"], specs["count"],
                 specs["count"]],
      out_shape=[shapes["acc"], shapes["rows"], shapes["count"],
                 shapes["count"]],
      compiler_params=params, interpret=interpret,
      name="blasst_decode_from_scores_triton",
  )(scores, v_pages, page_table, kv_lengths, log2_thr, m_star)
  m = jnp.broadcast_to(m_star[:, :, None], l.shape)
  return acc, m, l, skipped, visited

