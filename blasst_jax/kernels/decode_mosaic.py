"""Hopper skip-softmax decode kernel (Pallas Mosaic GPU), paged KV cache.

One program per (split, KV head, sequence) with two warpgroups. The memory
warpgroup streams the split's K pages into a shared-memory ring with TMA,
`k_stages` blocks ahead, and copies a V page only once the compute
warpgroup has kept its block; for a skipped block it completes the V slot's
phase with an empty arrival, so a skipped block's V is never read. The
compute warpgroup folds the `group` query heads of the KV head into the
rows of one 64-row wgmma tile (zero rows pad it), scores block j, decides it
against the running max and publishes the decision, then accumulates block
j - 1, whose V copy ran while block j was scored.

Max modes as `reference.blockwise_decode_attention`: "split" starts every
split's running max at -inf; "anchored" first scores the sequence's first
and last blocks (two K pages more per split, L2 hits across splits). The
split-K partials (unnormalized accumulators, row max, row sums) are merged
by the caller (`decode.merge_partials`), as for the Triton kernel.

FP8 caches (float8_e4m3fn pages with a scale per KV head, value = stored ·
scale): the pages travel as FP8, half the bytes. The compute warpgroup
widens each page it reads into an f16 tile in shared memory (e4m3 -> f16 is
exact and one instruction per pair; the K or V slot is free as soon as it is
widened) and runs both products in f16 with the query cast to f16; the K
scale is folded into the score scale and the V scale into the accumulator.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

LOG2E = math.log2(math.e)
ROWS = 64          # wgmma M: the query heads of a group, zero-padded
SLOT = 32          # int32/f32 words in 128 bytes (TMA alignment)
MAX_MODES = ("split", "anchored")
HEAD_DIMS = (64, 128, 256)
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn),)


@dataclasses.dataclass(frozen=True)
class MosaicDecodeConfig:
  """Speed knobs of the Mosaic decode kernel (no effect on results).

  Attributes:
    k_stages: K pages in flight (shared-memory ring slots), >= 2; None: as
      many as fit in shared memory, at most `MAX_K_STAGES`.
    v_stages: V pages in flight, >= 2.
  """

  k_stages: int | None = None
  v_stages: int = 2

  def __post_init__(self):
    for name in ("k_stages", "v_stages"):
      value = getattr(self, name)
      if name == "k_stages" and value is None:
        continue
      if not isinstance(value, int) or value < 2:
        raise ValueError(f"`{name}` must be an int >= 2, got {value!r}.")


MAX_K_STAGES = 4
MAX_SHARED_MEMORY = 232448   # per block on H100/H200 (227 KiB)


def shared_memory_bytes(head_dim, block_kv, pages_per_seq, k_stages,
                        v_stages, itemsize=2, fp8=False) -> int:
  """q tile + K ring (which the f32 output tile reuses at the end) + V
  ring + the page table + 4 KiB for the small buffers and barriers; with
  `fp8` pages (1 byte) the two f16 tiles they are widened into."""
  page = block_kv * head_dim * (1 if fp8 else itemsize)
  wide = 2 * block_kv * head_dim * 2 if fp8 else 0
  table = 4 * -(-pages_per_seq // SLOT) * SLOT
  return (ROWS * head_dim * itemsize
          + max(k_stages * page, ROWS * head_dim * 4) + v_stages * page
          + wide + table + 4096)


def k_ring_depth(config, head_dim, block_kv, pages_per_seq, fp8=False) -> int:
  """config.k_stages, or the deepest K ring (<= MAX_K_STAGES) that fits."""
  if config.k_stages is not None:
    return config.k_stages
  depth = 2
  while depth < MAX_K_STAGES and shared_memory_bytes(
      head_dim, block_kv, pages_per_seq, depth + 1,
      config.v_stages, fp8=fp8) <= MAX_SHARED_MEMORY:
    depth += 1
  return depth


def supports(group: int, head_dim: int, block_kv: int, dtype) -> bool:
  """Whether the kernel runs this problem: a bf16/f16 query (its cache of
  the same dtype or float8_e4m3fn), head_dim 64/128/256, pages of a
  multiple of 64 keys, at most 64 query heads per KV head."""
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim in HEAD_DIMS and block_kv % 64 == 0
          and 1 <= group <= ROWS)


def _split_range(kv_len, split, num_splits: int, block_kv: int):
  """[start, end) blocks of this split, as the Triton kernel splits."""
  n_blocks = lax.div(kv_len + block_kv - 1, block_kv)
  per_split = jnp.maximum(lax.div(n_blocks + num_splits - 1, num_splits), 1)
  start = split * per_split
  return start, jnp.minimum(n_blocks, start + per_split), n_blocks


def _kernel(q_ref, k_ref, v_ref, table_ref, params_ref, acc_ref, ml_ref,
            stats_ref, scoped, *, sm_scale, block_kv, head_dim, dtype, group,
            num_splits, skip_enabled, anchored, k_stages, v_stages,
            p_smem, wide):
  # q_ref [b, hkv, ROWS, d]; k_ref, v_ref [n_pages, block_kv, hkv, d];
  # table_ref int32 [b, table_rows, SLOT]; params_ref f32 [b, SLOT]
  # ([kv_len, log2 λ, 0...]); outputs acc_ref f32 [b, hkv, splits, ROWS, d],
  # ml_ref f32 [b, hkv, splits, 2, ROWS] (row max in log2 units, row sum),
  # stats_ref int32 [b, hkv, splits, SLOT] ([skipped, visited, 0...]).
  # wide: None, or FP8 pages: (scales_ref f32 [hkv, SLOT] ([k scale,
  # v scale, 0...]), its shared-memory copy [SLOT], its barrier, the f16
  # K and V tiles [block_kv, d] the pages are widened into).
  split = lax.axis_index("split")
  kv_head = lax.axis_index("kv_heads")
  batch = lax.axis_index("batch")
  wg = lax.axis_index("wg")
  smem, bars = scoped
  q_smem, (k_smem, acc_smem), v_smem, table_smem, params_smem = smem[:5]
  votes_smem, ml_smem, stats_smem = smem[5:8]
  (q_bar, table_bar, params_bars, k_bars, k_free, v_bars, v_free,
   vote_bars) = bars

  # Per-sequence scalars, one TMA per warpgroup into its own slot.
  plgpu.copy_gmem_to_smem(params_ref.at[batch], params_smem.at[wg],
                          params_bars.at[wg])
  plgpu.barrier_wait(params_bars.at[wg])
  kv_len = params_smem[wg, 0].astype(jnp.int32)
  log2_thr = params_smem[wg, 1]
  start, end, n_blocks = _split_range(kv_len, split, num_splits, block_kv)
  n = jnp.maximum(end - start, 0)               # this split's blocks
  # "anchored": the sequence's first and last blocks come first in the K
  # stream (scored, never accumulated); none for an empty sequence.
  n_anchor = (jnp.where(n_blocks > 0, 2, 0) if anchored and skip_enabled
              else jnp.int32(0))
  n_k = n_anchor + n

  def k_block(kp):
    """Logical block of K stream position kp."""
    anchor = jnp.where(kp == 0, 0, n_blocks - 1)
    return jnp.where(kp < n_anchor, anchor, start + kp - n_anchor)

  def k_slot(kp):
    return lax.rem(kp, jnp.array(k_stages, kp.dtype))

  def v_slot(vp):
    return lax.rem(vp, jnp.array(v_stages, vp.dtype))

  @pl.when(wg == 0)
  def _compute():
    plgpu.copy_gmem_to_smem(q_ref.at[batch, kv_head], q_smem, q_bar)
    plgpu.barrier_wait(q_bar)
    scale = sm_scale * LOG2E
    v_scale = None
    if wide is not None:
      scales_ref, scales_smem, scales_bar, k_wide, v_wide = wide
      plgpu.copy_gmem_to_smem(scales_ref.at[kv_head], scales_smem,
                              scales_bar)
      plgpu.barrier_wait(scales_bar)
      scale = scale * scales_smem[0]
      v_scale = scales_smem[1]

    def widen(page_ref, tile_ref):
      """An FP8 page into its f16 tile (exact)."""
      page8 = plgpu.load(page_ref, layout=plgpu.Layout.WGMMA_8BIT,
                         optimized=False)
      tile_ref[...] = page8.astype(jnp.float16)
      plgpu.commit_smem()
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    key_iota = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1,
                                      layout=plgpu.Layout.WGMMA)

    def scores(kp):
      """Scaled scores [ROWS, block_kv] (log2 units) of K position kp,
      keys past kv_len at -inf; frees its K slot."""
      slot = k_slot(kp)
      plgpu.barrier_wait(k_bars.at[slot])
      k_tile = k_smem.at[slot]
      if wide is not None:   # The slot is free once widened.
        widen(k_tile, k_wide)
        plgpu.barrier_arrive(k_free.at[slot])
        k_tile = k_wide

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
      if wide is None:
        plgpu.barrier_arrive(k_free.at[slot])
      keys = key_iota + k_block(kp) * block_kv
      return jnp.where(keys < kv_len, s * scale, -jnp.inf)

    def anchor(kp, m):
      return jnp.maximum(m, scores(kp).max(axis=1))

    m_init = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                               row_layout)
    m = lax.fori_loop(0, n_anchor, anchor, m_init)

    def accumulate(vp, pending, acc, l, m_acc, m):
      """Block vp (its scores s and decision): waits for its V phase,
      adds p·V at the running max m if kept, frees the V slot."""
      s, keep = pending
      slot = v_slot(vp)
      plgpu.barrier_wait(v_bars.at[slot])
      v_tile = v_smem.at[slot] if wide is None else v_wide

      def zero_past_end():
        # Past kv_len a page may hold anything, NaN included: 0·NaN must
        # not reach the accumulator.
        v = plgpu.load(v_tile, layout=plgpu.Layout.WGMMA)
        keys = plgpu.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0,
                                      layout=plgpu.Layout.WGMMA)
        keys = keys + (start + vp) * block_kv
        v_tile[...] = jnp.where(keys < kv_len, v, jnp.zeros_like(v))
        plgpu.commit_smem()

      def kept():
        if wide is not None:
          widen(v_smem.at[slot], v_wide)
        pl.when((start + vp + 1) * block_kv > kv_len)(zero_past_end)
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        alpha = jnp.exp2(m_acc - m_safe)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        acc_scaled = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_new = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        if p_smem is None:
          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_tile)
          acc_new = pl.run_state(pv)(plgpu.ACC.init(acc_scaled))
        else:  # Interpret mode: P through shared memory.
          p_smem[...] = p16
          plgpu.commit_smem()

          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_tile)
            return acc_ref[...]
          acc_new = acc_scaled + pl.run_scoped(
              pv, plgpu.ACC((ROWS, head_dim), jnp.float32))
        return acc_new, l_new, m

      out = lax.cond(keep, kept, lambda: (acc, l, m_acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return out

    def step(vp, carry):
      """Scores and decides block vp, publishes the decision, then
      accumulates block vp - 1 (its V copy ran meanwhile)."""
      acc, l, m_acc, m, n_skipped, pending = carry
      s = scores(vp + n_anchor)
      m_blk = s.max(axis=1)
      if skip_enabled:
        # max over real rows of (block max - running max), from the scores
        # of visible keys; padded rows take no part. A split's first block
        # without anchors meets m = -inf: gap +inf, kept.
        real_rows = plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0,
                                           layout=row_layout) < group
        gap = jnp.where(real_rows, m_blk - m, -jnp.inf)
        keep = gap.max() >= log2_thr
        slot = v_slot(vp)
        votes_smem[slot] = keep.astype(jnp.int32)
        plgpu.barrier_arrive(vote_bars.at[slot])
      else:
        keep = vp >= 0
      acc, l, m_acc = lax.cond(
          vp > 0, lambda: accumulate(vp - 1, pending, acc, l, m_acc, m),
          lambda: (acc, l, m_acc))
      m = lax.cond(keep, lambda: jnp.maximum(m, m_blk), lambda: m)
      return (acc, l, m_acc, m, n_skipped + 1 - keep.astype(jnp.int32),
              (s, keep))

    acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32),
                            plgpu.Layout.WGMMA)
    l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
    nothing = (plgpu.layout_cast(
        jnp.full((ROWS, block_kv), -jnp.inf, jnp.float32),
        plgpu.Layout.WGMMA), n < 0)
    zero = n * 0
    acc, l, m_acc, m, n_skipped, pending = lax.fori_loop(
        0, n, step, (acc, l, m_init, m, zero, nothing))
    acc, l, m_acc = lax.cond(
        n > 0, lambda: accumulate(n - 1, pending, acc, l, m_acc, m),
        lambda: (acc, l, m_acc))

    # Every K copy has been read: the output tile reuses the K ring.
    acc_smem[...] = acc if v_scale is None else acc * v_scale
    ml_smem.at[0][...] = m_acc
    ml_smem.at[1][...] = l
    stats_smem[0] = n_skipped
    stats_smem[1] = n
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(acc_smem, acc_ref.at[batch, kv_head, split])
    plgpu.copy_smem_to_gmem(ml_smem, ml_ref.at[batch, kv_head, split])
    plgpu.copy_smem_to_gmem(stats_smem, stats_ref.at[batch, kv_head, split])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _memory():
    plgpu.copy_gmem_to_smem(table_ref.at[batch], table_smem, table_bar)
    plgpu.barrier_wait(table_bar)

    def page(block):   # The table is [rows, SLOT]: TMA boxes hold <= 256.
      return table_smem[block // SLOT, block % SLOT]

    def issue_k(kp):
      slot = k_slot(kp)
      plgpu.copy_gmem_to_smem(
          k_ref.at[page(k_block(kp)), pl.ds(0, block_kv), kv_head],
          k_smem.at[slot], k_bars.at[slot])

    def refill_k(kp):
      """K position kp + k_stages into kp's slot once it is free."""
      @pl.when(kp + k_stages < n_k)
      def _():
        plgpu.barrier_wait(k_free.at[k_slot(kp)])
        issue_k(kp + k_stages)

    for i in range(k_stages):
      pl.when(i < n_k)(functools.partial(issue_k, jnp.int32(i)))

    @pl.loop(0, n_anchor)
    def _anchors(kp):
      refill_k(kp)

    @pl.loop(0, n)
    def _stream(vp):
      slot = v_slot(vp)

      @pl.when(vp >= v_stages)
      def _():
        plgpu.barrier_wait(v_free.at[slot])

      def issue_v():
        plgpu.copy_gmem_to_smem(
            v_ref.at[page(start + vp), pl.ds(0, block_kv), kv_head],
            v_smem.at[slot], v_bars.at[slot])

      if skip_enabled:   # V once the block is kept; else an empty phase.
        plgpu.barrier_wait(vote_bars.at[slot])
        pl.when(votes_smem[slot] != 0)(issue_v)
        pl.when(votes_smem[slot] == 0)(
            lambda: plgpu.barrier_arrive(v_bars.at[slot]))
      else:
        issue_v()

      refill_k(vp + n_anchor)

    # Observe the last releases, so every phase is seen before exit.
    @pl.loop(jnp.maximum(n_k - k_stages, 0), n_k)
    def _drain_k(kp):
      plgpu.barrier_wait(k_free.at[k_slot(kp)])

    @pl.loop(jnp.maximum(n - v_stages, 0), n)
    def _drain_v(vp):
      plgpu.barrier_wait(v_free.at[v_slot(vp)])


@functools.partial(
    jax.jit, static_argnames=("group", "sm_scale", "num_splits", "max_mode",
                              "config", "interpret", "skip_enabled"))
def decode_partials(q, k_pages, v_pages, page_table, kv_lengths,
                    log_threshold, k_scale=None, v_scale=None, *, group: int,
                    sm_scale: float,
                    num_splits: int, max_mode: str = "anchored",
                    config: MosaicDecodeConfig = MosaicDecodeConfig(),
                    interpret=None, skip_enabled: bool = True):
  """Per-split partials of skip-softmax decode attention on Hopper.

  Args:
    q: [batch, kv_heads, group, head_dim] bf16/f16: each KV head's query
      heads.
    k_pages, v_pages: [n_pages, block_kv, kv_heads, head_dim], q's dtype or
      float8_e4m3fn (then with `k_scale` and `v_scale`).
    page_table: int32 [batch, pages_per_seq]: page of each logical block.
    kv_lengths: int32 [batch] (<= pages_per_seq * block_kv); log_threshold:
      f32 [batch] (natural log).
    k_scale, v_scale: f32 [kv_heads], FP8 pages only: a page holds
      values / scale.
    num_splits: split-K factor; max_mode: "split" or "anchored".
    interpret: None on a GPU, or a `plgpu.InterpretGPUParams` to run on CPU
      (warpgroups, TMA and barriers simulated; races detected on request).
    skip_enabled: False builds the dense kernel (every V page read).

  Returns:
    acc f32 [batch, kv_heads, splits, 64, head_dim] (unnormalized; rows past
    `group` are padding), m f32 [batch, kv_heads, splits, 64] (row max,
    log2 units, -inf where a split kept nothing), l f32 (row sums),
    skipped, visited int32 [batch, kv_heads, splits].
  """
  b, hkv, g, d = q.shape
  n_pages, block_kv = k_pages.shape[:2]
  fp8 = jnp.dtype(k_pages.dtype) in FP8_DTYPES
  if fp8 != (k_scale is not None and v_scale is not None) or (
      v_pages.dtype != k_pages.dtype):
    raise ValueError("FP8 pages (both K and V) take `k_scale` and `v_scale`; "
                     f"other pages take neither; got K {k_pages.dtype}, V "
                     f"{v_pages.dtype}, k_scale {k_scale is not None}, "
                     f"v_scale {v_scale is not None}.")
  if fp8:   # Both products run in f16, into which e4m3 widens exactly.
    q = q.astype(jnp.float16)
  dtype = q.dtype
  if max_mode not in MAX_MODES:
    raise ValueError(f"`max_mode` must be one of {MAX_MODES} for the Mosaic "
                     f"decode kernel, got {max_mode!r}.")
  q = jnp.pad(q, ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))
  pages_per_seq = page_table.shape[1]
  width = -(-pages_per_seq // SLOT) * SLOT
  table = jnp.pad(page_table.astype(jnp.int32),
                  ((0, 0), (0, width - pages_per_seq))).reshape(b, -1, SLOT)
  params = jnp.zeros((b, SLOT), jnp.float32)
  params = params.at[:, 0].set(kv_lengths.astype(jnp.float32))
  params = params.at[:, 1].set(log_threshold * LOG2E)
  k_stages = k_ring_depth(config, d, block_kv, pages_per_seq, fp8)
  v_stages = config.v_stages
  smem_bytes = shared_memory_bytes(d, block_kv, pages_per_seq, k_stages,
                                   v_stages, fp8=fp8)
  if smem_bytes > MAX_SHARED_MEMORY:
    raise ValueError(
        f"head_dim {d}, pages of {block_kv} keys, a page table of "
        f"{pages_per_seq} pages and rings of {k_stages} K / {v_stages} V "
        f"pages need {smem_bytes} bytes of shared memory (max "
        f"{MAX_SHARED_MEMORY}); use smaller pages or fewer stages.")
  def swizzled(itemsize):   # Rows of d elements, in 128 or 64 bytes.
    swizzle = 128 if d * itemsize >= 128 else 64
    return (plgpu.TilingTransform((8, swizzle // itemsize)),
            plgpu.SwizzleTransform(swizzle))

  page_dtype = k_pages.dtype
  page_swizzle = swizzled(jnp.dtype(page_dtype).itemsize)
  inputs = [q, k_pages, v_pages, table, params]
  if fp8:
    scales = jnp.zeros((hkv, SLOT), jnp.float32)
    scales = scales.at[:, 0].set(jnp.asarray(k_scale, jnp.float32))
    inputs.append(scales.at[:, 1].set(jnp.asarray(v_scale, jnp.float32)))

  def blasst_decode_mosaic(q_ref, k_ref, v_ref, table_ref, params_ref,
                           *refs):
    *scales_ref, acc_ref, ml_ref, stats_ref = refs
    smem = [
        plgpu.SMEM((ROWS, d), dtype, transforms=swizzled(2)),
        plgpu.RefUnion(
            plgpu.SMEM((k_stages, block_kv, d), page_dtype,
                       transforms=page_swizzle),
            plgpu.SMEM((ROWS, d), jnp.float32)),
        plgpu.SMEM((v_stages, block_kv, d), page_dtype,
                   transforms=page_swizzle),
        plgpu.SMEM((width // SLOT, SLOT), jnp.int32),
        plgpu.SMEM((2, SLOT), jnp.float32),
        plgpu.SMEM((v_stages,), jnp.int32),
        plgpu.SMEM((2, ROWS), jnp.float32),
        plgpu.SMEM((SLOT,), jnp.int32),
    ]
    if interpret is not None:
      smem.append(plgpu.SMEM((ROWS, block_kv), dtype, transforms=swizzled(2)))
    n_base = len(smem)
    if fp8:   # scales, then the K and V tiles the pages widen into
      smem += [plgpu.SMEM((SLOT,), jnp.float32)] + [
          plgpu.SMEM((block_kv, d), jnp.float16, transforms=swizzled(2))
          for _ in range(2)]
    bars = [
        plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=k_stages),
        plgpu.Barrier(num_barriers=k_stages),
        plgpu.Barrier(num_barriers=v_stages),
        plgpu.Barrier(num_barriers=v_stages),
        plgpu.Barrier(num_barriers=v_stages),
    ] + ([plgpu.Barrier()] if fp8 else [])
    n_smem = len(smem)

    def body(*scoped):
      smem_refs = scoped[:n_smem]
      wide = None
      if fp8:
        scales_smem, k_wide, v_wide = smem_refs[n_base:]
        wide = (scales_ref[0], scales_smem, scoped[-1], k_wide, v_wide)
      _kernel(q_ref, k_ref, v_ref, table_ref, params_ref, acc_ref, ml_ref,
              stats_ref, (smem_refs, scoped[n_smem:n_smem + 8]),
              sm_scale=sm_scale,
              block_kv=block_kv, head_dim=d, dtype=dtype, group=g,
              num_splits=num_splits, skip_enabled=skip_enabled,
              anchored=max_mode == "anchored", k_stages=k_stages,
              v_stages=v_stages,
              p_smem=smem_refs[8] if interpret is not None else None,
              wide=wide)

    pl.run_scoped(body, *smem, *bars, collective_axes="wg")

  acc, ml, stats = plgpu.kernel(
      blasst_decode_mosaic,
      out_type=(
          jax.ShapeDtypeStruct((b, hkv, num_splits, ROWS, d), jnp.float32),
          jax.ShapeDtypeStruct((b, hkv, num_splits, 2, ROWS), jnp.float32),
          jax.ShapeDtypeStruct((b, hkv, num_splits, SLOT), jnp.int32)),
      grid=(num_splits, hkv, b),
      grid_names=("split", "kv_heads", "batch"),
      num_threads=2,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(*inputs)
  return (acc, ml[..., 0, :], ml[..., 1, :], stats[..., 0], stats[..., 1])
