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
"""

from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

# f32 words of a warpgroup's reduction scratch: a row vector of the wgmma
# layout needs 4 warps x 1 word per step; 128 (512 bytes) is Mosaic's own
# default allowance.
SCRATCH_WORDS = 128


def _reduce_max(ctx, x, scratch):
  del ctx
  return x.reduce("max", 0, scratch=scratch)


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
  )(_reduce_max)(x, scratch)
