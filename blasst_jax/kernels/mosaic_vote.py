"""A warpgroup-wide vote for the Mosaic GPU kernels.

The skip rule's decision must be uniform over a compute warpgroup (its
P·V wgmma is issued by all four warps or none) while each warp holds 16 of
the tile's rows, so the vote reduces across the warpgroup's warps. Mosaic
lowers `x.max()` over a row vector through one shared-memory scratch that
it places at the same address for every warpgroup: two warpgroups voting
at once could tear it, and a torn vote splits a warpgroup's branch (a
hang). `warpgroup_max` runs the same reduction through a scratch of the
warpgroup's own, so warpgroups vote concurrently.

(A vote by `bar.red.or.pred` on the warpgroup's named barrier needs no
shared memory, but ptxas then serializes every wgmma of the kernel,
"wgmma.mma_async instructions are serialized due to program dependence on
compiler-inserted WG.AR in divergent path", and spills: the λ = 0 build
ran 1.5x slower on an H200.)

`warpgroup_any` is the skip rule's vote with one barrier instead of the
reduction's two: each warp folds its rows with `vote.any` (one
instruction, no shuffles), writes one word, and the warpgroup meets once on
its named barrier. Consecutive votes alternate between two halves of the
scratch (`parity`), so the barrier that guards a half's reads is the next
vote's: a warp can rewrite a half only after every warp has passed the vote
in between, and so has read it. A NaN row votes no, where the
reduction's NaN maximum skipped the block whatever the other rows held.
"""

from __future__ import annotations

import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, memref, nvvm, vector

# f32 words of a warpgroup's reduction scratch: a row vector of the wgmma
# layout needs 4 warps x 1 word per step; 128 (512 bytes) is Mosaic's own
# default allowance.
SCRATCH_WORDS = 128
# `warpgroup_any`'s words: a word per warp, two halves (parity 0 and 1).
ANY_WORDS = 8
WARPS = 4
# f32 words `warpgroup_column_reduce` takes per 8 columns of the tile (each
# of a warp's 32 lanes stores its 2 columns: 4 warps x 32 x 2).
COLUMN_WORDS = 256


def column_scratch_words(cols: int) -> int:
  """A column reduction's scratch: one round of barriers up to 32 columns,
  then rounds of 32."""
  return COLUMN_WORDS * min(cols // 8, 4)


def _reduce(op):
  """x.reduce(op) over axis 0 through the given scratch, as inline Mosaic
  (`warpgroup_max`, `warpgroup_column_reduce`)."""
  def reduce(ctx, x, scratch):
    del ctx
    return x.reduce(op, 0, scratch=scratch)
  return reduce


def warpgroup_max(x, scratch, *, interpret: bool):
  """max over the rows of a warpgroup's row vector, uniform over it.

  Args:
    x: f32 [rows] in the wgmma row layout (`plgpu.Layout.WGMMA.reduce(1)`).
    scratch: this warpgroup's f32 [SCRATCH_WORDS] shared-memory ref.
    interpret: Pallas' interpret mode, which runs no inline Mosaic (nor
      shares a scratch): there `x.max()`.

  Returns:
    f32 scalar.
  """
  if interpret:
    return x.max()
  return plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA.reduce(1), plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct(
          (), jnp.float32, layout=plgpu.Layout.WG_SPLAT(())),
  )(_reduce("max"))(x, scratch)


def warpgroup_column_reduce(x, op, scratch, *, interpret: bool):
  """max or sum over the rows of a warpgroup's tile, per column, held by
  every warp (as `warpgroup_max`, through a scratch of the warpgroup's
  own so that warpgroups reduce concurrently).

  Args:
    x: f32 [m, n] in the wgmma layout (m a multiple of 64, n of 8).
    op: "max" or "add".
    scratch: this warpgroup's f32 [column_scratch_words(n)] shared-memory
      ref.
    interpret: Pallas' interpret mode: there a plain reduction.

  Returns:
    f32 [n] in `plgpu.Layout.WGMMA.reduce(0)`.
  """
  if op not in ("max", "add"):
    raise ValueError(f"`op` must be 'max' or 'add', got {op!r}.")
  if interpret:
    return x.max(axis=0) if op == "max" else x.sum(axis=0)
  return plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct(
          (x.shape[1],), jnp.float32, layout=plgpu.Layout.WGMMA.reduce(0)),
  )(_reduce(op))(x, scratch)


def _any_positive(ctx, hit, scratch):
  """1.0 where some element of the row vector `hit` is > 0.5, else 0.0,
  as a splat uniform over the warpgroup; scratch: f32 [WARPS], this vote's
  half."""
  del ctx
  f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
  index = ir.IndexType.get()
  mine = None     # this thread's rows, folded
  for reg in hit.registers.flat:
    for i in range(ir.VectorType(reg.type).shape[0]):
      x = vector.extract(reg, dynamic_position=[],
                         static_position=ir.DenseI64ArrayAttr.get([i]))
      mine = x if mine is None else arith.maximumf(mine, x)
  warp_hit = nvvm.vote_sync(
      mgpu_utils.c(0xFFFFFFFF, i32),
      arith.cmpf(arith.CmpFPredicate.OGT, mine, mgpu_utils.c(0.5, f32)),
      "any")
  word = arith.select(warp_hit, mgpu_utils.c(1.0, f32),
                      mgpu_utils.c(0.0, f32))
  warp = arith.remui(mgpu_utils.warp_idx(), mgpu_utils.c(WARPS, i32))
  # Every lane of a warp writes the same word to the same address.
  memref.store(word, scratch, [arith.index_cast(index, warp)])
  mgpu_utils.warpgroup_barrier()
  out = None
  for w in range(WARPS):
    x = memref.load(scratch, [mgpu_utils.c(w, index)])
    out = x if out is None else arith.maximumf(out, x)
  return mgpu.FragmentedArray.splat(out, ())


def warpgroup_any(x, threshold, scratch, parity, *, interpret: bool):
  """Whether some row of `x` reaches `threshold`, uniform over the
  warpgroup, with one barrier (see the module docstring).

  Args:
    x: f32 [rows] in the wgmma row layout.
    threshold: f32 scalar.
    scratch: this warpgroup's f32 [>= ANY_WORDS] shared-memory ref.
    parity: int32 scalar that alternates between consecutive votes of the
      warpgroup (e.g. the vote count % 2).
    interpret: Pallas' interpret mode, which runs no inline Mosaic: there
      a plain max over the rows.

  Returns:
    bool scalar.
  """
  hit = jnp.where(x >= threshold, 1.0, 0.0)
  if interpret:
    return hit.max() > 0.5
  words = scratch.at[pl.ds(parity * WARPS, WARPS)]
  return plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA.reduce(1), plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct(
          (), jnp.float32, layout=plgpu.Layout.WG_SPLAT(())),
  )(_any_positive)(hit, words) > 0.5
