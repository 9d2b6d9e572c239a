"""Backward of skip-softmax attention on Hopper (Pallas Mosaic GPU).

The same gradient as `pallas_triton_bwd` (flash-attention backward over
the blocks the forward kept; natural-log lse, `delta = rowsum(dO * O)`):

    P  = exp(s - lse)            dV = Pᵀ dO
    dP = dO Vᵀ                   dS = P * (dP - delta)
    dQ = dS K * scale            dK = dSᵀ Q * scale

on 64 x 64 tiles with warpgroup matmuls, in warp-specialized kernels
shaped like the forward (`pallas_mosaic`): each program has two compute
warpgroups that own one tile each and a memory warpgroup that streams the
union of the two tiles' lists of kept partners through a ring of
shared-memory slots with TMA.

- dK/dV: a compute warpgroup owns a KV block (its K and V stay in shared
  memory) and accumulates dK and dV in registers over the q tiles that kept
  the block; Q, dO, lse and delta tiles are streamed.
- dQ, `fuse_dq` (default at head_dim 64): the dK/dV kernel also writes
  dS to shared memory, forms dQ partials dS·K for each streamed q tile and
  adds them into an f32 accumulator in global memory with TMA reduce-adds.
- dQ, otherwise: a second kernel where a compute warpgroup owns a q tile
  (Q, dO, lse, delta stay) and accumulates dQ over the KV blocks the tile
  kept, recomputing P and dP; K and V are streamed.

Blocks the forward skipped are in neither list: no work, no reads. At a
union position its tile did not keep, a compute warpgroup waits on the
slot's copies and releases it without computing, so the two stay in step.
Every step masks keys past kv_len and, causally, keys after the row (a
separate unmasked build for interior tiles, chosen per step by a branch,
measured slower on H100); rows that saw no key have lse = -inf and get
P = 0. GQA: dK/dV come per q head and are summed over the group in XLA.
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

from blasst_jax.kernels import block_lists as lists_lib
from blasst_jax.kernels import pallas_mosaic
from blasst_jax.kernels import tiles

LOG2E = math.log2(math.e)
# Two compute warpgroups, a tile each; block lists as the forward's:
# [n_union, 0, 0, 0] + entries in 128-byte slots of SLOT words.
COMPUTE_WGS = 2
SLOT = pallas_mosaic.SLOT
LIST_HEADER = pallas_mosaic.LIST_HEADER
BLOCK = 64            # q tile and KV block rows (one wgmma M tile)
HEAD_DIMS = (64, 128)
DQ_CHUNK = 64         # dQ columns per fused product (one swizzle tile)


@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
  """Speed knobs of the Hopper backward (no effect on results).

  Attributes:
    num_stages: depth of the shared-memory ring of streamed tiles (>= 2).
    compute_registers: registers per thread of a compute warpgroup (a
      multiple of 8; 2 x compute + memory <= 512).
    memory_registers: registers per thread the memory warpgroup keeps
      (24 lets the compute warpgroups have 240).
    fuse_dq: one kernel that also reduces dQ partials into f32 global
      memory (5 products per tile pair), else a second kernel for dQ that
      recomputes P and dP (7). None: fused for head_dim 64 only (H100,
      causal 8k, B=4, 16 heads: 4.1-4.2 vs 4.5-4.8 ms; at head_dim 128 the
      fused kernel, with dK, dV and a dQ chunk in 240 registers, spills
      296 bytes and took 8.9-9.6 vs 6.1-6.8 ms).
  """

  num_stages: int = 2
  compute_registers: int = 232
  memory_registers: int = pallas_mosaic.MEMORY_REGISTERS
  fuse_dq: bool | None = None

  def __post_init__(self):
    pallas_mosaic.check_pipeline_knobs(self.num_stages, self.compute_registers,
                                       self.memory_registers)
    if self.fuse_dq not in (None, True, False):
      raise ValueError(f"`fuse_dq` must be None, True or False, got "
                       f"{self.fuse_dq!r}.")


def supports(head_dim: int, dtype) -> bool:
  """Whether this backward runs the problem (else use the Triton one)."""
  return head_dim in HEAD_DIMS and jnp.dtype(dtype) in (
      jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _program_lists(visit):
  """int32 [batch, heads, n_programs, rows, SLOT]: per program the union
  of its two tiles' lists, `LIST_HEADER` words then `pair_union` entries."""
  entries, n_union, _ = lists_lib.pair_union(visit, COMPUTE_WGS)
  lists = pallas_mosaic.pack_lists([n_union[..., None]], entries)
  return lists.reshape(*lists.shape[:-1], -1, SLOT)


def _product(a, b, shape):
  """a @ b with one wgmma into a fresh f32 accumulator; a, b in SMEM."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _accumulate(acc, a, b, a_smem):
  """acc + a @ b; `a` from registers, or through `a_smem` when not None
  (interpret mode has no register-operand wgmma)."""
  if a_smem is None:
    return _accumulate_smem(acc, a, b, False)
  a_smem[...] = a
  plgpu.commit_smem()
  return acc + _product(a_smem, b, acc.shape)


def _accumulate_smem(acc, a, b, interpret):
  """acc + a @ b into the same registers (interpret: a fresh product)."""
  if interpret:
    return acc + _product(a, b, acc.shape)
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def _visible(row_ids, key_ids, row_dim, kv_len, causal, layout):
  """bool [BLOCK, BLOCK] in `layout`: which scores a row may see, from the
  tile's row and key index vectors (row_dim: the axis rows run along)."""
  def full(ids, dim):
    return plgpu.layout_cast(
        lax.broadcast_in_dim(ids, (BLOCK, BLOCK), [dim]), layout)
  keys = full(key_ids, 1 - row_dim)
  visible = keys < kv_len
  if causal:
    visible = visible & (keys <= full(row_ids, row_dim))
  return visible


class _Pipeline:
  """The program's list and its ring of streamed slots, as both kinds of
  warpgroup see them."""

  def __init__(self, list_smem, num_stages):
    self.list_smem = list_smem
    self.num_stages = num_stages

  def word(self, i):
    return self.list_smem[i // SLOT, i % SLOT]

  @property
  def n_stream(self):
    return self.word(0)

  def block_at(self, pos):
    return self.word(LIST_HEADER + pos) >> COMPUTE_WGS

  def in_list(self, pos, wg):
    return ((self.word(LIST_HEADER + pos) >> wg) & 1) == 1

  def slot(self, pos):
    return lax.rem(pos, jnp.array(self.num_stages, pos.dtype))


def _start_program(lists_ref, list_smem, list_bar, params_ref, params_smem,
                   params_bar, num_stages, reverse_of=None):
  """Copies the program's list (memory warpgroup) and each warpgroup's
  per-sequence scalars in.

  reverse_of: the number of programs along "seq", to number them from the
  last (launched first); None keeps the launch order.

  Returns:
    (batch, head, program, wg) indices, kv_len, the `_Pipeline`.
  """
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  program, wg = lax.axis_index("seq"), lax.axis_index("wg")
  if reverse_of is not None:
    program = reverse_of - 1 - program

  @pl.when(wg == COMPUTE_WGS)
  def _():
    plgpu.copy_gmem_to_smem(lists_ref.at[batch, head, program], list_smem,
                            list_bar)

  plgpu.copy_gmem_to_smem(params_ref.at[batch], params_smem.at[wg],
                          params_bar.at[wg])
  plgpu.barrier_wait(params_bar.at[wg])
  plgpu.barrier_wait(list_bar)
  kv_len = params_smem.at[wg][0].astype(jnp.int32)
  return (batch, head, program, wg), kv_len, _Pipeline(list_smem, num_stages)


def _stream(pipe, issue, free_bars, registers):
  """The memory warpgroup: issue(pos, slot) for every union position, each
  slot refilled once both compute warpgroups released it."""
  plgpu.set_max_registers(registers, action="decrease")
  n = pipe.n_stream
  for i in range(pipe.num_stages):
    pl.when(i < n)(functools.partial(issue, jnp.int32(i), i))

  @pl.loop(pipe.num_stages, n)
  def _(pos):
    slot = pipe.slot(pos)
    plgpu.barrier_wait(free_bars.at[slot])
    issue(pos, slot)

  # Observe the last releases too before the barriers are freed.
  @pl.loop(jnp.maximum(n - pipe.num_stages, 0), n)
  def _(pos):
    plgpu.barrier_wait(free_bars.at[pipe.slot(pos)])


def _copy_kv_block(k_ref, v_ref, tail_ref, batch, kv_head, block, kv_len,
                   dst, bars):
  """Copies K and V block `block` (of BLOCK keys) into dst = (K, V) with
  barriers bars; the block holding kv_len comes from tail_ref [batch, 2,
  BLOCK, kv_heads, d] (zero past the length: NaN there would reach dS)."""
  tail = block == lax.div(kv_len, BLOCK)

  @pl.when(~tail)
  def _():
    rows_at = (batch, pl.ds(block * BLOCK, BLOCK), kv_head)
    for src, to, bar in zip((k_ref, v_ref), dst, bars):
      plgpu.copy_gmem_to_smem(src.at[rows_at], to, bar)

  @pl.when(tail)
  def _():
    for i, (to, bar) in enumerate(zip(dst, bars)):
      plgpu.copy_gmem_to_smem(
          tail_ref.at[batch, i, pl.ds(0, BLOCK), kv_head], to, bar)


def _dkdv_kernel(q_ref, do_ref, ld_ref, k_ref, v_ref, tail_ref, params_ref,
                 lists_ref,
                 *refs, scale, causal, group, dtype, head_dim, num_stages,
                 compute_registers, memory_registers, fuse_dq, reduce_dq):
  # q_ref, do_ref [b, lq_pad, hq, d]; ld_ref f32 [b, hq, n_q_tiles, 2,
  # BLOCK] (lse in log2 units, delta); k_ref, v_ref [b, lk_pad, hkv, d];
  # fused: dq_ref f32 [b, hq, n_q_tiles, n_chunks, BLOCK, DQ_CHUNK] (zeroed,
  # reduced into; interpret: [n_programs, ...] written per program);
  # dk_ref, dv_ref [b, lk_pad, hq, d].
  if fuse_dq:
    dq_ref, dk_ref, dv_ref, smem, bars = refs
    (kv_smem2, q_ring, do_ring, ld_ring, params_smem, list_smem, ds_smem2,
     dq_smem2, a_smem2) = smem
    (kv_bars, (q_bars, do_bars, ld_bars), free_bars, params_bar, list_bar,
     ds_ready, ds_free) = bars
  else:
    dk_ref, dv_ref, smem, bars = refs
    (kv_smem2, q_ring, do_ring, ld_ring, params_smem, list_smem,
     a_smem2) = smem
    kv_bars, (q_bars, do_bars, ld_bars), free_bars, params_bar, list_bar = bars
  (batch, head, program, wg), kv_len, pipe = _start_program(
      lists_ref, list_smem, list_bar, params_ref, params_smem, params_bar,
      num_stages)
  n_chunks = head_dim // DQ_CHUNK

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(compute_registers, action="increase")
    k_smem, v_smem = kv_smem2.at[0, wg], kv_smem2.at[1, wg]
    a_smem = None if a_smem2 is None else a_smem2.at[wg]
    k_base = (program * COMPUTE_WGS + wg) * BLOCK
    kv_head = lax.div(head, jnp.array(group, head.dtype))
    # kv_bars: [K of wg 0, K of wg 1, V of wg 0, V of wg 1].
    _copy_kv_block(k_ref, v_ref, tail_ref, batch, kv_head, k_base // BLOCK,
                   kv_len, (k_smem, v_smem),
                   (kv_bars.at[wg], kv_bars.at[COMPUTE_WGS + wg]))
    plgpu.barrier_wait(kv_bars.at[wg])
    plgpu.barrier_wait(kv_bars.at[COMPUTE_WGS + wg])
    layout = plgpu.Layout.WGMMA
    # Index vectors, broadcast per step: [BLOCK, BLOCK] iotas hoisted out
    # of the loop would hold 64 registers a thread.
    key_ids = k_base + plgpu.broadcasted_iota(
        jnp.int32, (BLOCK,), 0, layout=layout.reduce(1))      # [kv]
    col_ids = plgpu.broadcasted_iota(
        jnp.int32, (BLOCK,), 0, layout=layout.reduce(0)) if causal else None

    def step(pos, carry):
      slot = pipe.slot(pos)
      for bar in (q_bars, do_bars, ld_bars):
        plgpu.barrier_wait(bar.at[slot])
      q_smem, do_smem = q_ring.at[slot], do_ring.at[slot]
      if fuse_dq:
        # This warpgroup's dS slot is free once the previous position's
        # dQ product (by either warpgroup) has read it.
        pl.when(pos > 0)(lambda: plgpu.barrier_wait(ds_free))

      def visit(carry):
        dk, dv = carry
        # Transposed: KV rows are the wgmma M dimension.
        s_t = _product(k_smem, q_smem.transpose((1, 0)),
                       (BLOCK, BLOCK))                     # [kv, q]
        lse = plgpu.load(ld_ring.at[slot, 0], layout=layout.reduce(0))
        delta = plgpu.load(ld_ring.at[slot, 1], layout=layout.reduce(0))
        row_ids = pipe.block_at(pos) * BLOCK + col_ids if causal else None
        p_t = jnp.exp2(s_t * scale - lax.broadcast_in_dim(
            lse, s_t.shape, [1]))
        p_t = jnp.where(_visible(row_ids, key_ids, 1, kv_len, causal, layout),
                        p_t, 0.0)
        dv = _accumulate(dv, p_t.astype(dtype), do_smem, a_smem)
        dp_t = _product(v_smem, do_smem.transpose((1, 0)), (BLOCK, BLOCK))
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, s_t.shape, [1]))
        if fuse_dq:
          # dS goes through shared memory: dK's operand here, dQ's for the
          # warpgroup that owns this position.
          ds_smem = ds_smem2.at[wg]
          ds_smem[...] = ds_t.astype(dtype)
          plgpu.commit_smem()
          dk = _accumulate_smem(dk, ds_smem, q_smem, a_smem2 is not None)
        else:
          dk = _accumulate(dk, ds_t.astype(dtype), q_smem, a_smem)
        return dk, dv

      carry = lax.cond(pipe.in_list(pos, wg), visit, lambda c: c, carry)
      plgpu.barrier_arrive(free_bars.at[slot])
      if fuse_dq:
        parity = lax.rem(pos, jnp.array(2, pos.dtype))
        plgpu.barrier_arrive(ds_ready.at[parity])
        for chunk in range(n_chunks):
          # Chunk c of the position goes to warpgroup (pos * C + c) % 2:
          # d = 128, each its half; d = 64, positions alternate.
          owner = lax.rem(pos * n_chunks + chunk,
                          jnp.array(COMPUTE_WGS, pos.dtype))
          pl.when(owner == wg)(
              functools.partial(_dq_partial, pos, parity, chunk))
      return carry

    def _dq_partial(pos, parity, chunk):
      """dQ[:, chunk] of this position's q tile from both warpgroups' dS
      and K, reduced into dq_ref."""
      plgpu.barrier_wait(ds_ready.at[parity])
      cols_at = pl.ds(chunk * DQ_CHUNK, DQ_CHUNK)

      def term(w):
        return (ds_smem2.at[w].transpose((1, 0)),          # [q, kv]
                kv_smem2.at[0, w, :, cols_at])             # [kv, chunk]
      def products(acc_ref):
        for w in range(COMPUTE_WGS):
          pl.when(pipe.in_list(pos, w))(
              lambda w=w: plgpu.wgmma(acc_ref, *term(w)))
        return acc_ref[...]
      dq = pl.run_scoped(products, plgpu.ACC((BLOCK, DQ_CHUNK), jnp.float32))
      plgpu.barrier_arrive(ds_free)
      dq_smem = dq_smem2.at[wg]
      # The previous reduction has read the staging buffer.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      dq_smem[...] = dq
      plgpu.commit_smem()
      # Each (q tile, chunk) is one contiguous 16 KB block of dq_ref.
      rows = (batch, head, pipe.block_at(pos), chunk)
      if reduce_dq:
        plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[rows],
                                reduction_op="add")
      else:   # the interpreter has no reducing copy: one slab per program
        plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[(program,) + rows])

    zeros = plgpu.layout_cast(
        jnp.zeros((BLOCK, head_dim), jnp.float32), layout)
    dk, dv = lax.fori_loop(0, pipe.n_stream, step, (zeros, zeros))
    if fuse_dq:
      # The last dQ product has read this warpgroup's K.
      pl.when(pipe.n_stream > 0)(lambda: plgpu.barrier_wait(ds_free))
    # K and V are no longer read: their slots stage the results.
    k_smem[...] = (dk * (scale / LOG2E)).astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    out_at = (batch, pl.ds(k_base, BLOCK), head)
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[out_at], commit_group=False)
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[out_at], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    def issue(pos, slot):
      tile = pipe.block_at(pos)
      rows_at = (batch, pl.ds(tile * BLOCK, BLOCK), head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows_at], q_ring.at[slot],
                              q_bars.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[rows_at], do_ring.at[slot],
                              do_bars.at[slot])
      plgpu.copy_gmem_to_smem(ld_ref.at[batch, head, tile], ld_ring.at[slot],
                              ld_bars.at[slot])
    _stream(pipe, issue, free_bars, memory_registers)


def _dq_kernel(q_ref, do_ref, ld_ref, k_ref, v_ref, tail_ref, params_ref,
               lists_ref,
               dq_ref, smem, bars, *, scale, causal, group, dtype, head_dim,
               num_stages, compute_registers, memory_registers, n_programs):
  # As `_dkdv_kernel`, with the roles swapped: q tiles stay, KV streams.
  (qdo_smem2, ld_smem2, k_ring, v_ring, params_smem, list_smem,
   a_smem2) = smem
  qdo_bars, (k_bars, v_bars), free_bars, params_bar, list_bar = bars
  # Causal work grows with the q tile: the last tiles launch first, so the
  # last wave holds short programs (the dK/dV kernel's order already does).
  (batch, head, program, wg), kv_len, pipe = _start_program(
      lists_ref, list_smem, list_bar, params_ref, params_smem, params_bar,
      num_stages, reverse_of=n_programs)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(compute_registers, action="increase")
    q_smem, do_smem = qdo_smem2.at[0, wg], qdo_smem2.at[1, wg]
    a_smem = None if a_smem2 is None else a_smem2.at[wg]
    tile = program * COMPUTE_WGS + wg
    rows_at = (batch, pl.ds(tile * BLOCK, BLOCK), head)
    # qdo_bars: [Q, dO, lse/delta] x compute warpgroup.
    my_bars = [qdo_bars.at[i * COMPUTE_WGS + wg] for i in range(3)]
    plgpu.copy_gmem_to_smem(q_ref.at[rows_at], q_smem, my_bars[0])
    plgpu.copy_gmem_to_smem(do_ref.at[rows_at], do_smem, my_bars[1])
    plgpu.copy_gmem_to_smem(ld_ref.at[batch, head, tile], ld_smem2.at[wg],
                            my_bars[2])
    for bar in my_bars:
      plgpu.barrier_wait(bar)
    layout = plgpu.Layout.WGMMA
    lse = plgpu.load(ld_smem2.at[wg, 0], layout=layout.reduce(1))
    delta = plgpu.load(ld_smem2.at[wg, 1], layout=layout.reduce(1))
    row_ids = tile * BLOCK + plgpu.broadcasted_iota(
        jnp.int32, (BLOCK,), 0, layout=layout.reduce(1)) if causal else None
    col_ids = plgpu.broadcasted_iota(
        jnp.int32, (BLOCK,), 0, layout=layout.reduce(0))      # [kv]

    def step(pos, dq):
      slot = pipe.slot(pos)
      plgpu.barrier_wait(k_bars.at[slot])
      plgpu.barrier_wait(v_bars.at[slot])
      k_smem, v_smem = k_ring.at[slot], v_ring.at[slot]

      def visit(dq):
        s = _product(q_smem, k_smem.transpose((1, 0)),
                     (BLOCK, BLOCK))                       # [q, kv]
        key_ids = pipe.block_at(pos) * BLOCK + col_ids
        p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, s.shape, [0]))
        p = jnp.where(_visible(row_ids, key_ids, 0, kv_len, causal, layout),
                      p, 0.0)
        dp = _product(do_smem, v_smem.transpose((1, 0)), (BLOCK, BLOCK))
        ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
        return _accumulate(dq, ds.astype(dtype), k_smem, a_smem)

      dq = lax.cond(pipe.in_list(pos, wg), visit, lambda d: d, dq)
      plgpu.barrier_arrive(free_bars.at[slot])
      return dq

    dq = lax.fori_loop(0, pipe.n_stream, step, plgpu.layout_cast(
        jnp.zeros((BLOCK, head_dim), jnp.float32), layout))
    q_smem[...] = (dq * (scale / LOG2E)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows_at])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    kv_head = lax.div(head, jnp.array(group, head.dtype))

    def issue(pos, slot):
      _copy_kv_block(k_ref, v_ref, tail_ref, batch, kv_head,
                     pipe.block_at(pos), kv_len,
                     (k_ring.at[slot], v_ring.at[slot]),
                     (k_bars.at[slot], v_bars.at[slot]))
    _stream(pipe, issue, free_bars, memory_registers)


def _launch(kernel, name, inputs, out_shapes, smem_types, barrier_types, *,
            grid, interpret, **static):
  """plgpu.kernel with 2 compute + 1 memory warpgroup and scoped buffers."""
  n_smem = len(smem_types)

  def body(*refs):
    n_in = len(inputs)
    ins, outs = refs[:n_in], refs[n_in:]

    def scoped(*allocs):
      # The last shared buffer stages register operands in interpret mode.
      smem = tuple(allocs[:n_smem]) + ((None,) if interpret is None else ())
      kernel(*ins, *outs, smem, allocs[n_smem:], **static)

    pl.run_scoped(scoped, *smem_types, *barrier_types, collective_axes="wg")

  body.__name__ = name
  return plgpu.kernel(
      body, out_type=out_shapes, grid=grid,
      grid_names=("heads", "seq", "batch"),
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret)(*inputs)


def attention_backward(q, k, v, out, lse, d_out, kv_lengths, keep, *,
                       causal: bool, sm_scale: float, block_q: int,
                       block_kv: int,
                       config: MosaicBwdConfig = MosaicBwdConfig(),
                       interpret=None):
  """Gradients of attention restricted to the kept blocks (Hopper).

  Args:
    q, d_out, out: [batch, q_len, q_heads, head_dim], bf16 or f16,
      head_dim 64 or 128.
    k, v: [batch, kv_len, kv_heads, head_dim].
    lse: f32 [batch, q_heads, q_len], the forward's natural-log lse.
    kv_lengths: int32 [batch].
    keep: bool [batch, q_heads, n_q_tiles, n_kv_blocks] on the forward's
      tiles of block_q x block_kv (multiples of 64): blocks the forward
      kept (visited, selected, not skipped).
    interpret: None on a GPU, or `plgpu.InterpretGPUParams` (CPU simulation;
      tests).

  Returns:
    dq, dk, dv in the dtypes and shapes of q, k, v.
  """
  if not supports(q.shape[-1], q.dtype):
    raise ValueError(
        f"The Hopper backward takes bf16/f16 and head_dim in {HEAD_DIMS}, "
        f"got {q.dtype} and {q.shape[-1]}; use pallas_triton_bwd.")
  if block_q % BLOCK or block_kv % BLOCK:
    raise ValueError(f"keep tiles must be multiples of {BLOCK}, got "
                     f"{block_q} x {block_kv}.")
  keep, _, _ = lists_lib.cut_tiles(keep, q.shape[1], k.shape[1], block_q,
                                   block_kv, BLOCK, BLOCK)
  kept = lists_lib.walked_blocks(keep, kv_lengths.astype(jnp.int32),
                                 q_len=q.shape[1], block_q=BLOCK,
                                 block_kv=BLOCK, causal=causal)
  kv_lists = _program_lists(jnp.swapaxes(kept, 2, 3))   # dK/dV: per block
  if config.fuse_dq is None:
    config = dataclasses.replace(config, fuse_dq=q.shape[-1] == 64)
  q_lists = None if config.fuse_dq else _program_lists(kept)   # dQ: per tile
  if interpret is not None:
    # Built before the interpreted kernels (see pallas_mosaic's note).
    q_lists, kv_lists = jax.block_until_ready((q_lists, kv_lists))
  return _backward(q, k, v, out, lse, d_out, kv_lengths, q_lists, kv_lists,
                   causal=causal, sm_scale=sm_scale, config=config,
                   interpret=interpret)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "config",
                                             "interpret"))
def _backward(q, k, v, out, lse, d_out, kv_lengths, q_lists, kv_lists, *,
              causal, sm_scale, config, interpret):
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  group, dtype, stages = hq // hkv, q.dtype, config.num_stages
  pair = COMPUTE_WGS * BLOCK
  lq_pad, lk_pad = tiles.cdiv(lq, pair) * pair, tiles.cdiv(lk, pair) * pair
  n_q_tiles = lq_pad // BLOCK
  delta = tiles.output_grad_dot(d_out, out)                # [b, hq, lq]
  # Rows that saw no key: lse = +inf, so P = 0 (not exp(+inf)).
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  rows_pad = ((0, 0), (0, 0), (0, lq_pad - lq))
  ld = jnp.stack([jnp.pad(lse2, rows_pad, constant_values=jnp.inf),
                  jnp.pad(delta, rows_pad)], axis=2)          # [b, hq, 2, lq]
  ld = ld.reshape(b, hq, 2, n_q_tiles, BLOCK).swapaxes(2, 3)
  # Padded q rows have dO = 0 and P = 0: they add nothing.
  qp = tiles.pad_to(q, lq_pad, d)
  dop = tiles.pad_to(d_out.astype(dtype), lq_pad, d)
  kp, vp = tiles.pad_to(k, lk_pad, d), tiles.pad_to(v, lk_pad, d)
  params = jnp.zeros((b, SLOT), jnp.float32).at[:, 0].set(
      kv_lengths.astype(jnp.float32))
  tail = jnp.stack([tiles.tail_block(x, kv_lengths, BLOCK) for x in (kp, vp)],
                   axis=1)                        # [b, 2, BLOCK, hkv, d]
  inputs = (qp, dop, ld, kp, vp, tail, params)
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def tile_smem(*lead):
    return plgpu.SMEM((*lead, BLOCK, d), dtype, transforms=swizzled)

  def common_smem(lists):
    return [plgpu.SMEM((COMPUTE_WGS + 1, SLOT), jnp.float32),
            plgpu.SMEM(lists.shape[-2:], jnp.int32)]

  a_smem = [] if interpret is None else [
      plgpu.SMEM((COMPUTE_WGS, BLOCK, BLOCK), dtype, transforms=swizzled)]
  ring_bars = plgpu.Barrier(num_barriers=stages)
  free_bars = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)
  common_bars = [plgpu.Barrier(num_barriers=COMPUTE_WGS + 1), plgpu.Barrier()]
  static = dict(scale=sm_scale * LOG2E, causal=causal, group=group,
                dtype=dtype, head_dim=d, num_stages=stages,
                compute_registers=config.compute_registers,
                memory_registers=config.memory_registers)

  kv_smem = [tile_smem(2, COMPUTE_WGS), tile_smem(stages), tile_smem(stages),
             plgpu.SMEM((stages, 2, BLOCK), jnp.float32)] + common_smem(kv_lists)
  kv_bars = [plgpu.Barrier(num_barriers=COMPUTE_WGS * 2), (ring_bars,) * 3,
             free_bars] + common_bars
  dkdv_shapes = (jax.ShapeDtypeStruct((b, lk_pad, hq, d), dtype),) * 2
  n_kv_programs = lk_pad // pair
  if config.fuse_dq:
    # dQ partials are reduced (added) into f32 in global memory; in
    # interpret mode, which cannot reduce, each program owns a slab.
    slabs = () if interpret is None else (n_kv_programs,)
    n_chunks = d // DQ_CHUNK
    dq_acc = jax.new_ref(jnp.zeros(
        (*slabs, b, hq, n_q_tiles, n_chunks, BLOCK, DQ_CHUNK), jnp.float32))
    dk, dv = _launch(
        _dkdv_kernel, "blasst_backward_mosaic", inputs + (kv_lists, dq_acc),
        dkdv_shapes,
        kv_smem + [
            plgpu.SMEM((COMPUTE_WGS, BLOCK, BLOCK), dtype,
                       transforms=swizzled),                       # dS
            plgpu.SMEM((COMPUTE_WGS, BLOCK, DQ_CHUNK), jnp.float32)]  # dQ
        + a_smem,
        kv_bars + [plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
                   plgpu.Barrier(num_arrivals=d // DQ_CHUNK)],
        grid=(hq, n_kv_programs, b), interpret=interpret, fuse_dq=True,
        reduce_dq=not slabs, **static)
    dq = jax.freeze(dq_acc)
    if slabs:
      dq = jnp.sum(dq, axis=0)
    dq = jnp.einsum("bhtcrk->btrhck", dq).reshape(b, lq_pad, hq, d)
    dq = (dq * sm_scale).astype(dtype)
  else:
    dk, dv = _launch(
        _dkdv_kernel, "blasst_backward_dkdv_mosaic", inputs + (kv_lists,),
        dkdv_shapes, kv_smem + a_smem, kv_bars,
        grid=(hq, n_kv_programs, b), interpret=interpret, fuse_dq=False,
        reduce_dq=False, **static)
    dq = _launch(
        _dq_kernel, "blasst_backward_dq_mosaic",
        inputs + (q_lists,),
        jax.ShapeDtypeStruct((b, lq_pad, hq, d), dtype),
        [tile_smem(2, COMPUTE_WGS), plgpu.SMEM((COMPUTE_WGS, 2, BLOCK),
                                               jnp.float32),
         tile_smem(stages), tile_smem(stages)]
        + common_smem(q_lists) + a_smem,
        [plgpu.Barrier(num_barriers=COMPUTE_WGS * 3), (ring_bars,) * 2,
         free_bars] + common_bars,
        grid=(hq, lq_pad // pair, b), interpret=interpret,
        n_programs=lq_pad // pair, **static)

  def per_kv_head(x):   # GQA: sum over the group in f32
    x = x[:, :lk].reshape(b, lk, hkv, group, d)
    return jnp.sum(x.astype(jnp.float32), axis=3).astype(k.dtype)
  return dq[:, :lq], per_kv_head(dk), per_kv_head(dv)
