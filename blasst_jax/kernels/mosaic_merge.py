"""Inline Mosaic GPU pieces of the decode kernel's split-K merge.

The merge crosses programs: each split writes its partials with TMA (the
async proxy) and signals a semaphore (a generic-proxy release); the merging
program waits on it (an acquire) and reads them back with TMA. PTX orders
the two proxies only through `fence.proxy.async`, which `async_proxy_fence`
issues on both sides.

`semaphore_signal` and `semaphore_wait` do what Pallas' semaphore
primitives do, on a 32-bit word of an ordinary input (the control block's)
instead of a `pl.get_global` semaphore, which an XLA kernel zeroes before
every call; `take_ticket` counts on such a word, so that the last of the
splits to finish, whichever it is, merges them (nobody waits).
`warpgroup_barrier` is a barrier of the warpgroup's threads.
`transpose_cast` turns the transposed build's merged [head_dim, N] f32 tile
into the [N, head_dim] rows of the output (each of the warpgroup's threads
moves whole elements, so no layout of Mosaic's is needed for it).

Pallas' interpret mode runs no inline Mosaic: there the fence is nothing
(the interpreter runs the grid in order), the barrier nothing (it runs a
warpgroup as one thread) and the transposition a plain one.
"""

from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, gpu, memref

WARPGROUP = 128


def _fence(ctx):
  del ctx
  mgpu_utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)


def async_proxy_fence(*, interpret: bool) -> None:
  """Orders this warpgroup's TMA accesses to global memory with its generic
  ones (a semaphore's release after TMA writes, or TMA reads after its
  acquire)."""
  if not interpret:
    plgpu.inline_mgpu()(_fence)()


def _barrier(ctx):
  del ctx
  mgpu_utils.warpgroup_barrier()


def warpgroup_barrier(*, interpret: bool) -> None:
  """Waits for every thread of this warpgroup (e.g. before overwriting
  shared memory the others read, where Pallas inserts no barrier)."""
  if not interpret:
    plgpu.inline_mgpu()(_barrier)()


def _transpose_cast(ctx, src, dst):
  """dst[r, c] = src[c, r], in dst's dtype; src f32 [d, n], dst [n, d]."""
  del ctx
  index = ir.IndexType.get()
  d, n = ir.MemRefType(src.type).shape
  out_type = ir.MemRefType(dst.type).element_type
  c = lambda v: arith.constant(index, v)  # pylint: disable=g-long-lambda
  mgpu_utils.warpgroup_barrier()   # src was written by every thread
  thread = arith.remui(gpu.thread_id(gpu.Dimension.x), c(WARPGROUP))
  for i in range(d * n // WARPGROUP):
    element = arith.addi(thread, c(i * WARPGROUP))
    row = arith.divui(element, c(d))
    col = arith.remui(element, c(d))
    x = memref.load(src, [col, row])
    memref.store(arith.truncf(out_type, x), dst, [row, col])


def transpose_cast(src, dst, *, interpret: bool) -> None:
  """Writes the transpose of a warpgroup's f32 [d, n] shared-memory tile
  `src` into the untiled [n, d] tile `dst`, in dst's dtype (d * n a
  multiple of 128). The caller commits dst (`plgpu.commit_smem`) before
  copying it out."""
  if interpret:
    dst[...] = src[...].T.astype(dst.dtype)
    return
  plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))(
      _transpose_cast)(src, dst)


def _semaphore_signal(ctx, ref):
  del ctx
  mgpu_utils.warpgroup_barrier()   # every thread's part is done
  mgpu_utils.SemaphoreRef(mgpu_utils.memref_ptr(ref)).signal(
      1, memory_scope="gpu")


def semaphore_signal(ref) -> None:
  """Adds 1 to the 32-bit semaphore at `ref` (global memory, two 16-bit
  elements, 4-byte aligned): one thread of the warpgroup, after all of
  them, with release semantics at GPU scope. What `plgpu.semaphore_signal`
  does for a semaphore of `pl.get_global`, on a word of an input (so no
  kernel zeroes it before the call). GPU only."""
  plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))(_semaphore_signal)(ref)


def take_ticket(ref, ticket_ref, count: int) -> None:
  """Adds 1 to the 32-bit counter at `ref` (as `semaphore_signal`'s: global
  memory, two 16-bit elements) and writes the count before it to
  `ticket_ref[0]` (int32, shared memory) for the warpgroup: one thread,
  acquire and release at GPU scope, so the program that takes ticket
  `count - 1` (the last of `count`) sees every earlier taker's writes; that
  one sets the counter back to 0 (no one else adds to it by then). GPU
  only."""
  def take(ctx, counter, ticket):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    ptr = mgpu_utils.memref_ptr(counter)
    mgpu_utils.warpgroup_barrier()   # every thread's part is done
    with mgpu_utils.single_thread(scope=mgpu_utils.ThreadSubset.WARPGROUP):
      before = mgpu_utils.inline_ptx(
          "atom.acq_rel.gpu.global.add.u32 $0, [$1], $2;", ptr,
          mgpu_utils.c(1, i32), result_types=i32, has_side_effects=True)
      last = arith.cmpi(arith.CmpIPredicate.eq, before,
                        mgpu_utils.c(count - 1, i32))
      mgpu_utils.inline_ptx("st.relaxed.gpu.global.u32 [$0], $1;", ptr,
                            mgpu_utils.c(0, i32), predicate=last,
                            has_side_effects=True)
      memref.store(before, ticket, [mgpu_utils.c(0, ir.IndexType.get())])
    mgpu_utils.warpgroup_barrier()   # the ticket, for every thread
  plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))(take)(
      ref, ticket_ref)


def semaphore_wait(ref, count: int) -> None:
  """Waits until the semaphore at `ref` (as `semaphore_signal`) reaches
  `count` and subtracts it (acquire at GPU scope); the warpgroup waits
  with its thread. GPU only."""
  def wait(ctx, sem):
    del ctx
    mgpu_utils.SemaphoreRef(mgpu_utils.memref_ptr(sem)).wait(
        count, memory_scope="gpu")
  plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))(wait)(ref)
