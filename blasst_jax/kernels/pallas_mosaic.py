"""Hopper skip-softmax prefill kernel (Pallas Mosaic GPU), FA3 style.

`bj.attention` runs it by default on Hopper GPUs for bf16/f16 and head_dim
64/128/256 (`implementation="pallas_mosaic"`). With `interpret=` it runs on
CPU in Pallas' GPU interpret mode, which simulates the warpgroups, TMA and
barriers and detects shared-memory races (tests/test_mosaic_interpret.py).

Each program owns two q tiles of `block_q` rows, one per compute warpgroup,
and a third (memory) warpgroup that streams K and V blocks into a ring of
`num_stages` shared-memory slots with TMA. The compute warpgroups take turns
on the tensor cores (a schedule barrier, as in FlashAttention-3): while one
runs its q·kᵀ or P·V wgmma the other does its softmax.

Skip rule per compute warpgroup and KV block (log2 units, scale folded in):

    m_blk = rowmax(q·kᵀ) * scale
    skip  = (step > 0) and max_rows(m_blk - m_prev) < log2(λ)

A skipped block does no exponentials, no row sum and no P·V wgmma. V is still
copied by the memory warpgroup (the decision is made after the copy was
issued), and the consumer still waits on and releases both K and V slots and
takes its turns at the schedule barrier, so the pipeline stays in step.

Padding: q rows are padded by repeating the last real row, so padded rows
repeat a real row's gap and never change a decision; keys past `kv_len` are
masked in the last blocks.
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
LN2 = math.log(2.0)
COMPUTE_WGS = 2
# 32 words = 128 bytes: the alignment TMA needs for shared-memory slots.
SLOT = 32


DEFAULT_BLOCK_Q = 64
# Shared memory per block on H100/H200 (227 KiB).
MAX_SHARED_MEMORY = 232448


def default_block_kv(head_dim: int) -> int:
  return 64 if head_dim > 128 else 128


def shared_memory_bytes(block_q, block_kv, head_dim, num_stages) -> int:
  """q/o tiles of both compute warpgroups + the K/V ring + small buffers.

  The small buffers (lse, scalars, barriers) and their 1 KiB alignment took
  5.3 KiB in a measured build; 6 KiB is reserved for them.
  """
  tiles = (COMPUTE_WGS * block_q + 2 * num_stages * block_kv) * head_dim * 2
  return tiles + 6144


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Speed knobs of the Mosaic kernel (no effect on results).

  Attributes:
    num_stages: K/V shared-memory ring depth (>= 2).
    compute_registers: registers per thread granted to compute warpgroups.
  """

  num_stages: int = 2
  compute_registers: int = 232


def _kernel(q_ref, k_ref, v_ref, params_ref, out_ref, lse_ref, stats_ref,
            scoped, *, sm_scale, block_q, block_kv, head_dim, dtype, causal,
            q_len, group, num_stages, compute_registers, skip_enabled,
            p_smem2):
  batch = lax.axis_index("batch")
  q_head = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  (qo_smem2, k_smem, v_smem, lse_smem2, stats_smem2, params_smem), bars = (
      scoped)
  (k_bars, v_bars, q_bars, params_bar), (k_free, v_free), sched_bar = bars

  def schedule_turn():
    plgpu.barrier_arrive(sched_bar)
    plgpu.barrier_wait(sched_bar)

  # Per-sequence scalars [kv_len, log2(λ), 0...]: one TMA per warpgroup into
  # its own 128-byte slot (TMA needs 128-byte aligned shared memory).
  my_params = params_smem.at[wg]
  plgpu.copy_gmem_to_smem(params_ref.at[batch], my_params, params_bar.at[wg])
  plgpu.barrier_wait(params_bar.at[wg])
  kv_len = my_params[0].astype(jnp.int32)
  log2_thr = my_params[1]
  scale = sm_scale * LOG2E

  pair_base = lax.axis_index("q_seq") * (COMPUTE_WGS * block_q)
  kv_blocks = lax.div(kv_len + block_kv - 1, block_kv)

  def steps_for(q_base):
    """KV blocks a tile starting at `q_base` must visit."""
    if not causal:
      return kv_blocks
    last_row = jnp.minimum(q_base + block_q, q_len) - 1
    return jnp.minimum(kv_blocks, lax.div(last_row, block_kv) + 1)

  # The memory warpgroup streams the longest of the two tiles' ranges.
  max_steps = jnp.maximum(steps_for(pair_base),
                          steps_for(pair_base + block_q))

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(compute_registers, action="increase")
    qo_smem = qo_smem2.at[wg]
    q_base = pair_base + wg * block_q
    n_steps = steps_for(q_base)
    # Blocks with no masked entry for any row of this tile.
    n_full = lax.div(kv_len, block_kv)
    if causal:
      n_full = jnp.minimum(n_full, lax.div(q_base + 1, block_kv))
    n_full = jnp.minimum(n_full, n_steps)

    plgpu.copy_gmem_to_smem(
        q_ref.at[batch, pl.ds(q_base, block_q), q_head], qo_smem,
        q_bars.at[wg])
    plgpu.barrier_wait(q_bars.at[wg])

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                            row_layout)
    l_i = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32),
                            row_layout)
    acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32),
                            plgpu.Layout.WGMMA)

    @pl.when(n_steps > 0)
    def _():
      plgpu.barrier_wait(k_bars.at[0])

    pl.when(wg == 1)(schedule_turn)

    def step(kv_step, carry, *, masked: bool):
      acc, m_i, l_i, n_skipped = carry
      slot = lax.rem(kv_step, jnp.array(num_stages, kv_step.dtype))

      def qk_product(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        schedule_turn()
        return acc_ref[...]

      s = pl.run_scoped(qk_product,
                        plgpu.ACC((block_q, block_kv), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])          # K slot may be refilled
      if masked:
        rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0,
                                      layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                      layout=plgpu.Layout.WGMMA)
        keys = cols + kv_step * block_kv
        visible = keys < kv_len
        if causal:
          visible = visible & (rows + q_base >= keys)
        s = jnp.where(visible, s, -jnp.inf)
      m_blk = s.max(axis=1) * scale                  # [block_q], log2 units

      def wait_next_k():
        nxt = kv_step + 1
        @pl.when(nxt < n_steps)
        def _():
          plgpu.barrier_wait(k_bars.at[lax.rem(
              nxt, jnp.array(num_stages, nxt.dtype))])

      def end_softmax():
        plgpu.barrier_arrive(sched_bar)              # done with softmax
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_wait(sched_bar)                # tensor cores are ours

      def keep():
        m_new = jnp.maximum(m_i, m_blk)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m_i - m_safe)
        p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        acc_scaled = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_new = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc_scaled, l_new, m_new2, p16 = lax.optimization_barrier(
            (acc_scaled, l_new, m_new, p16))
        end_softmax()

        if p_smem2 is None:
          def pv_product(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            wait_next_k()

          acc_out = pl.run_state(pv_product)(plgpu.ACC.init(acc_scaled))
        else:
          # Interpret-mode variant: P goes through shared memory (the
          # interpreter has no register-operand wgmma nor run_state).
          p_smem = p_smem2.at[wg]
          p_smem[...] = p16
          plgpu.commit_smem()

          def pv_product(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
            wait_next_k()
            return acc_ref[...]

          acc_out = acc_scaled + pl.run_scoped(
              pv_product, plgpu.ACC((block_q, head_dim), jnp.float32))
        return acc_out, m_new2, l_new, n_skipped

      if not skip_enabled:
        out = keep()
      else:
        gap = jnp.where(m_blk > -jnp.inf, m_blk - m_i, -jnp.inf)
        skip = (kv_step > 0) & (gap.max() < log2_thr)

        def drop():
          end_softmax()
          wait_next_k()
          return acc, m_i, l_i, n_skipped + 1

        out = lax.cond(skip, drop, keep)
      plgpu.barrier_arrive(v_free.at[slot])           # V slot may be refilled
      return out

    carry = (acc, m_i, l_i, jnp.int32(0))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False),
                          carry)
    acc, m_i, l_i, n_skipped = lax.fori_loop(
        n_full, n_steps, functools.partial(step, masked=True), carry)

    def flush(kv_step, _):
      # This tile is done; release the slots streamed for the other tile and
      # keep taking turns so the other warpgroup is never left waiting.
      # Waiting on the copies too keeps every barrier phase observed.
      slot = lax.rem(kv_step, jnp.array(num_stages, kv_step.dtype))
      plgpu.barrier_wait(k_bars.at[slot])
      plgpu.barrier_arrive(k_free.at[slot])
      plgpu.barrier_wait(v_bars.at[slot])
      plgpu.barrier_arrive(v_free.at[slot])
      schedule_turn()
      schedule_turn()

    lax.fori_loop(n_steps, max_steps, flush, None)

    pl.when(wg == 0)(schedule_turn)

    has_mass = l_i > 0
    l_safe = jnp.where(has_mass, l_i, 1.0)
    acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    qo_smem[...] = acc.astype(dtype)
    lse_smem2.at[wg][...] = jnp.where(
        has_mass, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    stats = stats_smem2.at[wg]
    stats[0] = n_skipped
    stats[1] = n_steps.astype(jnp.int32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem,
                            out_ref.at[batch, pl.ds(q_base, block_q), q_head])
    plgpu.copy_smem_to_gmem(lse_smem2.at[wg],
                            lse_ref.at[batch, q_head, pl.ds(q_base, block_q)])
    tile = lax.axis_index("q_seq") * COMPUTE_WGS + wg
    plgpu.copy_smem_to_gmem(stats, stats_ref.at[batch, q_head, tile])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

    def issue(step, slot):
      src = (batch, pl.ds(step * block_kv, block_kv), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bars.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bars.at[slot])

    for i in range(num_stages):
      pl.when(i < max_steps)(functools.partial(issue, i, i))

    @pl.loop(num_stages, max_steps)
    def _stream(step):
      slot = lax.rem(step, jnp.array(num_stages, step.dtype))
      src = (batch, pl.ds(step * block_kv, block_kv), kv_head)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bars.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bars.at[slot])

    # Observe the last releases too, so every barrier phase this warpgroup
    # took part in is seen before the barriers are freed.
    @pl.loop(jnp.maximum(max_steps - num_stages, 0), max_steps)
    def _drain(step):
      slot = lax.rem(step, jnp.array(num_stages, step.dtype))
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sm_scale", "block_q", "block_kv", "config",
                     "skip_enabled", "interpret"))
def attention_forward(q, k, v, kv_lengths, log_threshold, *, causal: bool,
                      sm_scale: float, block_q: int = 64, block_kv: int = 128,
                      config: MosaicConfig = MosaicConfig(),
                      skip_enabled: bool = True, interpret=None):
  """Skip-softmax forward on Hopper; same contract as the Triton kernel.

  Args:
    q: [batch, q_len, q_heads, head_dim], bf16 or f16, head_dim in
      {64, 128, 256}.
    k, v: [batch, kv_len, kv_heads, head_dim].
    kv_lengths: int32 [batch]; log_threshold: f32 [batch] (natural log).
    interpret: None on a GPU, or a `plgpu.InterpretGPUParams` to run on CPU
      in Pallas' GPU interpret mode (barriers, TMA and races simulated; P·V
      then reads P from shared memory instead of registers). Slow: tests only.

  Returns:
    out [batch, q_len, q_heads, head_dim], lse f32 [batch, q_heads, q_len],
    skipped, visited int32 [batch, q_heads, n_q_tiles] (tiles of block_q).
  """
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  pair = COMPUTE_WGS * block_q
  n_pairs = -(-lq // pair)
  nk = -(-lk // block_kv)
  # Padded q rows repeat the last real row: their gaps equal a real row's,
  # so they never change a decision. Their outputs are dropped.
  q = jnp.pad(q, ((0, 0), (0, n_pairs * pair - lq), (0, 0), (0, 0)),
              mode="edge")
  k = jnp.pad(k, ((0, 0), (0, nk * block_kv - lk), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, nk * block_kv - lk), (0, 0), (0, 0)))
  params = jnp.zeros((b, SLOT), jnp.float32)
  params = params.at[:, 0].set(kv_lengths.astype(jnp.float32))
  params = params.at[:, 1].set(log_threshold * LOG2E)
  dtype = q.dtype
  num_stages = config.num_stages

  def blasst_prefill_mosaic(q_ref, k_ref, v_ref, params_ref, out_ref, lse_ref,
                            stats_ref):
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, block_q, d), dtype, transforms=swizzled),
        plgpu.SMEM((num_stages, block_kv, d), dtype, transforms=swizzled),
        plgpu.SMEM((num_stages, block_kv, d), dtype, transforms=swizzled),
        plgpu.SMEM((COMPUTE_WGS, block_q), jnp.float32),
        plgpu.SMEM((COMPUTE_WGS, SLOT), jnp.int32),
        plgpu.SMEM((COMPUTE_WGS + 1, SLOT), jnp.float32),
    )
    if interpret is not None:
      scratch += (plgpu.SMEM((COMPUTE_WGS, block_q, block_kv), dtype,
                             transforms=swizzled),)
    n_smem = len(scratch)
    barriers = (
        (plgpu.Barrier(num_barriers=num_stages),
         plgpu.Barrier(num_barriers=num_stages),
         plgpu.Barrier(num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_barriers=COMPUTE_WGS + 1)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=num_stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    )
    pl.run_scoped(
        lambda *scoped: _kernel(
            q_ref, k_ref, v_ref, params_ref, out_ref, lse_ref, stats_ref,
            (scoped[:6], scoped[n_smem:]), sm_scale=sm_scale, block_q=block_q,
            block_kv=block_kv, head_dim=d, dtype=dtype, causal=causal, q_len=lq,
            group=hq // hkv, num_stages=num_stages,
            compute_registers=config.compute_registers,
            skip_enabled=skip_enabled,
            p_smem2=scoped[6] if interpret is not None else None),
        *scratch, *barriers, collective_axes="wg")

  out, lse, stats = plgpu.kernel(
      blasst_prefill_mosaic,
      out_type=(
          jax.ShapeDtypeStruct(q.shape, dtype),
          jax.ShapeDtypeStruct((b, hq, n_pairs * pair), jnp.float32),
          jax.ShapeDtypeStruct((b, hq, n_pairs * COMPUTE_WGS, SLOT),
                               jnp.int32),
      ),
      grid=(hq, n_pairs, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(q, k, v, params)
  nq = -(-lq // block_q)   # Tiles past q_len only hold padding rows.
  return (out[:, :lq], lse[:, :, :lq], stats[..., :nq, 0],
          stats[..., :nq, 1])
