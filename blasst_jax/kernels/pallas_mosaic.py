"""Hopper skip-softmax prefill kernel (Pallas Mosaic GPU), FA3 style.

`bj.attention` runs it by default on Hopper GPUs for bf16/f16 and head_dim
64/128/256 (`implementation="pallas_mosaic"`). With `interpret=` it runs on
CPU in Pallas' GPU interpret mode, which simulates the warpgroups, TMA and
barriers and detects shared-memory races (tests/test_mosaic_interpret.py).

Each program owns two (or three: `MosaicConfig.compute_wgs`) q tiles of
`block_q` rows, one per compute warpgroup, and one more (memory) warpgroup
that streams K and V blocks into shared-memory rings with TMA (V:
`num_stages` slots; K, read for every block: up to `MAX_EXTRA_K_STAGES`
more). The compute warpgroups take turns on the tensor cores, as in
FlashAttention-3, so that one's softmax runs under the others' wgmma. The
skip build (`overlapped_loop`) takes one turn per block: it issues q·kᵀ of
the next block and P·V of this one, passes the turn to the next warpgroup,
and decides on and exponentiates the next block while the products run.
The dense build runs the same loop without the vote, its softmax under a
branch that is never taken (`MosaicConfig.overlap_dense`, the default; with
it off, two warpgroups take two turns a block in `pingpong_loop`: q·kᵀ,
then softmax and P·V).

Skip rule per compute warpgroup and KV block (log2 units, scale folded in):

    m_blk = rowmax(q·kᵀ) * scale
    skip  = (not the tile's first visited block)
            and max_rows(m_blk - m_prev) < log2(λ)

A skipped block does no exponentials, no row sum and no P·V wgmma. By
default the memory warpgroup streams every V block, as the dense build does:
on the H200 the L2 stream is not what limits the kernel
(docs/prefill_h200.md). The decision is one warpgroup-wide vote a block
(`mosaic_vote.warpgroup_any`: a warp vote, one shared word a warp and one
barrier); it is what the skip build at λ = 0 pays over the dense build.
`MosaicConfig(copy_v_if_kept=True)` instead skips the V copy in a run of
skipped blocks: each compute warpgroup publishes its decision (one shared
word, and an arrival on its vote barrier) as soon as it is made. The memory
warpgroup runs ahead on K; it copies block j's V as soon as the slot is
free when a tile kept block j - 1 (kept blocks come in runs, and their V
must not wait on a vote), and otherwise only after the votes on block j,
once one keeps it. When none does it arrives on V's barrier without a
copy, so every V phase still completes once per block; a warpgroup that
skipped observes that phase later (`release_v`, `settle`) instead of
waiting for the other tile's vote. It reads 37-52 % fewer bytes from L2
at 82-97 % skipped but trails streaming by up to 6 % (its copies wait on
votes). Either way the skipping warpgroup still takes its turns, so the
pipeline stays in step. (`overlap_qk=False` builds the two-turn skip
pipeline, for comparison.)

`initial_max` (chained parts, context parallelism) starts each row's running
max from a given value, as the oracle does, and the final max is returned.

Padding: q rows are padded by repeating the last real row (and, under the
causal mask, its position), so padded rows repeat a real row's gap and never
change a decision; keys past `kv_len` are masked in the last blocks.

Block masks: each compute warpgroup's tile has its own ascending list of
the blocks it visits (`block_lists`); the memory warpgroup streams the union
of the tiles' lists (`program_lists`). At a union position whose block is not
in its own list a compute warpgroup computes and counts nothing, but waits
on and releases the slots and takes its turns as for a skipped block.

Clusters (`MosaicConfig.cluster_q=2`): two programs of adjacent q ranges
stream the same blocks (the longer range; the shorter program's tiles pass
the rest as above). Each memory warpgroup issues every copy, which fetches
its half of the block and multicasts it, so both receive the whole block
and L2 serves it once; the K and V slot releases are cluster barriers that
count the compute warpgroups of both programs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from blasst_jax import reference
from blasst_jax.kernels import block_lists as lists_lib
from blasst_jax.kernels import mosaic_vote
from blasst_jax.kernels import tiles

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Compute warpgroups per program, a q tile each: two, or three (192 rows,
# FlashAttention-3's tile at head_dim 64) where a tile's registers fit.
COMPUTE_WGS_CHOICES = (2, 3)
# 32 words = 128 bytes: the alignment TMA needs for shared-memory slots.
SLOT = 32


DEFAULT_BLOCK_Q = 64
# Shared memory per block on H100/H200 (227 KiB).
MAX_SHARED_MEMORY = 232448
# A program's block list (`program_lists`), int32: [n_union, n_unmasked of
# tile 0, of tile 1, (of tile 2 or 0), entries...]; entry u = block id <<
# compute_wgs | bit t set where the block is in tile t's list.
LIST_HEADER = 4


def default_compute_wgs(head_dim: int, guarded_softmax: bool = True) -> int:
  """Compute warpgroups per program by default (see `MosaicConfig`): three
  at head_dim 64, where a tile fits in 160 registers per thread and two
  warpgroups' products cover each one's softmax, for the builds whose
  softmax sits under a branch (the skip build, and the dense build of
  `overlap_dense`): on the H200 (GQA 9/3, 8k causal) the dense build of
  three ran at 3.16-3.20 ms against 3.32-3.47 ms for the ping-pong of two,
  and the skip build at 73 % skipped at 2.23 against 2.72 ms
  (docs/prefill_h200.md). Two elsewhere: a dense build of three without
  the branch ran slower than the ping-pong of two, and at larger head_dims
  a tile's accumulators need more registers than three can have."""
  return 3 if head_dim == 64 and guarded_softmax else 2


def default_block_kv(head_dim: int) -> int:
  return 64 if head_dim > 128 else 128


# 2**f on [-1/2, 1/2]: a cubic fitted to the relative error (< 7.5e-5).
EXP2_CUBIC = (0.99992807, 0.69326099, 0.24261115, 0.05517167)
# 1.5 * 2**23: x + ROUNDING_SHIFT rounds x to an integer held in the low
# mantissa bits.
ROUNDING_SHIFT = 12582912.0


def exp2_on_fma(x, fence: bool = True):
  """2**x of f32 x <= 0 (-inf included) without the exp unit: x = j + f
  with j = round(x), 2**f by `EXP2_CUBIC`, j added to the exponent bits.
  Adds, multiplies and integer ops only, which issue on the FMA and
  integer pipes while the MUFU unit, at 16 exponentials a cycle per SM,
  works on the rest of the tile (FlashAttention-4's split). Relative error
  below 1e-4; exactly 0 from -126 down (2**-126: nothing next to a row
  max of 2**0), and for NaN. fence: keep XLA from folding (x + c) - c to
  x, as its simplifier does under jit; Mosaic's lowering keeps the two
  adds as written, so the compiled kernel passes False."""
  xc = jnp.maximum(x, -127.0)
  shifted = xc + ROUNDING_SHIFT
  if fence:
    shifted = lax.optimization_barrier(shifted)
  f = xc - (shifted - ROUNDING_SHIFT)                     # [-1/2, 1/2]
  c0, c1, c2, c3 = EXP2_CUBIC
  frac = c0 + f * (c1 + f * (c2 + f * c3))
  bits = (lax.bitcast_convert_type(frac, jnp.int32)
          + (lax.bitcast_convert_type(shifted, jnp.int32) << 23))
  return jnp.where(x > -126.0, lax.bitcast_convert_type(bits, jnp.float32),
                   0.0)


def exp2_split(x, fma_cols: int, fence: bool = True):
  """2**x of a score tile x [rows, cols] (f32, <= 0): the last `fma_cols`
  columns by `exp2_on_fma`, the rest on the exp unit. Column slices of
  the wgmma layout are whole register groups: no data moves. fence: as
  for `exp2_on_fma`."""
  if not fma_cols:
    return jnp.exp2(x)
  rows, cols = x.shape
  split = cols - fma_cols
  emulated = exp2_on_fma(lax.slice(x, (0, split), (rows, cols)), fence)
  if not split:
    return emulated
  return jnp.concatenate(
      [jnp.exp2(lax.slice(x, (0, 0), (rows, split))), emulated], axis=1)


def list_width(n_kv_blocks: int) -> int:
  """int32 words of a program's block list (whole 128-byte TMA slots)."""
  return -(-(LIST_HEADER + n_kv_blocks) // SLOT) * SLOT


def shared_memory_bytes(block_q, block_kv, head_dim, num_stages,
                        n_listed_blocks=0, n_recorded_blocks=0,
                        k_stages=None, compute_wgs=2) -> int:
  """q/o tiles of the compute warpgroups + the K/V ring + small buffers.

  The small buffers (lse, scalars, barriers) and their 1 KiB alignment took
  5.3 KiB in a measured build; 8 KiB is reserved for them and the optional
  ones (the V votes, the vote scratch: 512 bytes a compute warpgroup, the
  chained row max). With a block
  mask of `n_listed_blocks` KV blocks the program's block list is added,
  and with `n_recorded_blocks` the skip words of every tile
  (`return_skip_mask`). `k_stages` (default `num_stages`) is the K ring's
  depth, `num_stages` the V ring's.
  """
  k_stages = num_stages if k_stages is None else k_stages
  tiles = (compute_wgs * block_q + (num_stages + k_stages) * block_kv
           ) * head_dim * 2
  lists = 4 * list_width(n_listed_blocks) if n_listed_blocks else 0
  skips = (4 * compute_wgs * list_width(n_recorded_blocks)
           if n_recorded_blocks else 0)
  return tiles + lists + skips + 8192


@functools.partial(jax.jit,
                   static_argnames=("q_len", "block_q", "block_kv", "causal",
                                    "compute_wgs"))
def program_lists(block_mask, kv_lengths, *, q_len, block_q, block_kv,
                  causal, compute_wgs=2):
  """The blocks each program streams: the union of its tiles' lists.

  The union is ascending. The blocks no causal or length mask touches for a
  tile lie below a bound, so they are a prefix of the union; the header
  gives its length per tile (no element masking there).

  Args:
    block_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks].
    kv_lengths: int32 [batch].

  Returns:
    int32 [batch, q_heads, n_programs, list_width(n_kv_blocks)], laid out
    as `LIST_HEADER` says.
  """
  b, hq, nq, nk = block_mask.shape
  n_prog = -(-nq // compute_wgs)
  visit = lists_lib.walked_blocks(block_mask, kv_lengths, q_len=q_len,
                                  block_q=block_q, block_kv=block_kv,
                                  causal=causal)
  entries, n_union, visit = lists_lib.pair_union(visit, compute_wgs)
  union = jnp.any(visit, axis=3)                           # [b, hq, np, nk]
  full = lists_lib.unmasked_blocks(kv_lengths, n_prog * compute_wgs, nk,
                                   block_q=block_q, block_kv=block_kv,
                                   causal=causal)
  full = jnp.broadcast_to(full, (b, 1, n_prog * compute_wgs, nk)).reshape(
      b, 1, n_prog, compute_wgs, nk)
  n_unmasked = jnp.sum(union[:, :, :, None] & full, axis=-1,
                       dtype=jnp.int32)                    # [b, hq, np, C]
  return pack_lists([n_union[..., None], n_unmasked], entries)


def pack_lists(header_words, entries):
  """int32 [..., list_width(n)]: the header words (a list of [..., k]
  arrays, zero-filled to LIST_HEADER), the n entries, zeros."""
  header = jnp.concatenate(header_words, axis=-1)
  n = entries.shape[-1]
  lead = entries.shape[:-1]
  return jnp.concatenate(
      [header, jnp.zeros(lead + (LIST_HEADER - header.shape[-1],), jnp.int32),
       entries, jnp.zeros(lead + (list_width(n) - LIST_HEADER - n,),
                          jnp.int32)], axis=-1)


MAX_EXTRA_K_STAGES = 2
CLUSTER_AXIS = "cluster_q"   # programs of a cluster (`MosaicConfig.cluster_q`)


def launch_grid(raster: str, heads: int, n_programs: int, batch: int,
                cluster_q: int) -> dict:
  """`plgpu.kernel`'s grid arguments: axes (heads, q_seq, batch), or
  (q_seq, heads, batch) with raster "q" (the last runs fastest). q_seq counts
  clusters; with `cluster_q` > 1 a cluster's programs lie along it."""
  names = ("heads", "q_seq", "batch")
  sizes = (heads, n_programs // cluster_q, batch)
  order = (1, 0, 2) if raster == "q" else (0, 1, 2)
  grid = dict(grid=tuple(sizes[i] for i in order),
              grid_names=tuple(names[i] for i in order))
  if cluster_q == 1:
    return grid
  return dict(grid,
              cluster=tuple(cluster_q if names[i] == "q_seq" else 1
                            for i in order),
              cluster_names=tuple(CLUSTER_AXIS if names[i] == "q_seq"
                                  else f"cluster_{names[i]}" for i in order))


def k_ring_depth(config, block_q, block_kv, head_dim, n_listed_blocks=0,
                 n_recorded_blocks=0) -> int:
  """K ring slots: num_stages + extra_k_stages, or with extra_k_stages None
  as many extra (<= MAX_EXTRA_K_STAGES) as fit in shared memory."""
  if config.extra_k_stages is not None:
    return config.num_stages + config.extra_k_stages
  depth = config.num_stages
  wgs = config.resolved(head_dim).compute_wgs
  while depth < config.num_stages + MAX_EXTRA_K_STAGES and shared_memory_bytes(
      block_q, block_kv, head_dim, config.num_stages, n_listed_blocks,
      n_recorded_blocks, k_stages=depth + 1,
      compute_wgs=wgs) <= MAX_SHARED_MEMORY:
    depth += 1
  return depth


# Registers per thread the memory warpgroup keeps (setmaxnreg).
MEMORY_REGISTERS = 40
_REGISTER_FILE = 65536   # 32-bit registers per SM


def register_budget(compute_wgs: int) -> int:
  """Registers per thread that setmaxnreg can share out among a program's
  warpgroups: each starts with the launch's share of the register file,
  whole multiples of 8 (504 for three warpgroups, 512 for four), and
  asking for more than that waits forever."""
  wgs = compute_wgs + 1
  return wgs * (_REGISTER_FILE // (128 * wgs) // 8 * 8)


def most_compute_registers(memory_registers: int, compute_wgs: int) -> int:
  """The most registers each compute warpgroup may ask for next to a
  memory warpgroup of `memory_registers` (a multiple of 8)."""
  return (register_budget(compute_wgs) - memory_registers
          ) // compute_wgs // 8 * 8


# setmaxnreg's split by compute warpgroups: (compute, memory) registers.
REGISTERS = {2: (232, MEMORY_REGISTERS), 3: (160, 32)}


def check_pipeline_knobs(num_stages, compute_registers,
                         memory_registers=MEMORY_REGISTERS,
                         compute_wgs=2) -> None:
  """ValueError unless the ring depth and register split can run: an
  over-committed register file makes setmaxnreg wait forever."""
  if not isinstance(num_stages, int) or num_stages < 2:
    raise ValueError(f"`num_stages` must be an int >= 2, got {num_stages!r}.")
  if (not isinstance(memory_registers, int) or memory_registers % 8
      or not 24 <= memory_registers <= 256):
    raise ValueError(f"`memory_registers` must be a multiple of 8 in "
                     f"[24, 256], got {memory_registers!r}.")
  most = most_compute_registers(memory_registers, compute_wgs)
  if (not isinstance(compute_registers, int) or compute_registers % 8
      or not 24 <= compute_registers <= most):
    raise ValueError(
        f"`compute_registers` must be a multiple of 8 in [24, {most}] "
        f"({compute_wgs} compute warpgroups and a memory warpgroup of "
        f"{memory_registers} share {register_budget(compute_wgs)} "
        f"registers a thread), got "
        f"{compute_registers!r}.")


def check_exp2_fma_cols(config, block_kv: int) -> None:
  """ValueError unless `config.exp2_fma_cols` fits in a score tile."""
  if config.exp2_fma_cols > block_kv:
    raise ValueError(
        f"`exp2_fma_cols`={config.exp2_fma_cols} exceeds block_kv="
        f"{block_kv}: emulate at most a score tile's {block_kv} columns.")


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Speed knobs of the Mosaic kernel (no effect on results).

  Attributes:
    num_stages: V shared-memory ring depth (>= 2), and K's by default.
    extra_k_stages: K ring slots beyond `num_stages` (K is read for every
      block, V only for kept ones, so skipping blocks runs through K
      faster); None: as many as fit in shared memory, at most
      `MAX_EXTRA_K_STAGES`.
    compute_wgs: compute warpgroups per program, a q tile of `block_q`
      rows each: 2, or 3 (the products of two cover each one's softmax and
      decision; registers allow it at head_dim 64 only); None:
      `default_compute_wgs(head_dim, skip_enabled or overlap_dense)`
      with `overlap_qk`, else 2. Three need `overlap_qk`: their dense build
      runs the overlapped loop too.
    compute_registers: registers per thread granted to compute warpgroups
      (a multiple of 8; None: `REGISTERS[compute_wgs]`, 232 for two, 160
      for three, or the most `memory_registers` leave).
    memory_registers: registers per thread the memory warpgroup keeps
      (None: `REGISTERS[compute_wgs]`, 40 for two, 32 for three).
    exp2_fma_cols: columns of each block_q x block_kv score tile whose
      exponentials run on the FMA pipe (`exp2_on_fma`) instead of the
      exp unit: a multiple of 8, at most block_kv. At head_dim 64 a
      block's exponentials take the exp unit as long as its products take
      the tensor cores; moving some off balances the two.
    copy_v_if_kept: in the skip build, copy a V block only when a compute
      warpgroup keeps it (False, the default: stream every V block, as the
      dense build). Gating saves L2 traffic but its copies wait on votes:
      on the H200 it ran up to 6 % slower at λ = 0 and 0.5-6 % slower at
      49-74 % skipped (head_dim 64 and 128, 8k-32k); at 64k it was up to
      8 % faster (docs/prefill_h200.md).
    overlap_qk: one tensor-core turn per block in the skip build (and in
      the dense build of `overlap_dense` or of three warpgroups), q·kᵀ of
      the next block issued with P·V of this one (False: the two-turn
      ping-pong, q·kᵀ then softmax and P·V).
    overlap_dense: with `overlap_qk`, run the dense build on the
      overlapped loop too (three warpgroups at head_dim 64), its softmax
      under a branch on a value the compiler cannot know (a parameter
      word that is always 0), as the skip build's is under its decision.
      On the H200 it ran 5-6 % faster than the two-turn ping-pong at
      head_dim 128 (8k-32k) and 5-8 % at head_dim 64 with three
      warpgroups; built without the branch, that loop ran 1.3-1.8x
      slower (False: the two-turn ping-pong of two warpgroups; a dense
      build of three then overlaps without the branch).
    cluster_q: programs per cluster along q, 1 or 2. With 2, the two
      programs of adjacent q ranges of a (batch, head) share every K and V
      copy: each fetches half a block by TMA multicast and both receive all
      of it, which halves the blocks read from L2; a slot is refilled once
      the compute warpgroups of both have released it (cluster barriers).
      It streams every V block (`copy_v_if_kept=False`) and takes no block
      mask.
    one_barrier_vote: the skip rule's warpgroup vote by `vote.any` and one
      barrier (`mosaic_vote.warpgroup_any`), 2-3 % faster on the H200
      than False: a max reduction over the warpgroup, two barriers.
    raster: which grid axis varies slowest (the grid's first; its last,
      the batch, runs fastest, as CUDA's x): "heads" (the default:
      programs of one head over its q ranges run side by side and share
      its K/V in L2) or "q" (programs of one q range over all heads).
    trace_dir, trace_events: with both set, every warpgroup records the
      clock at the start and end of the kernel's named regions (waits on
      each barrier, the vote, the softmax, ...), at most `trace_events`
      regions per warpgroup, and the kernel writes a Perfetto trace into
      `trace_dir` (`experiments/profile_mosaic.py --trace` sums it). The
      buffer takes 16 bytes of shared memory per event and warpgroup.
  """

  num_stages: int = 2
  compute_registers: int | None = None
  copy_v_if_kept: bool = False
  overlap_qk: bool = True
  overlap_dense: bool = True
  cluster_q: int = 1
  one_barrier_vote: bool = True
  extra_k_stages: int | None = None
  raster: str = "heads"
  trace_dir: str = ""
  trace_events: int = 0
  compute_wgs: int | None = None
  memory_registers: int | None = None
  exp2_fma_cols: int = 0

  def __post_init__(self):
    if self.compute_wgs is not None and (
        isinstance(self.compute_wgs, bool)
        or not isinstance(self.compute_wgs, int)
        or self.compute_wgs not in COMPUTE_WGS_CHOICES):
      raise ValueError(f"`compute_wgs` must be None, 2 or 3, got "
                       f"{self.compute_wgs!r}.")
    if (isinstance(self.cluster_q, bool) or not isinstance(self.cluster_q, int)
        or self.cluster_q not in (1, 2)):
      raise ValueError(f"`cluster_q` must be 1 or 2, got {self.cluster_q!r}.")
    if self.cluster_q > 1 and self.copy_v_if_kept:
      raise ValueError("`cluster_q=2` streams every V block to both programs; "
                       "set copy_v_if_kept=False (the default).")
    if self.compute_wgs == 3 and not self.overlap_qk:
      raise ValueError("`compute_wgs=3` runs the overlapped pipeline only; "
                       "set overlap_qk=True or compute_wgs=2.")
    self._registers(self.compute_wgs or 2)
    if (not isinstance(self.exp2_fma_cols, int)
        or isinstance(self.exp2_fma_cols, bool)
        or self.exp2_fma_cols < 0 or self.exp2_fma_cols % 8):
      raise ValueError(f"`exp2_fma_cols` must be a multiple of 8 >= 0, got "
                       f"{self.exp2_fma_cols!r}.")
    if self.extra_k_stages is not None and (
        not isinstance(self.extra_k_stages, int) or self.extra_k_stages < 0):
      raise ValueError(f"`extra_k_stages` must be None or an int >= 0, got "
                       f"{self.extra_k_stages!r}.")
    if self.raster not in ("heads", "q"):
      raise ValueError(f"`raster` must be 'heads' or 'q', got "
                       f"{self.raster!r}.")
    if bool(self.trace_dir) != bool(self.trace_events) or (
        not isinstance(self.trace_events, int) or self.trace_events < 0):
      raise ValueError("`trace_dir` and `trace_events` (an int > 0) are set "
                       f"together or not at all, got {self.trace_dir!r} and "
                       f"{self.trace_events!r}.")
    for name in ("copy_v_if_kept", "overlap_qk", "overlap_dense",
                 "one_barrier_vote"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"`{name}` must be a bool, got "
                         f"{getattr(self, name)!r}.")

  def resolved(self, head_dim: int, skip_enabled: bool = True
               ) -> MosaicConfig:
    """This config with `compute_wgs` and the registers filled in for
    `head_dim` and the build (ValueError where the registers then
    over-commit)."""
    wgs = self.compute_wgs
    if wgs is None:
      wgs = (default_compute_wgs(head_dim, skip_enabled or self.overlap_dense)
             if self.overlap_qk else 2)
    compute, memory = self._registers(wgs)
    return dataclasses.replace(self, compute_wgs=wgs,
                               compute_registers=compute,
                               memory_registers=memory)

  def _registers(self, wgs: int) -> tuple[int, int]:
    """(compute, memory) registers for `wgs` compute warpgroups, checked."""
    memory = self.memory_registers
    if memory is None:
      memory = REGISTERS[wgs][1]
    compute = self.compute_registers
    if compute is None:
      compute = min(REGISTERS[wgs][0], most_compute_registers(memory, wgs))
    check_pipeline_knobs(self.num_stages, compute, memory, wgs)
    return compute, memory


class _Refs(NamedTuple):
  """The kernel's global-memory operands; None where a feature is off."""
  q: Any            # [batch, padded q_len, q_heads, d]
  k: Any            # [batch, padded kv_len, kv_heads, d]
  v: Any
  v_tail: Any       # [batch, block_kv, kv_heads, d] the V block holding kv_len,
                    # zero past it (P·V would turn NaN there into NaN rows)
  params: Any       # f32 [batch, SLOT]: kv_len, log2(λ), 0...
  lists: Any        # int32 [batch, q_heads, n_programs, rows, SLOT]
  initial_max: Any  # f32 [batch, q_heads, padded q_len], log2 units
  out: Any          # [batch, padded q_len, q_heads, d]
  lse: Any          # f32 [batch, q_heads, padded q_len]
  stats: Any        # int32 [batch, q_heads, n_tiles, SLOT]: skipped, visited
  skips: Any        # int32 [batch, q_heads, n_tiles, rows, SLOT]: 1 = skipped
  row_max: Any      # f32 [batch, q_heads, padded q_len]: the final max


class _Scratch(NamedTuple):
  """Shared memory of one program (C compute warpgroups); None where off."""
  qo: Any           # [C, block_q, d] q tiles, then the output tiles
  k: Any            # [k_stages, block_kv, d] K ring
  v: Any            # [num_stages, block_kv, d] V ring
  lse: Any          # f32 [C, block_q]
  stats: Any        # int32 [C, SLOT]
  params: Any       # f32 [C + 1, SLOT] one copy per warpgroup
  p: Any            # interpret mode: [C, block_q, block_kv] P through memory
  skips: Any        # int32 [C, rows, SLOT] a word per KV block, 1 = skipped
  lists: Any        # int32 [rows, SLOT] this program's `program_lists` row
  votes: Any        # int32 [k_stages, SLOT]: word wg of a K slot's row is 1
                    # where warpgroup wg keeps the block in that slot
  rows: Any         # f32 [C, block_q] initial max in, final max out
  vote_scratch: Any  # f32 [C, mosaic_vote.SCRATCH_WORDS] each warpgroup's
                     # own scratch for its votes (`mosaic_vote`)


class _Barriers(NamedTuple):
  k: Any            # [k_stages] K copied
  v: Any            # [num_stages] V copied (or an empty arrival: no copy)
  q: Any            # [C]
  params: Any       # [C + 1]
  k_free: Any       # [k_stages] every tile is done with a K slot
  v_free: Any       # [num_stages]
  sched: Any        # tensor-core turns: a token per warpgroup (overlapped
                    # loop), or one barrier all arrive at (two-turn loop)
  lists: Any
  votes: Any        # [C * k_stages]
  rows: Any         # [C]


def _kernel(io: _Refs, sc: _Scratch, bars: _Barriers, *, sm_scale, block_q,
            block_kv, head_dim, dtype, causal, q_len, group, num_stages,
            k_stages, compute_wgs, compute_registers, memory_registers,
            exp2_fma_cols, skip_enabled, overlap, guard_softmax, cluster_q,
            one_barrier_vote, interpret):
  # K slots: position % k_stages; V slots: position % num_stages. Optional
  # features are on where their buffers are: block lists (sc.lists), the
  # skip record (sc.skips), votes on V copies (sc.votes), a chained running
  # max (sc.rows), P through shared memory in interpret mode (sc.p).
  batch = lax.axis_index("batch")
  q_head = lax.axis_index("heads")
  cluster = lax.axis_index("q_seq")   # a cluster of cluster_q programs
  program = cluster if cluster_q == 1 else (
      cluster * cluster_q + lax.axis_index(CLUSTER_AXIS))
  wg = lax.axis_index("wg")

  def schedule_turn():
    plgpu.barrier_arrive(bars.sched)
    plgpu.barrier_wait(bars.sched)

  def slot_of(pos):   # V slot
    return lax.rem(pos, jnp.array(num_stages, pos.dtype))

  def k_slot(pos):
    return lax.rem(pos, jnp.array(k_stages, pos.dtype))

  # Per-sequence scalars [kv_len, log2(λ), 0...]: one TMA per warpgroup into
  # its own 128-byte slot (TMA needs 128-byte aligned shared memory).
  my_params = sc.params.at[wg]
  plgpu.copy_gmem_to_smem(io.params.at[batch], my_params, bars.params.at[wg])
  plgpu.barrier_wait(bars.params.at[wg])
  kv_len = my_params[0].astype(jnp.int32)
  log2_thr = my_params[1]
  # Always false (the word is 0), but unknown to the compiler: the dense
  # build of `overlap_dense` puts its softmax in a branch on it.
  never = my_params[2] != 0.0
  scale = sm_scale * LOG2E

  C = compute_wgs  # pylint: disable=invalid-name
  program_base = program * (C * block_q)
  kv_blocks = lax.div(kv_len + block_kv - 1, block_kv)

  def steps_for(q_base):
    """KV blocks a tile starting at `q_base` must visit."""
    if not causal:
      return kv_blocks
    last_row = jnp.minimum(q_base + block_q, q_len) - 1
    return jnp.minimum(kv_blocks, lax.div(last_row, block_kv) + 1)

  # The memory warpgroup streams `n_stream` blocks, block_at(pos) at stream
  # position pos: the longest of the tiles' ranges, or the union of their
  # block lists.
  if sc.lists is None:
    # The cluster's programs stream the same blocks (each copy lands in
    # all of them): the longest range of all their tiles.
    cluster_base = cluster * (cluster_q * C * block_q)
    n_stream = functools.reduce(
        jnp.maximum, [steps_for(cluster_base + t * block_q)
                      for t in range(cluster_q * C)])
    block_at = lambda pos: pos  # pylint: disable=g-long-lambda
  else:
    @pl.when(wg == C)
    def _():
      plgpu.copy_gmem_to_smem(io.lists.at[batch, q_head, program], sc.lists,
                              bars.lists)

    plgpu.barrier_wait(bars.lists)
    def word(i):  # The list is [rows, SLOT]: TMA boxes hold <= 256 per dim.
      return sc.lists[i // SLOT, i % SLOT]

    n_stream = word(0)

    def block_at(pos):
      return word(LIST_HEADER + pos) >> C

  @pl.when(wg < C)
  def _compute():
    plgpu.set_max_registers(compute_registers, action="increase")
    qo_smem = sc.qo.at[wg]
    q_base = program_base + wg * block_q
    next_wg = jnp.where(wg == C - 1, 0, wg + 1)   # the turn ring
    if sc.lists is None:
      # Positions [0, n_full): blocks no mask touches for any row of this
      # tile; [n_full, n_steps): masked; [n_steps, n_stream): the other
      # tile's only.
      n_steps = steps_for(q_base)
      n_full = lax.div(kv_len, block_kv)
      if causal:
        first_row = jnp.minimum(q_base, q_len - 1)
        n_full = jnp.minimum(n_full, lax.div(first_row + 1, block_kv))
      n_full = jnp.minimum(n_full, n_steps)
      in_my_list = None
    else:
      # Every union position; those before n_full need no masking here.
      n_steps = n_stream
      n_full = word(1 + wg)

      def in_my_list(pos):
        return ((word(LIST_HEADER + pos) >> wg) & 1) == 1

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    if sc.rows is None:
      m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                              row_layout)
      seen_before = False
    else:
      plgpu.copy_gmem_to_smem(
          io.initial_max.at[batch, q_head, pl.ds(q_base, block_q)],
          sc.rows.at[wg], bars.rows.at[wg])
      plgpu.barrier_wait(bars.rows.at[wg])
      m_i = plgpu.load(sc.rows.at[wg], layout=row_layout, optimized=False)
      # A row with a finite start has seen a block: the first may be skipped.
      seen_before = mosaic_vote.warpgroup_max(
          m_i, sc.vote_scratch.at[wg], interpret=interpret) > -jnp.inf

    plgpu.copy_gmem_to_smem(
        io.q.at[batch, pl.ds(q_base, block_q), q_head], qo_smem,
        bars.q.at[wg])
    plgpu.barrier_wait(bars.q.at[wg])

    l_i = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32),
                            row_layout)
    acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32),
                            plgpu.Layout.WGMMA)

    def any_kept_row(m_blk, m_prev, n_visited):
      """Whether some row's gap m_blk - m_prev reaches log2(λ) (rows
      with no visible key have none); the warpgroup's n_visited-th vote."""
      gap = jnp.where(m_blk > -jnp.inf, m_blk - m_prev, -jnp.inf)
      if not one_barrier_vote:
        return mosaic_vote.warpgroup_max(
            gap, sc.vote_scratch.at[wg], interpret=interpret) >= log2_thr
      return mosaic_vote.warpgroup_any(
          gap, log2_thr, sc.vote_scratch.at[wg], lax.rem(n_visited, 2),
          interpret=interpret)

    def mask_scores(s, pos):
      """s [block_q, block_kv] with keys past kv_len (and, causal, after
      the row's position) at -inf, for the block at stream position pos."""
      rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0,
                                    layout=plgpu.Layout.WGMMA)
      cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                    layout=plgpu.Layout.WGMMA)
      keys = cols + block_at(pos) * block_kv
      visible = keys < kv_len
      if causal:  # Padded rows sit at the last real row's position.
        visible = visible & (jnp.minimum(rows + q_base, q_len - 1) >= keys)
      return jnp.where(visible, s, -jnp.inf)

    def wait_k(pos):
      """Waits for the K block at stream position `pos`, if one comes."""
      @pl.when(pos < n_stream)
      def _():
        plgpu.barrier_wait(bars.k.at[k_slot(pos)])

    def publish(slot, keep):
      """This warpgroup's vote on the block in `slot`, for the memory
      warpgroup (which copies V once a vote keeps it)."""
      if sc.votes is not None:
        sc.votes[slot, wg] = keep.astype(jnp.int32)
        plgpu.barrier_arrive(bars.votes.at[wg * k_stages + slot])

    def settle(pos, owed):
      """Closes a skip at pos - 1: waits for that block's V phase, then
      releases its V slot. Each phase must be waited once and in order (the
      phase bit is per thread); holding the release until then keeps the
      slot's next copy, and so its next phase, from overtaking the wait.
      The phase needs at most the other tile's vote on pos - 1, which it
      cast before this warpgroup's q·kᵀ turn at pos."""
      if sc.votes is None:
        return owed

      @pl.when(owed == 1)
      def _():
        prev = slot_of(pos - 1)
        plgpu.barrier_wait(bars.v.at[prev])
        plgpu.barrier_arrive(bars.v_free.at[prev])
      return jnp.int32(0)

    def end_softmax(slot, *, needs_v=True):
      plgpu.barrier_arrive(bars.sched)                # done with softmax
      if needs_v:
        plgpu.barrier_wait(bars.v.at[slot])
      plgpu.barrier_wait(bars.sched)                  # tensor cores are ours

    def skip_v(slot):
      """A block whose V this warpgroup will not read: 1 when its V phase
      and slot release are left to `settle` at the next position."""
      if sc.votes is not None:
        return jnp.int32(1)
      plgpu.barrier_arrive(bars.v_free.at[slot])
      return jnp.int32(0)

    def pingpong_loop(acc, m_i, l_i):
      """Two tensor-core turns per block: q·kᵀ, then softmax and P·V."""
      wait_k(jnp.int32(0))
      pl.when(wg == 1)(schedule_turn)

      def visit(pos, carry, *, masked: bool):
        """A block of this tile's: the skip rule, then softmax and P·V."""
        acc, m_i, l_i, n_skipped, n_visited, owed = carry
        slot, kslot = slot_of(pos), k_slot(pos)

        def qk_product(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, sc.k.at[kslot].transpose((1, 0)))
          with jax.named_scope("turn"):
            schedule_turn()
          with jax.named_scope("wait_qk"):
            return acc_ref[...]

        s = pl.run_scoped(qk_product,
                          plgpu.ACC((block_q, block_kv), jnp.float32))
        plgpu.barrier_arrive(bars.k_free.at[kslot])         # K slot may be refilled
        if masked:
          s = mask_scores(s, pos)
        m_blk = s.max(axis=1) * scale                  # [block_q], log2 units

        @jax.named_scope("softmax")
        def keep(owed):
          m_new = jnp.maximum(m_i, m_blk)
          m_safe = (jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    if masked or sc.rows is not None else m_new)
          alpha = jnp.exp2(m_i - m_safe)
          p = exp2_split(
              s * scale - lax.broadcast_in_dim(m_safe, s.shape, [0]),
              exp2_fma_cols, fence=interpret)
          acc_scaled = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          l_new = l_i * alpha + p.sum(axis=1)
          p16 = p.astype(dtype)
          acc_scaled, l_new, m_new2, p16 = lax.optimization_barrier(
              (acc_scaled, l_new, m_new, p16))
          with jax.named_scope("turn"):
            end_softmax(slot)

          if sc.p is None:
            def pv_product(acc_ref):
              plgpu.wgmma(acc_ref, p16, sc.v.at[slot])
              with jax.named_scope("wait_k"):
                wait_k(pos + 1)

            acc_out = pl.run_state(pv_product)(plgpu.ACC.init(acc_scaled))
          else:
            # Interpret-mode variant: P goes through shared memory (the
            # interpreter has no register-operand wgmma nor run_state).
            p_smem = sc.p.at[wg]
            p_smem[...] = p16
            plgpu.commit_smem()

            def pv_product(acc_ref):
              plgpu.wgmma(acc_ref, p_smem, sc.v.at[slot])
              wait_k(pos + 1)
              return acc_ref[...]

            acc_out = acc_scaled + pl.run_scoped(
                pv_product, plgpu.ACC((block_q, head_dim), jnp.float32))
          plgpu.barrier_arrive(bars.v_free.at[slot])         # V slot may be refilled
          return acc_out, m_new2, l_new, n_skipped, n_visited + 1, owed

        if not skip_enabled:
          return keep(owed)
        skip = ((n_visited > 0) | seen_before) & ~any_kept_row(
            m_blk, m_i, n_visited)
        publish(kslot, ~skip)
        owed = settle(pos, owed)
        if sc.skips is not None:
          block = block_at(pos)
          sc.skips.at[wg][block // SLOT, block % SLOT] = skip.astype(jnp.int32)

        def drop(owed):
          end_softmax(slot, needs_v=sc.votes is None)
          wait_k(pos + 1)
          return acc, m_i, l_i, n_skipped + 1, n_visited + 1, skip_v(slot)

        return lax.cond(skip, drop, keep, owed)

      def pass_by(pos, carry):
        """A block of another tile's only: the barrier steps of a skipped
        block without its q·kᵀ, so slots are released and turns stay paired.
        Waiting on the copies too keeps every barrier phase observed."""
        owed = carry[-1]
        slot, kslot = slot_of(pos), k_slot(pos)
        publish(kslot, jnp.bool_(False))
        schedule_turn()
        owed = settle(pos, owed)
        plgpu.barrier_arrive(bars.k_free.at[kslot])
        end_softmax(slot, needs_v=sc.votes is None)
        wait_k(pos + 1)
        return carry[:-1] + (skip_v(slot),)

      def position(pos, carry, *, masked: bool):
        if in_my_list is None:
          return visit(pos, carry, masked=masked)
        return lax.cond(in_my_list(pos),
                        functools.partial(visit, pos, masked=masked),
                        functools.partial(pass_by, pos), carry)

      carry = (acc, m_i, l_i, jnp.int32(0), jnp.int32(0), jnp.int32(0))
      carry = lax.fori_loop(0, n_full, functools.partial(position, masked=False),
                            carry)
      acc, m_i, l_i, n_skipped, n_visited, owed = lax.fori_loop(
          n_full, n_steps, functools.partial(position, masked=True), carry)
      # This tile is done; keep the other warpgroups company to the end.
      (owed,) = lax.fori_loop(n_steps, n_stream, pass_by, (owed,))
      settle(n_stream, owed)

      pl.when(wg == 0)(schedule_turn)
      return acc, m_i, l_i, n_skipped, n_visited

    def overlapped_loop(acc, m_i, l_i):
      """One tensor-core turn per stream position (FlashAttention-3's
      intra-warpgroup overlap with ping-pong). At position p a warpgroup
      takes its turn, issues q·kᵀ of block p + 1 and, if it kept block p,
      P·V of p, and passes the turn to the next warpgroup (a ring); the
      decision and softmax of p + 1 then run while its P·V and the other
      warpgroups' products occupy the tensor cores. A skipped block costs
      its q·kᵀ and a decision that overlaps the other tiles' products, and
      no decision waits for another tile's. The dense build runs this loop
      without the decision (`overlap_dense`, or three warpgroups).
      """
      turn = bars.sched   # [C]: warpgroup w waits on turn[w]

      @jax.named_scope("turn")
      def take_turn():
        plgpu.barrier_wait(turn.at[wg])

      def pass_turn():
        plgpu.barrier_arrive(turn.at[next_wg])

      @jax.named_scope("release_v")
      def release_v(slot):
        """A V block this warpgroup does not read: observe its phase (the
        copy, or the empty arrival after every vote), then free its slot."""
        plgpu.barrier_wait(bars.v.at[slot])
        plgpu.barrier_arrive(bars.v_free.at[slot])

      def decide(p, s, state, *, masked: bool):
        """Skip rule and softmax of the block at position p from its scores
        s [block_q, block_kv]; state = (m, l, p16, alpha, keep, skipped,
        visited), with p16 and alpha what P·V of p will need and keep 1
        where this tile keeps it."""
        m_i, l_i, p16, alpha, _, n_skipped, n_visited = state
        with jax.named_scope("rowmax"):
          if masked:
            s = mask_scores(s, p)
          m_blk = s.max(axis=1) * scale              # [block_q], log2 units

        def softmax():
          m_new = jnp.maximum(m_i, m_blk)
          m_safe = (jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    if masked or sc.rows is not None else m_new)
          alpha_new = jnp.exp2(m_i - m_safe)
          p = exp2_split(
              s * scale - lax.broadcast_in_dim(m_safe, s.shape, [0]),
              exp2_fma_cols, fence=interpret)
          l_new = l_i * alpha_new + p.sum(axis=1)
          return m_new, l_new, p.astype(dtype), alpha_new

        if not skip_enabled:   # The dense build (`overlap_dense`, or three)
          # keep = 1 derived from a traced value: Mosaic's lowering wants
          # the loop carry's scalars as IR values, not constants.
          kept = n_visited * 0 + 1
          if not guard_softmax:
            return softmax() + (kept, n_skipped, n_visited + 1)
          # Never taken, so the softmax sits in a branch as in the skip build.
          new = lax.cond(never, lambda: (m_i, l_i, p16, alpha),
                         jax.named_scope("softmax")(softmax))
          return new + (kept, n_skipped, n_visited + 1)
        with jax.named_scope("vote"):
          hit = any_kept_row(m_blk, m_i, n_visited)
          skip = ((n_visited > 0) | seen_before) & ~hit
          publish(k_slot(p), ~skip)
          if sc.skips is not None:
            block = block_at(p)
            sc.skips.at[wg][block // SLOT, block % SLOT] = skip.astype(
                jnp.int32)
        kept = lax.cond(skip, lambda: (m_i, l_i, p16, alpha),
                        jax.named_scope("softmax")(softmax))
        return kept + ((~skip).astype(jnp.int32),
                       n_skipped + skip.astype(jnp.int32),
                       n_visited + 1)

      def step(p, carry, *, kind: str, has_pv: bool, first: bool = False):
        """Position p: P·V of block p (has_pv: this tile kept it) and the
        block at p + 1 (kind 'full' or 'masked': this tile's, scores
        masked or not; 'pass': another tile's only; 'none': past the
        end). first: p = -1, the pipeline's fill."""
        acc, state = carry[0], carry[1:]
        p16, alpha = state[2], state[3]
        nxt = p + 1
        slot, slot_n = slot_of(p), k_slot(nxt)   # V of p, K of p + 1
        has_qk = kind in ("full", "masked")
        if kind != "none":
          with jax.named_scope("wait_k"):
            plgpu.barrier_wait(bars.k.at[slot_n])
        if has_pv:
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def products(*accs):
          if has_pv and sc.p is None:
            accs[-1][...] = acc
          take_turn()
          if has_qk:
            plgpu.wgmma(accs[0], qo_smem, sc.k.at[slot_n].transpose((1, 0)))
          if has_pv:
            with jax.named_scope("wait_v"):
              plgpu.barrier_wait(bars.v.at[slot])
            if sc.p is None:
              plgpu.wgmma(accs[-1], p16, sc.v.at[slot])
            else:
              # Interpret mode: P goes through shared memory (the
              # interpreter has no register-operand wgmma).
              p_smem = sc.p.at[wg]
              p_smem[...] = p16
              plgpu.commit_smem()
              plgpu.wgmma(accs[-1], p_smem, sc.v.at[slot])
          pass_turn()
          # Keep flags are traced: Mosaic lowers no literal out of a scope.
          new = state[:4] + (state[4] * 0,) + state[5:]
          if has_qk:   # q·kᵀ was issued first: wait for it alone.
            with jax.named_scope("wait_qk"):
              s = plgpu.wgmma_accumulator_load(accs[0], wait_n=int(has_pv))
            plgpu.barrier_arrive(bars.k_free.at[slot_n])
            with jax.named_scope("decide"):
              new = decide(nxt, s, state, masked=kind == "masked")
          elif kind == "pass":
            publish(slot_n, jnp.bool_(False))
            plgpu.barrier_arrive(bars.k_free.at[slot_n])
          if not has_pv:
            if not first:
              release_v(slot)
            return (acc,) + new
          # The softmax above must be done before waiting for P·V.
          new = lax.optimization_barrier(new[:4]) + new[4:]
          with jax.named_scope("wait_pv"):
            out = accs[-1][...]
          if sc.p is not None:
            out = acc + out
          plgpu.barrier_arrive(bars.v_free.at[slot])
          return (out,) + new

        accs = ([plgpu.ACC((block_q, block_kv), jnp.float32)] if has_qk
                else []) + ([plgpu.ACC((block_q, head_dim), jnp.float32)]
                            if has_pv else [])
        return pl.run_scoped(products, *accs) if accs else products()

      def at(p, carry, kind):
        """Position p, P·V chosen at run time by the tile's decision."""
        return lax.cond(carry[5] != 0,
                        functools.partial(step, p, kind=kind, has_pv=True),
                        functools.partial(step, p, kind=kind, has_pv=False),
                        carry)

      def own_or_pass(p, carry, kind):
        if in_my_list is None:
          if not skip_enabled:   # Every block before p + 1 < n_steps is kept.
            return step(p, carry, kind=kind, has_pv=True)
          return at(p, carry, kind)
        return lax.cond(in_my_list(p + 1),
                        lambda c: at(p, c, kind), lambda c: at(p, c, "pass"),
                        carry)

      pl.when(wg == C - 1)(lambda: plgpu.barrier_arrive(turn.at[0]))
      p16 = plgpu.layout_cast(jnp.zeros((block_q, block_kv), dtype),
                              plgpu.Layout.WGMMA)
      ones = plgpu.layout_cast(jnp.full((block_q,), 1.0, jnp.float32),
                               row_layout)
      zero = n_stream * 0   # traced: see `step`
      carry = (acc, m_i, l_i, p16, ones, zero, zero, zero)
      # The fill: q·kᵀ of position 0, whatever it is.
      own0 = n_steps > 0
      if in_my_list is not None:
        own0 = own0 & in_my_list(jnp.int32(0))
      kinds = ("none", "pass", "masked", "full")
      kind0 = jnp.where(n_stream == 0, 0,
                        jnp.where(~own0, 1, jnp.where(n_full > 0, 3, 2)))
      carry = lax.switch(
          kind0, [functools.partial(step, jnp.int32(-1), kind=k,
                                    has_pv=False, first=True)
                  for k in kinds], carry)
      one = jnp.int32(1)
      # Next positions [1, n_full): unmasked; [n_full, n_steps): masked;
      # [n_steps, n_stream): other tiles'.
      carry = lax.fori_loop(
          0, n_full - 1, lambda p, c: own_or_pass(p, c, "full"), carry)
      carry = lax.fori_loop(
          jnp.maximum(n_full - 1, 0), n_steps - one,
          lambda p, c: own_or_pass(p, c, "masked"), carry)
      carry = lax.fori_loop(
          jnp.maximum(n_steps - 1, 0), n_stream - one,
          lambda p, c: at(p, c, "pass"), carry)
      carry = lax.cond(n_stream > 0, lambda c: at(n_stream - 1, c, "none"),
                       lambda c: c, carry)
      pl.when(wg == 0)(take_turn)    # the last warpgroup's last pass
      acc, m_i, l_i, _, _, _, n_skipped, n_visited = carry
      return acc, m_i, l_i, n_skipped, n_visited

    if overlap:
      acc, m_i, l_i, n_skipped, n_visited = overlapped_loop(acc, m_i, l_i)
    else:
      acc, m_i, l_i, n_skipped, n_visited = pingpong_loop(acc, m_i, l_i)

    has_mass = l_i > 0
    l_safe = jnp.where(has_mass, l_i, 1.0)
    acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    qo_smem[...] = acc.astype(dtype)
    sc.lse.at[wg][...] = jnp.where(
        has_mass, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    if sc.rows is not None:
      sc.rows.at[wg][...] = m_i * LN2
    stats = sc.stats.at[wg]
    stats[0] = n_skipped
    stats[1] = n_visited
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem,
                            io.out.at[batch, pl.ds(q_base, block_q), q_head])
    plgpu.copy_smem_to_gmem(sc.lse.at[wg],
                            io.lse.at[batch, q_head, pl.ds(q_base, block_q)])
    if sc.rows is not None:
      plgpu.copy_smem_to_gmem(
          sc.rows.at[wg], io.row_max.at[batch, q_head, pl.ds(q_base, block_q)])
    tile = program * C + wg
    plgpu.copy_smem_to_gmem(stats, io.stats.at[batch, q_head, tile])
    if sc.skips is not None:
      plgpu.copy_smem_to_gmem(sc.skips.at[wg],
                              io.skips.at[batch, q_head, tile])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == C)
  def _memory():
    plgpu.set_max_registers(memory_registers, action="decrease")
    kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

    def source(pos):
      return (batch, pl.ds(block_at(pos) * block_kv, block_kv), kv_head)

    # With clusters, every program issues each copy: it fetches its share
    # and multicasts it, and its barrier awaits the whole block.
    multicast = dict(collective_axes=CLUSTER_AXIS) if cluster_q > 1 else {}

    def issue_k(pos, slot):
      plgpu.copy_gmem_to_smem(io.k.at[source(pos)], sc.k.at[slot],
                              bars.k.at[slot], **multicast)

    def issue_v(pos, slot):
      tail = block_at(pos) == lax.div(kv_len, block_kv)

      @pl.when(~tail)
      def _():
        plgpu.copy_gmem_to_smem(io.v.at[source(pos)], sc.v.at[slot],
                                bars.v.at[slot], **multicast)

      @pl.when(tail)
      def _():
        plgpu.copy_gmem_to_smem(
            io.v_tail.at[batch, pl.ds(0, block_kv), kv_head], sc.v.at[slot],
            bars.v.at[slot], **multicast)

    def issue_k_ahead(pos):
      """K runs k_stages blocks ahead: block pos + k_stages into pos's slot
      once every tile is done with it."""
      @pl.when(pos + k_stages < n_stream)
      def _():
        kslot = k_slot(pos)
        with jax.named_scope("bars.k_free"):
          plgpu.barrier_wait(bars.k_free.at[kslot])
        issue_k(pos + k_stages, kslot)

    # The K ring's first fill (no more blocks than the keys hold).
    for i in range(min(k_stages, io.k.shape[1] // block_kv)):
      pl.when(i < n_stream)(functools.partial(issue_k, i, i))
    if sc.votes is None:
      @pl.loop(0, n_stream)
      def _stream(pos):
        slot = slot_of(pos)

        @pl.when(pos >= num_stages)
        def _():
          plgpu.barrier_wait(bars.v_free.at[slot])
        issue_v(pos, slot)
        issue_k_ahead(pos)
    else:

      def vote(pos, voter):
        kslot = k_slot(pos)
        with jax.named_scope(f"vote{voter}"):
          plgpu.barrier_wait(bars.votes.at[voter * k_stages + kslot])
        return sc.votes[kslot, voter] != 0

      # V goes as soon as its slot is free
      # when some tile kept the block before (a kept block is likely
      # followed by kept ones, whose copies must not wait for a vote);
      # after a block every tile skipped, block pos's V waits for the votes
      # on it, in turn order, and is copied at the first that keeps it.
      # With no copy the phase completes empty.
      def stream(pos, kept_before):
        slot = slot_of(pos)

        @pl.when(pos >= num_stages)
        @jax.named_scope("bars.v_free")
        def _():
          plgpu.barrier_wait(bars.v_free.at[slot])

        pl.when(kept_before)(functools.partial(issue_v, pos, slot))
        issued, kept = kept_before, jnp.bool_(False)
        for voter in range(C - 1):
          keep = vote(pos, voter)
          pl.when(~issued & keep)(functools.partial(issue_v, pos, slot))
          issued, kept = issued | keep, kept | keep
        last = vote(pos, C - 1)

        @pl.when(~issued)
        def _():
          lax.cond(last, functools.partial(issue_v, pos, slot),
                   lambda: plgpu.barrier_arrive(bars.v.at[slot]))

        issue_k_ahead(pos)
        return kept | last

      lax.fori_loop(0, n_stream, stream, jnp.bool_(True))

    # Observe the last releases too, so every barrier phase this warpgroup
    # took part in is seen before the barriers are freed.
    @pl.loop(jnp.maximum(n_stream - k_stages, 0), n_stream)
    def _drain_k(pos):
      plgpu.barrier_wait(bars.k_free.at[k_slot(pos)])

    @pl.loop(jnp.maximum(n_stream - num_stages, 0), n_stream)
    def _drain_v(pos):
      plgpu.barrier_wait(bars.v_free.at[slot_of(pos)])


def attention_forward(q, k, v, kv_lengths, log_threshold, block_mask=None,
                      initial_max=None, *, causal: bool, sm_scale: float,
                      block_q: int = 64, block_kv: int = 128,
                      config: MosaicConfig = MosaicConfig(),
                      skip_enabled: bool = True, interpret=None,
                      return_skip_mask: bool = False):
  """Skip-softmax forward on Hopper; same contract as the Triton kernel.

  Args:
    q: [batch, q_len, q_heads, head_dim], bf16 or f16, head_dim in
      {64, 128, 256}.
    k, v: [batch, kv_len, kv_heads, head_dim].
    kv_lengths: int32 [batch] (<= kv_len); log_threshold: f32 [batch]
      (natural log).
    block_mask: optional bool [batch, q_heads, n_q_tiles, n_kv_blocks] with
      tiles of block_q x block_kv: only selected blocks are visited, and
      only those selected for some tile of a program are read.
    interpret: None on a GPU, or a `plgpu.InterpretGPUParams` to run on CPU
      in Pallas' GPU interpret mode (barriers, TMA and races simulated; P·V
      then reads P from shared memory instead of registers). Slow: tests only.
    initial_max: optional f32 [batch, q_heads, q_len]: the running max to
      start from (`reference.blockwise_attention`'s `initial_max`).
    return_skip_mask: also return which blocks each tile skipped (what the
      backward needs to walk exactly the kept ones).

  Returns:
    out [batch, q_len, q_heads, head_dim], lse f32 [batch, q_heads, q_len],
    skipped, visited int32 [batch, q_heads, n_q_tiles] (tiles of block_q),
    with return_skip_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks],
    with initial_max: the running max at the end, f32 [batch, q_heads,
    q_len].
  """
  config = config.resolved(q.shape[-1], skip_enabled)
  check_exp2_fma_cols(config, block_kv)
  if block_mask is not None and config.cluster_q > 1:
    raise ValueError("`cluster_q=2` shares one K/V stream between two "
                     "programs and takes no block mask; use cluster_q=1 with "
                     "`block_mask`.")
  lists = None
  if block_mask is not None:
    lists = program_lists(block_mask, kv_lengths.astype(jnp.int32),
                          q_len=q.shape[1], block_q=block_q,
                          block_kv=block_kv, causal=causal,
                          compute_wgs=config.compute_wgs)
    if interpret is not None and not isinstance(lists, jax.core.Tracer):
      # The interpreter runs the warpgroups as host threads that need XLA's
      # CPU pool; XLA work in the kernel's own program can take the pool
      # from them (a deadlock on a 2-core machine). Build the lists first.
      lists = jax.block_until_ready(lists)
  record = return_skip_mask and skip_enabled
  out, lse, skipped, visited, *extra = _forward(
      q, k, v, kv_lengths, log_threshold, lists, initial_max, causal=causal,
      sm_scale=sm_scale, block_q=block_q, block_kv=block_kv, config=config,
      skip_enabled=skip_enabled, interpret=interpret, record_skips=record)
  result = (out, lse, skipped, visited)
  row_max = () if initial_max is None else (extra.pop(),)
  if not return_skip_mask:
    return result + row_max
  b, hq, nq = skipped.shape
  nk = -(-k.shape[1] // block_kv)
  if not record:
    return result + (jnp.zeros((b, hq, nq, nk), jnp.bool_),) + row_max
  # Words of blocks a tile did not visit were never written.
  walked = reference.visited_blocks_mask(
      q.shape[1], k.shape[1], block_q, block_kv, kv_lengths.astype(jnp.int32),
      causal, block_mask)
  flags = extra[0].reshape(b, hq, nq, -1)[..., :nk]
  return result + (walked & (flags != 0),) + row_max


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sm_scale", "block_q", "block_kv", "config",
                     "skip_enabled", "interpret", "record_skips"))
def _forward(q, k, v, kv_lengths, log_threshold, lists, initial_max, *,
             causal, sm_scale, block_q, block_kv, config, skip_enabled,
             interpret, record_skips=False):
  # lists: None or `program_lists`' int32 [batch, q_heads, n_programs, width].
  # initial_max: None or f32 [batch, q_heads, q_len] (units of sm_scale·q·kᵀ).
  # config: resolved for this head_dim and build (`attention_forward`).
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  C = config.compute_wgs  # pylint: disable=invalid-name
  cluster_q = config.cluster_q
  program_rows = C * block_q
  # A cluster's programs are adjacent q ranges: a whole number of them.
  n_programs = -(-lq // (cluster_q * program_rows)) * cluster_q
  lq_pad = n_programs * program_rows
  nk = -(-lk // block_kv)
  # Padded q rows repeat the last real row: their gaps equal a real row's,
  # so they never change a decision. Their outputs are dropped.
  q = jnp.pad(q, ((0, 0), (0, lq_pad - lq), (0, 0), (0, 0)),
              mode="edge")
  k = jnp.pad(k, ((0, 0), (0, nk * block_kv - lk), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, nk * block_kv - lk), (0, 0), (0, 0)))
  kv_lengths = kv_lengths.astype(jnp.int32)
  params = jnp.zeros((b, SLOT), jnp.float32)
  params = params.at[:, 0].set(kv_lengths.astype(jnp.float32))
  params = params.at[:, 1].set(log_threshold * LOG2E)
  chained = initial_max is not None
  inputs = dict(
      q=q, k=k, v=v, v_tail=tiles.tail_block(v, kv_lengths, block_kv),
      params=params,
      # [b, hq, n_prog, rows, SLOT]: see `word`.
      lists=(None if lists is None
             else lists.reshape(*lists.shape[:-1], -1, SLOT)),
      # log2 units; padded rows repeat the last real row's start.
      initial_max=(jnp.pad(initial_max.astype(jnp.float32) * LOG2E,
                           ((0, 0), (0, 0), (0, lq_pad - lq)),
                           mode="edge") if chained else None))
  dtype = q.dtype
  num_stages = config.num_stages
  vote = skip_enabled and config.copy_v_if_kept
  # The dense build runs the overlapped loop with its softmax under a
  # never-taken branch unless `overlap_dense=False` (two warpgroups: the
  # two-turn ping-pong; three: overlapped without the branch, which ran
  # 1.3-1.8x slower on the H200, 8k, head_dim 64 and 128).
  overlap = config.overlap_qk and (skip_enabled or C > 2
                                   or config.overlap_dense)
  guard_softmax = not skip_enabled and config.overlap_dense
  k_stages = k_ring_depth(config, block_q, block_kv, d,
                          0 if lists is None else nk,
                          nk if record_skips else 0)

  skip_rows = list_width(nk) // SLOT   # skip words: [skip_rows, SLOT]
  slot_release = (plgpu.Barrier if cluster_q == 1 else functools.partial(
      plgpu.ClusterBarrier, collective_axes=(CLUSTER_AXIS,)))
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  scratch = _Scratch(
      qo=plgpu.SMEM((C, block_q, d), dtype, transforms=swizzled),
      k=plgpu.SMEM((k_stages, block_kv, d), dtype, transforms=swizzled),
      v=plgpu.SMEM((num_stages, block_kv, d), dtype, transforms=swizzled),
      lse=plgpu.SMEM((C, block_q), jnp.float32),
      stats=plgpu.SMEM((C, SLOT), jnp.int32),
      params=plgpu.SMEM((C + 1, SLOT), jnp.float32),
      p=(plgpu.SMEM((C, block_q, block_kv), dtype,
                    transforms=swizzled) if interpret is not None else None),
      skips=(plgpu.SMEM((C, skip_rows, SLOT), jnp.int32)
             if record_skips else None),
      lists=(plgpu.SMEM((list_width(nk) // SLOT, SLOT), jnp.int32)
             if lists is not None else None),
      votes=plgpu.SMEM((k_stages, SLOT), jnp.int32) if vote else None,
      rows=(plgpu.SMEM((C, block_q), jnp.float32) if chained
            else None),
      vote_scratch=(plgpu.SMEM((C, mosaic_vote.SCRATCH_WORDS), jnp.float32)
                    if skip_enabled or chained else None))
  barriers = _Barriers(
      k=plgpu.Barrier(num_barriers=k_stages),
      v=plgpu.Barrier(num_barriers=num_stages),
      q=plgpu.Barrier(num_barriers=C),
      params=plgpu.Barrier(num_barriers=C + 1),
      # With clusters a slot is refilled in every program of the cluster at
      # once: its release needs all of their compute warpgroups.
      k_free=slot_release(num_arrivals=C, num_barriers=k_stages),
      v_free=slot_release(num_arrivals=C, num_barriers=num_stages),
      sched=(plgpu.Barrier(num_barriers=C) if overlap
             else plgpu.Barrier(num_arrivals=C)),
      lists=plgpu.Barrier() if lists is not None else None,
      votes=(plgpu.Barrier(num_barriers=C * k_stages) if vote
             else None),
      rows=plgpu.Barrier(num_barriers=C) if chained else None)
  in_names = [name for name, x in inputs.items() if x is not None]
  out_shapes = dict(
      out=jax.ShapeDtypeStruct(q.shape, dtype),
      lse=jax.ShapeDtypeStruct((b, hq, lq_pad), jnp.float32),
      stats=jax.ShapeDtypeStruct((b, hq, n_programs * C, SLOT),
                                 jnp.int32),
      skips=(jax.ShapeDtypeStruct(
          (b, hq, n_programs * C, skip_rows, SLOT), jnp.int32)
             if record_skips else None),
      row_max=(jax.ShapeDtypeStruct((b, hq, lq_pad), jnp.float32)
               if chained else None))
  out_names = [name for name, x in out_shapes.items() if x is not None]

  def blasst_prefill_mosaic(*refs):
    io = _Refs(**{**dict.fromkeys(_Refs._fields),
                  **dict(zip(in_names + out_names, refs))})

    def body(sc, bars):
      _kernel(io, sc, bars, sm_scale=sm_scale, block_q=block_q,
              block_kv=block_kv, head_dim=d, dtype=dtype, causal=causal,
              q_len=lq, group=hq // hkv, num_stages=num_stages,
              k_stages=k_stages, compute_wgs=C,
              compute_registers=config.compute_registers,
              memory_registers=config.memory_registers,
              exp2_fma_cols=config.exp2_fma_cols,
              skip_enabled=skip_enabled, overlap=overlap,
              guard_softmax=guard_softmax, cluster_q=cluster_q,
              one_barrier_vote=config.one_barrier_vote,
              interpret=interpret is not None)

    pl.run_scoped(body, scratch, barriers, collective_axes="wg")

  results = plgpu.kernel(
      blasst_prefill_mosaic,
      out_type=tuple(out_shapes[name] for name in out_names),
      **launch_grid(config.raster, hq, n_programs, b, cluster_q),
      num_threads=C + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, profile_space=config.trace_events,
          profile_dir=config.trace_dir),
      interpret=interpret,
  )(*(inputs[name] for name in in_names))
  res = dict(zip(out_names, results))
  nq = -(-lq // block_q)   # Tiles past q_len only hold padding rows.
  return (res["out"][:, :lq], res["lse"][:, :, :lq], res["stats"][..., :nq, 0],
          res["stats"][..., :nq, 1]) + (
              (res["skips"][:, :, :nq],) if record_skips else ()) + (
                  (res["row_max"][:, :, :lq],) if chained else ())

