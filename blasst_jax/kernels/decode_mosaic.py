"""Hopper skip-softmax decode kernel (Pallas Mosaic GPU), paged KV cache.

One program per (split, KV head, sequence) with a memory warpgroup and
`compute_wgs` (1 to 3) compute warpgroups. The memory warpgroup streams the
split's K pages into a shared-memory ring with TMA, `k_stages` blocks
ahead; a V page is copied only once its block has been kept, by the
compute warpgroup that kept it, into a V slot only that warpgroup uses
(`MosaicDecodeConfig.compute_issues_v`), so a skipped block's V is never
read and no decision or V slot ever holds back a K copy. (With
`compute_issues_v=False` the memory warpgroup copies V as it reads each
decision from shared memory, and completes a skipped block's V slot phase
with an empty arrival.) Each compute warpgroup holds the
`group` query heads of the KV head in one wgmma tile (the 64-row build:
its rows, zero rows padding them; the transposed build, below: 8-wide
columns), scores its next block j, decides it against the running max and
publishes the decision, then accumulates its previous block, whose V copy
ran while block j was scored.

With C > 1 compute warpgroups, block j belongs to warpgroup j % C: the
score products, softmax and P·V of neighbouring blocks run side by side,
and only the decision is serial: the running max after block j - 1 is
handed over in shared memory (one row vector and a barrier), so the
decisions are those of one warpgroup walking the split in order. Each
warpgroup keeps its own accumulator; they are written as partials of the
split (or joined by the first warpgroup, `merge_warpgroups`).

Max modes as `reference.blockwise_decode_attention`: "split" starts every
split's running max at -inf; "anchored" first scores the sequence's first
and last blocks (two K pages more per split, L2 hits across splits).

Split-K merge (`MosaicDecodeConfig.merge_in_kernel`, the default,
`decode_merged`): every program writes its partials (unnormalized
accumulator, row max, row sums, block counts; one per compute warpgroup,
or with `merge_warpgroups` one, the warpgroups' combined by the first in
shared memory) to global memory; the other splits then signal a semaphore of
their (sequence, KV head) (a word of the control block), the last split's
warpgroups arrive on a barrier. The
last split's memory warpgroup waits for both and streams every part
through a ring over the (by then free) K and V rings, and its first compute
warpgroup combines them online at their running max, normalizes, and
writes the output rows in the output dtype, the merged row statistics and
the block counts: the output needs no XLA kernel after the call (the lse
and the stats, where asked for, are a small one). The merging program is
the last split: the split is the grid's slowest axis and CUDA starts blocks
in order (in practice; it does not promise it), so the splits it waits for
are running or done (the GPU test runs more programs than fit at once).
With one split the program merges its warpgroups' tiles in shared memory.
`decode_partials` returns the partials instead, for
`decode.merge_partials`, as the Triton kernel does.

The transposed build (`MosaicDecodeConfig(transposed=True)`, the
default) puts the keys on the wgmma M side instead: the scores are K·qᵀ, a
[block_kv, N] tile whose N columns (the group rounded up to 8) are the
query heads, and the output is Vᵀ·Pᵀ, [head_dim, N], with Pᵀ written to
shared memory as the B operand. The tensor work, the exponentials and the
registers shrink from 64 padded rows to N columns (8 at GQA 4); the running
max becomes a column reduction across the warpgroup's warps (through a
scratch of the warpgroup's own), after which every warp holds the same
column maxima, so the skip vote needs no barrier of its own. The row sums
stay a tile of per-thread partials, summed once at the end.

FP8 caches (float8_e4m3fn pages with a scale per KV head, value = stored ·
scale): the pages travel as FP8, half the bytes. The compute warpgroup
widens each K page in registers, the score product's A operand
(`fp8_k_in_registers`), and each V page into its f16 tile in shared memory
(e4m3 -> f16 is exact and one instruction per pair; a slot is free as soon
as it is widened), and runs both products in f16 with the query cast to
f16; the K scale is folded into the score scale and the V scale into the
accumulator. The memory warpgroup hands most of its registers to the
compute warpgroups (`split_registers`), so that none spill.

Inputs besides the pages: one array, the control block (`control_block`):
each (sequence, KV head)'s query rows, padded to the tile, then a row of
32-bit words (the length, log2 λ, the FP8 scales, and the merge's
semaphore, 0 as written), so XLA runs one small kernel before the call
instead of one per input (and one to zero `pl.get_global` semaphores).

Pages: a page table, of which each program copies into shared memory the
rows of its split's blocks (and of the two anchor blocks) where they are
fewer than the whole table's (`table_window`); or, for a contiguous cache
(`page_table=None`), block j of sequence i in page i * pages_per_seq + j:
no table to build, copy or hold (at 512k keys in pages of 128 a whole
table takes 16 KiB, two V slots' worth; 16 splits' windows 1.4 KiB).

Persistent kernel (`MosaicDecodeConfig.programs`): a grid of P programs
(at most one per SM) instead of one per item; program p walks the (sequence,
KV head, split) items p, p + P, p + 2 P, ... (split-major by default,
`split_major`, else split-minor: either way a merging item, a head's last
split, waits only for items of lower index, which every resident program
reaches first). Each warpgroup loops over its rounds: the memory warpgroup
streams the next item's K pages into the ring as soon as its slots free
(a slot's last release is awaited across items), holding the page table
in two buffers, one per round's parity; the compute warpgroups copy the
next item's control rows and query tile once they have read their last
K page, and write their output, and merge, over the V ring, which no V
copy of the next item enters until both are done (`ring_free`). On a GPU
the split that finishes last merges (`mosaic_merge.take_ticket` on the
control block's word), so no program waits for another's items (a waiting
merge held up every later item of its program); its first warpgroup loads
the partials itself, so that its memory warpgroup streams on. Finer splits
then cost no program start and end.

Options that only move work in time or place, built for measurement
(`MosaicDecodeConfig`): `hand_over_block_max` (the two compute warpgroups
exchange block maxima instead of running maxima, so no decision waits for
the other's), `fp8_k_in_registers`, `decide_ahead` (V copies started two
blocks before they are accumulated) and `auto_barriers=False` (no Pallas
barriers around shared-memory stores that the kernel already orders).
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

from blasst_jax.kernels import mosaic_merge
from blasst_jax.kernels import mosaic_vote

LOG2E = math.log2(math.e)
ROWS = 64          # wgmma M: the query heads of a group, zero-padded
SLOT = 32          # int32/f32 words in 128 bytes (TMA alignment)
# The control block (`control_block`): below each (sequence, KV head)'s
# query rows, CONTROL_ROWS rows (the query's TMA reads whole 8-row tiles)
# whose first holds the CONTROL_WORDS, 32-bit words each as its four
# bytes, a 16-bit float 0..255 apiece (exact in bf16 and f16, and never a
# NaN bit pattern that an XLA pass could rewrite), then the merge's
# semaphore; zeros elsewhere.
CONTROL_ROWS = 8
CONTROL_WORDS = ("kv_len", "log2_threshold", "k_scale", "v_scale")
# Halves [SEMAPHORE_AT, SEMAPHORE_AT + 2) of the row: the split-K merge's
# semaphore of the (sequence, KV head), a raw 32-bit count, 0 as written.
SEMAPHORE_AT = 16
assert 4 * len(CONTROL_WORDS) <= SEMAPHORE_AT
CONTROL_HALVES = 64   # what each warpgroup copies of the row (128 bytes)
# Page numbers a row of the page table holds in global and shared memory
# (TMA boxes hold <= 256 rows: up to 8192 pages a sequence in one copy).
TABLE_ROW = SLOT
# The anchors' table rows, held after a program's window: block 0's row
# and the last block's row.
ANCHOR_TABLE_ROWS = 2
MAX_MODES = ("split", "anchored")
HEAD_DIMS = (64, 128, 256)
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn),)


@dataclasses.dataclass(frozen=True)
class MosaicDecodeConfig:
  """Speed knobs of the Mosaic decode kernel (no effect on results).

  Attributes:
    k_stages: K pages in flight (shared-memory ring slots), >= 2; None: as
      many as fit in shared memory, at most `MAX_K_STAGES`.
    v_stages: V pages in flight, >= 2; None: with `compute_issues_v`,
      twice the compute warpgroups where that fits beside two K pages (so
      each warpgroup issues a kept block's copy at its decision; H200,
      `decode_v_issue_h200.log`: 3-10 % faster than two V slots when
      skipping 30-97 % at head_dim 128, batch 8 and 1; within 1.5 % at
      batch 64), else as many as the warpgroups;
      without it, 2.
    compute_wgs: compute warpgroups per program, 1, 2 or 3 (block j on
      warpgroup j % C); both rings then hold a multiple of C pages. 3
      needs `transposed` (its registers: `REGISTERS`). None: 3 at head_dim
      64 for FP8 pages of <= 128 keys and 16-bit pages of 64 (transposed,
      at most 8 query columns); else 2 where registers and shared memory
      allow (64 rows: head_dim + block_kv <= 192; transposed: the query
      columns' tiles fit and pages hold >= 8192 elements, 4096 for FP8
      pages); else 1 (see `pipeline`).
    split_registers: with two or three compute warpgroups, hand the
      memory warpgroup's registers to them (setmaxnreg `REGISTERS`: 232 /
      40 a thread instead of 168 each at launch; three: 152 / 56 instead
      of 128). None: for FP8 pages (with
      `fp8_k_in_registers`, H200, `decode_fp8_regs_h200.log`: 36 % faster
      dense and 11 % at 70 % skipped than the shared-memory widening),
      not for 16-bit ones.
    one_barrier_vote: decide by `mosaic_vote.warpgroup_any` (a warp vote,
      a word a warp, one barrier) instead of a max reduction over the
      rows (shuffles and two barriers), as the prefill kernel does.
    transposed: keys on the wgmma M side (K·qᵀ and Vᵀ·Pᵀ over N = the
      group rounded up to 8 query columns instead of 64 padded rows; see
      the module docstring). With it `compute_wgs=None` takes two compute
      warpgroups wherever shared memory allows, and `one_barrier_vote`
      has nothing to do (the vote needs no barrier). False: the 64-row
      build (H200, `decode_transposed_h200.log`: the transposed one is
      3-12 % faster at λ = 0 and 1-15 % when skipping 83-99 %).
    merge_in_kernel: the last split of each (sequence, KV head) merges the
      splits' partials and writes the normalized output itself (see the
      module docstring); False: the partials are merged by
      `decode.merge_partials` after the call.
    compute_issues_v: the compute warpgroup that keeps a block copies its
      V page itself (into a slot only it uses), at the decision when it
      owns two V slots, else as soon as the slot's previous block is
      accumulated; the memory warpgroup streams only K: no decision
      travels through shared memory, and neither a V slot nor a decision
      ever holds back the next K copy. False: the memory warpgroup issues
      both, block by block, reading each decision (the earlier build).
    hand_over_block_max: with two compute warpgroups, each hands the
      other the maximum of every block it scores, as soon as it is scored,
      instead of its running max once it has decided the block. Over the
      real query heads the running max is the maximum over every block so
      far (λ < 1: a skipped block's maximum lies below it), so the
      decisions are the same (for finite scores; λ > 1, outside the skip
      rule's range, acts as 1), and a warpgroup's decision waits only for
      the other's scores, not for its decision: no chain of hand-overs
      runs through the split. Six hand-over slots instead of two.
    fp8_k_in_registers: FP8 pages, transposed build: each K page is
      widened to f16 in registers and fed to the score product as its A
      operand, instead of through the warpgroup's f16 tile in shared
      memory (no store, fence and reload of the page on the decision's
      path). V is still widened in shared memory (Vᵀ's transposed load).
      None: on for FP8 pages (see `split_registers`).
    decide_ahead: a compute warpgroup's blocks decided (and their V
      copies started) before it accumulates one: 1, or 2 (each V copy
      then has two of the warpgroup's blocks to land in, not one; Pᵀ of
      three blocks in shared memory). 2 takes effect in the transposed
      build with `compute_issues_v` where three V slots a warpgroup fit
      (`pipeline`), else it acts as 1.
    auto_barriers: Pallas' barriers around every shared-memory store of
      the compute warpgroups (one before, one after; `CompilerParams.
      unsafe_no_auto_barriers` drops them). False leaves them out where
      the kernel already orders the accesses: a store then
      `commit_smem` (a fence and a barrier) before a wgmma or TMA reads
      it, or a store then an mbarrier arrival (each thread's release) for
      the other warpgroup; the merge has its own barrier before it
      overwrites what it read. Per block that is 2 barriers fewer for the
      hand-over and 2 for a kept block's Pᵀ (of 4-7). Needs
      `compute_issues_v` (the memory warpgroup that copies V would read
      each decision unordered with its rewrite).
    global_semaphores: the in-kernel merge's semaphores from
      `pl.get_global` (an XLA kernel zeroes them before every call)
      instead of a word of the control block, which the one XLA fusion
      before the call writes with the query and the parameters. (Taken
      anyway inside a `shard_map` with `check_vma=True`, which admits no
      varying Ref into the kernel. Under `jax.vmap` these semaphores are
      shared by the mapped calls, so do not vmap this build.)
    programs: a persistent kernel of this many programs (a merging
      program waits for the others' partials, so every program must be
      resident at once: more are cut to the GPU's SMs, where jax reports
      them, and to the items). The (sequence, KV head, split) items, in
      `split_major` order, go round-robin: program p takes items p, p + P,
      p + 2 P, ..., its memory warpgroup streaming the next item's K pages
      while the compute warpgroups finish the current one, so finer splits
      (more items than SMs) cost no program start. The output tiles and
      the merge's buffers move from the K ring to the V ring (the K ring
      streams on meanwhile), and the split that finishes last merges,
      loading the partials itself (with `global_semaphores`, the last
      split waits for the others, as in the grid). Needs `transposed` and
      `compute_issues_v`. None: a program per item (one grid point each).
    merge_warpgroups: with two compute warpgroups and several splits, the
      program combines its warpgroups' partials in shared memory and
      writes one part a split, so the merge (in the kernel or by XLA)
      reads half as many (the last split's warpgroup combines them one
      after another, at up to about 0.2 us a part on an H200). On an H200
      at 1 x 128k keys over 64 splits this took the kernel from 75.9 to
      73.3 us at 93 % skipped, 127.8 to 125.2 us dense. False: one part a
      warpgroup.
    split_major: the persistent kernel's items split-major (split s of
      every (sequence, KV head), then split s + 1) instead of split-minor,
      so that every (sequence, KV head)'s last split falls in the last
      rounds and the merges run once, side by side, at the end. Split-minor
      puts whole heads in a round: the program that finishes one last
      merges it, finishes its next item late, and so tends to merge again,
      a merge a round on one program (on an H200, 1 x 128k keys in 4 rounds
      of splits: 219 us split-minor, 118 us split-major, at 93 % skipped).
      The grid (`programs=None`) runs an item a program and ignores it.
  """

  k_stages: int | None = None
  v_stages: int | None = None
  compute_wgs: int | None = None
  split_registers: bool | None = None
  one_barrier_vote: bool = True
  transposed: bool = True
  merge_in_kernel: bool = True
  compute_issues_v: bool = True
  hand_over_block_max: bool = False
  fp8_k_in_registers: bool | None = None
  decide_ahead: int = 1
  auto_barriers: bool = True
  global_semaphores: bool = False
  programs: int | None = None
  merge_warpgroups: bool = True
  split_major: bool = True

  def __post_init__(self):
    for name in ("k_stages", "v_stages"):
      value = getattr(self, name)
      if value is None:
        continue
      if not isinstance(value, int) or value < 2:
        raise ValueError(f"`{name}` must be an int >= 2, got {value!r}.")
    for name in ("split_registers", "one_barrier_vote", "transposed",
                 "merge_in_kernel", "compute_issues_v",
                 "hand_over_block_max", "fp8_k_in_registers",
                 "auto_barriers", "global_semaphores", "merge_warpgroups",
                 "split_major"):
      optional = name in ("split_registers", "fp8_k_in_registers")
      if not (isinstance(getattr(self, name), bool)
              or optional and getattr(self, name) is None):
        raise ValueError(f"`{name}` must be a bool, got "
                         f"{getattr(self, name)!r}.")
    if not self.auto_barriers and not self.compute_issues_v:
      raise ValueError(
          "`auto_barriers=False` needs `compute_issues_v=True`: the memory "
          "warpgroup that copies V reads each decision without a barrier "
          "of its own.")
    if self.decide_ahead not in (1, 2) or isinstance(self.decide_ahead,
                                                      bool):
      raise ValueError(f"`decide_ahead` must be 1 or 2, got "
                       f"{self.decide_ahead!r}.")
    if self.programs is not None and (
        not isinstance(self.programs, int) or isinstance(self.programs, bool)
        or self.programs < 1):
      raise ValueError(f"`programs` must be None or an int >= 1, got "
                       f"{self.programs!r}.")
    if self.programs is not None and not (self.transposed
                                          and self.compute_issues_v):
      raise ValueError(
          "A persistent kernel (`programs`) needs `transposed=True` and "
          "`compute_issues_v=True` (its memory warpgroup streams only K).")
    if self.compute_wgs not in (None, 1, 2, 3) or isinstance(
        self.compute_wgs, bool):
      raise ValueError(f"`compute_wgs` must be None, 1, 2 or 3, got "
                       f"{self.compute_wgs!r}.")
    if self.compute_wgs == 3 and not self.transposed:
      raise ValueError(
          "`compute_wgs=3` needs `transposed=True`: the 64-row build's "
          "tiles do not fit three warpgroups' registers.")
    for name in ("k_stages", "v_stages"):
      value = getattr(self, name)
      if value is not None and self.compute_wgs and value % self.compute_wgs:
        raise ValueError(
            f"With compute_wgs={self.compute_wgs}, `{name}` must be a "
            f"multiple of it (slot s belongs to one warpgroup), got "
            f"{value}.")


# The deepest default K ring: MAX_K_STAGES pages, or two a compute
# warpgroup where that is more.
MAX_K_STAGES = 4
# setmaxnreg by compute warpgroups (`split_registers`): (compute, memory)
# registers a thread, C x compute + memory = the 512 a thread slot allows.
REGISTERS = {2: (232, 40), 3: (152, 56)}
# Keys of a page widened (FP8) or cleared past the length at a time, and
# of an FP8 K page widened into registers with three compute warpgroups
# (`k_chunk`): a whole page of 128 keys in registers at head_dim 128 spills
# them.
WIDEN_KEYS = 64
MAX_SHARED_MEMORY = 232448   # per block on H100/H200 (227 KiB)
# Pallas places every shared-memory buffer at a multiple of 1 KiB.
SMEM_ALIGNMENT = 1024
# Buffers of at most 1 KiB (params, votes, ml, stats, FP8 scales,
# `initial_max` rows, the vote words) and 1 KiB for the barriers.
SMALL_BUFFERS = 8
# Running maxima handed between compute warpgroups, in flight at once (at
# least a slot a warpgroup, so that slot j % H has one writer, warpgroup
# j % C, and one reader, (j + 1) % C: `hand_over_slots`);
# with `hand_over_block_max`, block maxima: a warpgroup may publish block
# j + 6 only once the other has read block j, which the other's reading of
# block j + 2 before it publishes block j + 3 guarantees.
HANDOFF_SLOTS = 2
BLOCK_MAX_HANDOFF_SLOTS = 6
# Partials in flight to the merging warpgroup (`merge_in_kernel`), at most.
MERGE_SLOTS = 16


def _aligned(nbytes: int) -> int:
  return -(-nbytes // SMEM_ALIGNMENT) * SMEM_ALIGNMENT


def query_tile(group: int, transposed: bool) -> int:
  """Query heads of a KV head as the score tile holds them: ROWS rows, or
  (transposed) the group rounded up to wgmma's N granularity of 8."""
  return -(-group // 8) * 8 if transposed else ROWS


def merge_stat_rows(rows: int) -> int:
  """Rows of a merge-ring slot of row statistics ([max, sums, padding],
  each of `rows` f32): TMA writes it, so its size is a multiple of 128
  bytes."""
  return max(2, 32 // math.gcd(32, rows))


def merge_bytes(rows: int, head_dim: int, slots: int = None) -> int:
  """The in-kernel merge's buffers over the V ring: the output rows (2-byte
  dtype) and `slots` (default MERGE_SLOTS) slots of row statistics and of
  block counts."""
  slots = MERGE_SLOTS if slots is None else slots
  return (_aligned(rows * head_dim * 2)
          + _aligned(slots * merge_stat_rows(rows) * rows * 4)
          + _aligned(slots * SLOT * 4))


def merge_ring_slots(parts, rows: int, head_dim: int, k_ring: int,
                     v_ring: int, compute_wgs: int,
                     persistent: bool = False) -> int:
  """Partials the in-kernel merge holds at once (1 to MERGE_SLOTS, at most
  `parts`; None: no bound): as many f32 tiles as the (by then free) K
  ring's `k_ring` bytes take beside nothing, or (`persistent`, whose K
  ring streams the next item meanwhile) as the V ring's `v_ring` bytes
  take beside the output tiles and `merge_bytes`."""
  tile = rows * head_dim * 4
  if persistent:
    budget = v_ring - _aligned(compute_wgs * tile) - merge_bytes(rows,
                                                                 head_dim)
  else:
    budget = max(k_ring, compute_wgs * tile)
  slots = max(1, min(MERGE_SLOTS, budget // tile))
  return slots if parts is None else max(1, min(slots, parts))


def shared_memory_bytes(head_dim, block_kv, pages_per_seq, k_stages,
                        v_stages, itemsize=2, fp8=False,
                        compute_wgs=1, cols=None, merge=True,
                        handoff_slots=HANDOFF_SLOTS, p_slots=2,
                        persistent=False) -> int:
  """q tile + K ring (which the f32 output tiles reuse at the end) + V
  ring + the page table + the running-max hand-over slots + the small
  buffers, each rounded up to Pallas'
  1 KiB shared-memory alignment (`SMALL_BUFFERS`); with `fp8` pages (1
  byte) the f16 tile of each compute warpgroup they are widened into.
  `cols`: the transposed build's query columns (`query_tile`), whose Pᵀ
  tiles (`p_slots` a warpgroup) and column-reduction scratch add to it; None:
  the 64-row build. `merge`: the in-kernel merge, whose buffers reuse the
  K ring (its tiles) and the V ring (`merge_bytes`). `persistent`
  (`MosaicDecodeConfig.programs`): the output tiles and the merge's
  buffers over the V ring, and a second page table."""
  rows = ROWS if cols is None else cols
  page = block_kv * head_dim * (1 if fp8 else itemsize)
  wide = compute_wgs * block_kv * head_dim * 2 if fp8 else 0
  table = 4 * -(-pages_per_seq // SLOT) * SLOT
  transposed = 0 if cols is None else (
      _aligned(compute_wgs * p_slots * cols * block_kv * itemsize)
      + _aligned(compute_wgs * 4 * mosaic_vote.column_scratch_words(cols)))
  out_tiles = _aligned(compute_wgs * rows * head_dim * 4)
  small = SMALL_BUFFERS
  if persistent:   # everything that ends an item over the V ring; two
    # tables
    slots = merge_ring_slots(None, rows, head_dim, 0, v_stages * page,
                             compute_wgs, persistent=True)
    k_ring = k_stages * page
    v_ring = max(v_stages * page, out_tiles + (
        _aligned(slots * rows * head_dim * 4)
        + merge_bytes(rows, head_dim, slots) if merge else 0))
    table *= 2
    small += 1   # the merge's ticket
  else:
    k_ring = max(k_stages * page, out_tiles)
    v_ring = max(v_stages * page,
                 merge_bytes(rows, head_dim) if merge else 0)
  return (_aligned(rows * head_dim * itemsize)
          + k_ring + v_ring + wide + _aligned(table) + transposed
          + _aligned(handoff_slots * rows * 4)
          + small * SMEM_ALIGNMENT)


def config_bytes(config, head_dim, block_kv, pages_per_seq, fp8, group,
                 compute_wgs, k_stages, v_stages) -> int:
  """`shared_memory_bytes` of `config` with this many compute warpgroups
  and K / V ring slots."""
  return shared_memory_bytes(
      head_dim, block_kv, pages_per_seq, k_stages, v_stages, fp8=fp8,
      compute_wgs=compute_wgs,
      cols=query_tile(group, True) if config.transposed else None,
      merge=config.merge_in_kernel,
      handoff_slots=hand_over_slots(config, compute_wgs),
      p_slots=blocks_ahead(config, compute_wgs, v_stages) + 1,
      persistent=config.programs is not None)


def on_for_fp8(option, fp8: bool) -> bool:
  """An FP8 register option's value: None means on for FP8 pages."""
  return fp8 if option is None else option


def blocks_ahead(config, compute_wgs, v_stages) -> int:
  """Blocks a compute warpgroup decides before accumulating one
  (`MosaicDecodeConfig.decide_ahead`, where it takes effect)."""
  if (config.decide_ahead > 1 and config.transposed
      and config.compute_issues_v
      and v_stages >= (config.decide_ahead + 1) * compute_wgs):
    return config.decide_ahead
  return 1


def hand_over_slots(config, compute_wgs: int) -> int:
  """Hand-over slots of the running max (or, two warpgroups, the block
  maxima): a multiple of the compute warpgroups."""
  if config.hand_over_block_max and compute_wgs == 2:
    return BLOCK_MAX_HANDOFF_SLOTS
  return max(HANDOFF_SLOTS, compute_wgs)


def pipeline(config, head_dim, block_kv, pages_per_seq,
             fp8=False, group=ROWS) -> tuple[int, int, int]:
  """(compute warpgroups, K ring depth, V ring depth): config's, else two
  warpgroups where their registers, rings and output tiles fit (even
  rings); V slots as `MosaicDecodeConfig.v_stages` says; then the deepest
  K ring (a multiple of the warpgroups, <= MAX_K_STAGES or two a
  warpgroup) that fits in shared memory."""
  cols = query_tile(group, True) if config.transposed else None

  def fits(wgs, k_stages, v_stages):
    return config_bytes(config, head_dim, block_kv, pages_per_seq, fp8,
                        group, wgs, k_stages, v_stages) <= MAX_SHARED_MEMORY
  wgs = config.compute_wgs
  if wgs is None:   # Three warpgroups leave 168 registers a thread: the
    # accumulator (d/2), the scores (block_kv/2) and the P carried a step
    # (block_kv/4) fit up to d + block_kv = 192 (H200: 2.7 vs 3.5 TB/s
    # at 128 + 128, where they spill). Transposed, a thread holds
    # (d + 3 block_kv) N / 128 of them (accumulator, scores, row-sum tile,
    # the f32 P carried a step): 32 at N = 8, d = block_kv = 128.
    # Transposed, two warpgroups also need pages of >= 8192 elements
    # (4096 for FP8, whose widening lengthens a page's work): the
    # running max is handed over every block, which a small page's work
    # does not cover (H200, bf16 d64 / 64 keys, `decode_v_issue_h200.log`:
    # one warpgroup 7 % faster dense and 1-2 % when skipping 89-99 %; H100,
    # FP8 d64 / 64 keys, `decode_fp8_pages_h100.log`: two 22 % faster
    # dense, 15 % at the λ = 0 check, level when skipping 97-99 %).
    if config.transposed:
      small = ((head_dim + 3 * block_kv) * cols <= 96 * 128
               and block_kv * head_dim >= (4096 if fp8 else 8192))
    else:
      small = head_dim + block_kv <= 192
    # Three, transposed at head_dim 64 for up to 8 query columns, FP8
    # pages of <= 128 keys and 16-bit pages of 64: the running max then
    # goes round three warpgroups, so each has two other blocks' work to
    # cover its wait for it (`decode_wgs3_d64{,_fp8}_h200.log`, against
    # the default: FP8 pages of 64 keys 16 % faster dense and 17 % when
    # skipping 98 %, of 128 keys 5 % dense, 15 % at the λ = 0 check, 14 %
    # when skipping 97 %; 16-bit pages of 64 keys 3 % slower dense, 18 %
    # faster at the check and 11 % when skipping; 16-bit pages of 128 keys
    # 5 % slower, so they keep two). FP8 at head_dim 128 keeps two until
    # an H200 says (H100, `decode_wgs3_d128_fp8_chunks_h100.log`: three
    # level dense and at the check, 9-12 % faster skipping 92-95 %).
    three = (config.transposed and head_dim == 64 and cols <= 8
             and block_kv <= (128 if fp8 else 64))

    def multiple_of(n):
      return all(s is None or s % n == 0
                 for s in (config.k_stages, config.v_stages))
    if three and multiple_of(3) and fits(3, config.k_stages or 3,
                                         config.v_stages or 3):
      wgs = 3
    else:
      wgs = 2 if (small and multiple_of(2)
                  and fits(2, config.k_stages or 2,
                           config.v_stages or 2)) else 1
  k_min = config.k_stages or max(2, wgs)
  if config.v_stages is not None:
    v_stages = config.v_stages
  elif config.compute_issues_v:   # a slot a warpgroup for the block in
    # flight and one for each block decided ahead (copied at its
    # decision), if they fit
    deepest = ((config.decide_ahead + 1) * wgs if config.transposed
               else 2 * wgs)
    v_stages = next((v for v in (deepest, 2 * wgs)
                     if fits(wgs, k_min, v)), max(wgs, 2))
  else:
    v_stages = max(2, wgs)
  if config.k_stages is not None:
    return wgs, config.k_stages, v_stages
  depth = k_min
  while (depth + wgs <= max(MAX_K_STAGES, 2 * wgs)
         and fits(wgs, depth + wgs, v_stages)):
    depth += wgs
  return wgs, depth, v_stages


def table_window(pages_per_seq: int, num_splits: int, anchors: bool) -> int:
  """Rows of TABLE_ROW page numbers that hold one split's blocks at any
  alignment, where they and (`anchors`) the anchor blocks' two rows are
  fewer than the whole table's; else 0 (the program holds the whole
  table)."""
  whole = -(-pages_per_seq // TABLE_ROW)
  per_split = -(-pages_per_seq // num_splits)   # `_split_range`'s at most
  window = -(-per_split // TABLE_ROW) + 1
  return window if window + ANCHOR_TABLE_ROWS * anchors < whole else 0


def held_table_pages(pages_per_seq: int, window: int,
                     anchor_rows: int) -> int:
  """Page numbers a program holds in shared memory: `window` rows (from
  `table_window`) and `anchor_rows` more, else (window 0) the table."""
  if not window:
    return -(-pages_per_seq // TABLE_ROW) * TABLE_ROW
  return (window + anchor_rows) * TABLE_ROW


def fits(config, head_dim, block_kv, pages_per_seq, fp8=False,
         group=ROWS) -> bool:
  """Whether `config`'s pipeline (`pipeline`) fits in shared memory."""
  return config_bytes(
      config, head_dim, block_kv, pages_per_seq, fp8, group,
      *pipeline(config, head_dim, block_kv, pages_per_seq, fp8, group)
  ) <= MAX_SHARED_MEMORY


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


def item_coords(t, heads: int, num_splits: int, split_major: bool):
  """(head, split) of a persistent kernel's item t, head counting the
  (sequence, KV head) pairs sequence-major. Python ints or int32 arrays."""
  if split_major:
    return t % heads, t // heads
  return t // num_splits, t % num_splits


def merges_follow_their_splits(programs: int, heads: int, num_splits: int,
                               split_major: bool) -> bool:
  """Whether programs run one after another, each its rounds in order
  (Pallas' interpreter), reach every head's last split after its others:
  on a program of higher index, or later on the same one."""
  place = {}
  for t in range(heads * num_splits):
    place[item_coords(t, heads, num_splits, split_major)] = (
        t % programs, t // programs)
  return all(place[head, split] < place[head, num_splits - 1]
             for head in range(heads) for split in range(num_splits - 1))


def persistent_programs(programs: int, heads: int, num_splits: int,
                        merged: bool, split_major: bool,
                        interpret: bool) -> int:
  """Programs a persistent kernel runs: `programs`, at most the items
  (`heads` (sequence, KV head) pairs times `num_splits`) and (on a GPU
  whose SM count jax reports) the SMs, as every program must be resident.
  In interpret mode, which runs the programs one after another, where the
  kernel merges (`merged`) the most at which every head's other splits
  run before its last (1 always does)."""
  programs = min(programs, heads * num_splits)
  if interpret:
    if not merged or num_splits == 1:
      return programs
    return next(p for p in range(programs, 0, -1)
                if merges_follow_their_splits(p, heads, num_splits,
                                              split_major))
  sms = getattr(jax.devices()[0], "core_count", None)
  return min(programs, sms) if sms else programs


class _Scratch(NamedTuple):
  """Shared memory of one program (C = compute warpgroups; R = the query
  tile, ROWS, or the transposed build's N columns)."""
  q: Any         # [R, d] the group's query heads, zero rows below
  k: Any         # [k_stages, block_kv, d] K ring
  out: Any       # f32 [C, R, d] (transposed: [C, d, R]) output tiles, over
                 # the K ring at the end (persistent: over the V ring)
  v: Any         # [v_stages, block_kv, d] V ring
  table: Any     # int32 [T, rows, TABLE_ROW] (T = 1, persistent 2: round
                 # r's in r % 2) the sequence's pages: every
                 # row, or (`table_window`) the window's rows, then those
                 # of blocks 0 and n_blocks - 1 (None for a contiguous
                 # cache)
  params: Any    # [C + 1, CONTROL_HALVES] (q's dtype) the control row,
                 # one copy per warpgroup (`control_word`)
  votes: Any     # int32 [k_stages] keep (1) / skip (0), by block % k_stages
                 # (None with compute_issues_v)
  handoff: Any   # f32 [H, R] running max after block j, in slot j % H
                 # (H = max(2, C)); `hand_over_block_max`: the max of K
                 # position j (H = 6)
  ml: Any        # f32 [C, 2, R] row max (log2 units), row sum
  stats: Any     # int32 [C, SLOT] skipped, visited
  p: Any         # interpret mode: [C, ROWS, block_kv] P through memory;
                 # transposed: [C, A + 1, R, block_kv] Pᵀ of a warpgroup's
                 # i-th block in slot i % (A + 1), A = `ahead`
  wide: Any      # FP8: f16 [C, block_kv, d] widened page per warpgroup
  rows: Any      # `initial_max`: f32 [R] the given start (log2 units)
  vote: Any      # `one_barrier_vote`: f32 [C, mosaic_vote.ANY_WORDS]
  colred: Any    # transposed: f32 [C, mosaic_vote.column_scratch_words(R)]
  # The in-kernel merge (`merge_in_kernel`; S = merge slots):
  merge_acc: Any    # f32 [S, R, d] (transposed [S, d, R]) partials' tiles,
                    # over the K ring (persistent: the V ring)
  # Over the V ring:
  merge_ml: Any     # f32 [S, merge_stat_rows(R), R] their row max (row 0)
                    # and row sums (row 1)
  merge_stats: Any  # int32 [S, SLOT] their block counts
  staged: Any       # [R, d] the output rows in the output dtype
  ticket: Any       # persistent, on a GPU: int32 [SLOT], word 0 the
                    # item's place among its splits to finish
                    # (`mosaic_merge.take_ticket`)


class _Barriers(NamedTuple):
  q: Any
  table: Any     # persistent: [2], a table buffer each
  table_free: Any  # persistent: [2] the compute warpgroups are done with
                   # a table buffer (None otherwise)
  params: Any    # [C + 1]
  k: Any         # [k_stages] K copied
  k_free: Any    # [k_stages] K slot read
  v: Any         # [v_stages] V copied (compute_issues_v=False: or skipped,
                 # an empty arrival)
  v_free: Any    # [v_stages] (None with compute_issues_v)
  votes: Any     # [k_stages] (None with compute_issues_v)
  handoff: Any   # [H]
  done: Any      # every compute warpgroup has read its last K page
  ring_free: Any  # persistent: every compute warpgroup is done with the
                  # round's output and merge buffers (over the V ring)
  rows: Any      # `initial_max` only
  written: Any       # merge: this program's partials are in global memory
  pair: Any          # one part a split (`merge_warpgroups`): warpgroup
                     # 1's partial is in shared memory for warpgroup 0
  merged: Any        # merge: ([S], [S], [S]) a partial's tile, row
                     # statistics and counts copied in
  merge_free: Any    # merge: [S] its slot read


def control_block(q, words, rows: int):
  """The kernel's control block: one array, so one XLA fusion before the
  call, instead of the query's padding, the parameters and the
  semaphores' zeros each in their own.

  Args:
    q: [b, hkv, g, d] 16-bit query heads of each KV head.
    words: int32 [b, hkv, len(CONTROL_WORDS)] (floats by their bits).
    rows: the query tile (>= g).

  Returns:
    [b, hkv, rows + CONTROL_ROWS, d] in q's dtype: q with zero rows to
    `rows`, then a row of the words (word i's byte j at 4 i + j, as a
    float; 0 elsewhere, the semaphore at SEMAPHORE_AT among it), then zero
    rows.
  """
  b, hkv, g, d = q.shape
  octets = (words[..., None] >> jnp.arange(0, 32, 8, dtype=jnp.int32)) & 0xFF
  row = octets.reshape(b, hkv, 1, -1).astype(q.dtype)   # [b, hkv, 1, 4W]
  row = jnp.pad(row, ((0, 0), (0, 0), (0, CONTROL_ROWS - 1),
                      (0, d - row.shape[-1])))
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
  return jnp.concatenate([q, row], axis=2)


def control_word(row_ref, i: int):
  """Word i (int32) of a control row in shared memory ([CONTROL_HALVES])."""
  word = jnp.int32(0)
  for j in range(4):
    octet = row_ref[4 * i + j].astype(jnp.float32).astype(jnp.int32)
    word = word | (octet << (8 * j))
  return word


def float_from_bits(word):
  """The float32 whose bits are the int32 scalar `word`, by exact
  arithmetic (Mosaic's lane lowering bitcasts arrays, not scalars):
  normal numbers exactly, subnormals as ±0, ±inf and NaN as themselves
  (a NaN log λ, from a traced λ < 0, keeps every block, as a NaN compares
  false)."""
  biased = (word >> 23) & 0xFF
  # |value| = significand * 2^e, the significand < 2^24 (exact in f32).
  magnitude = ((word & 0x7FFFFF) | 0x800000).astype(jnp.float32)
  e = biased - 150
  down = e < 0
  n = jnp.abs(e)
  # 2^e a power of two at a time, each step exact and every partial
  # product a normal float (bit 7 only for e <= -128, as 2^-64 twice).
  for k in range(7):
    factor = jnp.where(down, 2.0 ** -(2 ** k), 2.0 ** (2 ** k))
    magnitude = magnitude * jnp.where(((n >> k) & 1) == 1, factor, 1.0)
  half = jnp.where(((n >> 7) & 1) == 1, 2.0 ** -64, 1.0)
  magnitude = magnitude * half * half
  value = jnp.where(biased == 0, 0.0,
                    jnp.where(biased == 255, jnp.inf, magnitude))
  value = jnp.where(word < 0, -value, value)
  return jnp.where((biased == 255) & ((word & 0x7FFFFF) != 0), jnp.nan,
                   value)


class _Item(NamedTuple):
  """One (sequence, KV head, split) item as a program walks it."""
  batch: Any
  kv_head: Any
  split: Any
  kv_len: Any
  start: Any       # the split's first block
  n_blocks: Any    # the sequence's blocks
  n: Any           # the split's blocks
  n_anchor: Any    # anchor blocks first in the K stream (0 or 2)
  n_k: Any         # K stream positions: n_anchor + n
  table: Any       # this item's table buffer ([rows, TABLE_ROW]) or None
  table_bar: Any   # its barrier (None without a table)
  first_row: Any   # the window's first table row (window only)
  last_row: Any    # the last block's table row (window only)


def _kernel(ctrl_ref, k_ref, v_ref, table_ref, init_ref,
            acc_ref, ml_ref, stats_ref, merged_refs, sem, sc: _Scratch,
            bars: _Barriers, *, sm_scale,
            block_kv, head_dim, dtype, group, num_splits, skip_enabled,
            anchored, k_stages, v_stages, compute_wgs, split_registers,
            transposed, kv_heads, merge_slots, pages_per_seq,
            compute_issues_v,
            block_max_handoff, fp8_k_registers, ahead,
            window, anchor_rows, heads_first, programs, split_major,
            interpret):
  # ctrl_ref [b, hkv, R + CONTROL_ROWS, d] (`control_block`: the query
  # tile, then the words kv_len, log2 λ and, FP8 pages, the K and V
  # scales); k_ref, v_ref [n_pages, block_kv, hkv, d] ("NHD"), or with
  # `heads_first` [n_pages, hkv, block_kv, d] ("HND"); table_ref int32 [b,
  # table_rows, TABLE_ROW] (None: a contiguous cache, pages_per_seq pages
  # a sequence; a program holds `window` rows of it from its split's
  # first block's, else all); init_ref (`initial_max`, skip build only,
  # else None) f32 [b, hkv, R]. Outputs, one partial per
  # (split, compute warpgroup): acc_ref f32 [b, hkv, splits * C, R, d]
  # (transposed: [..., d, R]), ml_ref f32 [b, hkv, splits * C, 2, R] (row
  # max in log2 units, row sum), stats_ref int32 [b, hkv, splits * C, SLOT]
  # ([skipped, visited]). merged_refs (`merge_in_kernel`, else None):
  # out [b, hkv * group, d] normalized, in the output dtype; ml f32 [b,
  # hkv, 2, R] of the merged rows; counts int32 [b, hkv, SLOT] ([skipped,
  # visited] over the splits). sem (on a GPU with num_splits > 1, else
  # None): "control", the semaphore word of the control block, or int32
  # semaphores [b * hkv] (`global_semaphores`); every other split's
  # warpgroups signal it once their partials are written. programs: None
  # (the grid is (split, kv_heads, batch): one item a program) or P (the
  # grid is (P,): a persistent kernel, items split-major or (not
  # `split_major`) split-minor, program p's round r is item p + r P).
  n_wgs = compute_wgs
  wg = lax.axis_index("wg")
  fp8 = sc.wide is not None
  rows = sc.q.shape[0]
  persistent = programs is not None
  control_semaphore = isinstance(sem, str)
  if persistent:
    program = lax.axis_index("program")
    n_heads = acc_ref.shape[0] * kv_heads
    n_items = n_heads * num_splits
    n_rounds = lax.div(n_items - program + programs - 1, programs)

  def item_of(r):
    """(batch, kv_head, split) of this program's round r."""
    if not persistent:
      return (lax.axis_index("batch"), lax.axis_index("kv_heads"),
              lax.axis_index("split"))
    head, split = item_coords(program + r * programs, n_heads, num_splits,
                              split_major)
    return lax.div(head, kv_heads), lax.rem(head, kv_heads), split

  def over_rounds(body, carry):
    """carry = body(r, carry) over this program's rounds."""
    if not persistent:
      return body(jnp.int32(0), carry)
    return lax.fori_loop(0, n_rounds, body, carry)

  def next_round(r, *issues):
    """Each issue(r + 1) where this program has a round r + 1 (persistent),
    after a proxy fence: this warpgroup's reads of what the copies
    overwrite are done first."""
    if persistent:
      @pl.when(r + 1 < n_rounds)
      def _():
        plgpu.commit_smem()
        for issue in issues:
          issue(r + 1)

  def issue_params(r):
    """TMA of round r's control row into this warpgroup's own slot."""
    batch, kv_head, _ = item_of(r)
    plgpu.copy_gmem_to_smem(
        ctrl_ref.at[batch, kv_head, rows, pl.ds(0, CONTROL_HALVES)],
        sc.params.at[wg], bars.params.at[wg])

  def read_params():
    """This warpgroup's control row, once copied."""
    plgpu.barrier_wait(bars.params.at[wg])
    return sc.params.at[wg]

  def item_view(r, kv_len) -> _Item:
    """Round r's item and the blocks it streams."""
    batch, kv_head, split = item_of(r)
    start, end, n_blocks = _split_range(kv_len, split, num_splits, block_kv)
    n = jnp.maximum(end - start, 0)               # this split's blocks
    # "anchored": the sequence's first and last blocks come first in the K
    # stream (scored, never accumulated); none for an empty sequence.
    n_anchor = (jnp.where(n_blocks > 0, 2, 0) if anchored and skip_enabled
                else jnp.int32(0))
    table = table_bar = first_row = last_row = None
    if sc.table is not None:   # persistent: round r's of two buffers
      slot = lax.rem(r, 2) if persistent else 0
      table = sc.table.at[slot]
      table_bar = bars.table.at[slot] if persistent else bars.table
    if window:   # the window's first row: never past the table's end
      first_row = jnp.clip(start // TABLE_ROW, 0,
                           table_ref.shape[1] - window)
      last_row = jnp.maximum(n_blocks - 1, 0) // TABLE_ROW
    return _Item(batch, kv_head, split, kv_len, start, n_blocks, n,
                 n_anchor, n_anchor + n, table, table_bar, first_row,
                 last_row)

  def k_block(it, kp):
    """Logical block of K stream position kp."""
    anchor = jnp.where(kp == 0, 0, it.n_blocks - 1)
    return jnp.where(kp < it.n_anchor, anchor, it.start + kp - it.n_anchor)

  def k_slot(kp):
    return lax.rem(kp, jnp.array(k_stages, kp.dtype))

  def v_slot(vp):
    return lax.rem(vp, jnp.array(v_stages, vp.dtype))

  def page(it, block):
    """Page of logical block `block` (the item's split's, or an anchor)."""
    if it.table is None:   # a contiguous cache
      return it.batch * pages_per_seq + block
    row = block // TABLE_ROW
    if window:   # in the window, else an anchor: block 0's row or the last
      row = row - it.first_row
      if anchor_rows:
        row = jnp.where((row >= 0) & (row < window), row,
                        jnp.where(block < TABLE_ROW, window, window + 1))
    return it.table[row, block % TABLE_ROW]

  def head_page(it, ref, block):
    """[block_kv, d]: this KV head's rows of block `block`'s page (rows
    of d apart from the other heads' in NHD pages, one run in HND)."""
    if heads_first:
      return ref.at[page(it, block), it.kv_head]
    return ref.at[page(it, block), pl.ds(0, block_kv), it.kv_head]

  def issue_v(it, vp):
    """TMA of block vp's V page into its slot."""
    slot = v_slot(vp)
    plgpu.copy_gmem_to_smem(head_page(it, v_ref, it.start + vp),
                            sc.v.at[slot], bars.v.at[slot])

  def item_semaphore(it):
    """The merge's semaphore of the item's (sequence, KV head): the
    control block's word (inline Mosaic), a `pl.get_global` one, or
    None."""
    if control_semaphore:
      return ctrl_ref.at[it.batch, it.kv_head, rows, pl.ds(SEMAPHORE_AT, 2)]
    if sem is not None:
      return sem.at[it.batch * kv_heads + it.kv_head]
    return None

  def merge_signal(it):
    """This warpgroup's partial is written: one count for the merger."""
    if control_semaphore:
      mosaic_merge.semaphore_signal(item_semaphore(it))
    else:
      plgpu.semaphore_signal(item_semaphore(it), 1, memory_scope="gpu")

  def merge_wait(it, count):
    """Until `count` partials are signalled (taking them: the semaphore is
    0 again when the kernel ends)."""
    if control_semaphore:
      mosaic_merge.semaphore_wait(item_semaphore(it), count)
    else:
      plgpu.semaphore_wait(item_semaphore(it), count, memory_scope="gpu")

  # The query axis of the score tile (0: [R, block_kv]; transposed 1:
  # [block_kv, R]) and of the output tile ([R, d], or [d, R]).
  q_axis = 1 if transposed else 0
  row_layout = plgpu.Layout.WGMMA.reduce(1 - q_axis)
  acc_shape = (head_dim, rows) if transposed else (rows, head_dim)

  def over_rows(x, shape):
    """A per-query vector broadcast over a tile's other axis."""
    return lax.broadcast_in_dim(x, shape, [q_axis])

  # One split: its program merges its warpgroups' tiles in shared memory;
  # else the last split merges every part, streamed through the merge ring
  # (by the memory warpgroup; persistent: by the merging warpgroup itself,
  # so that its memory warpgroup streams on).
  local_merge = num_splits == 1
  self_load = persistent and not local_merge
  n_parts = acc_ref.shape[2]
  # `merge_warpgroups`: warpgroup 0 combines the warpgroups' partials and
  # writes one part a split.
  part_wgs = n_parts // num_splits
  pair_merge = part_wgs < n_wgs
  # Persistent, with the control block's counter: the last split to finish
  # merges (a ticket), so no program waits for another's items; else the
  # last split waits for the others.
  ticketed = sc.ticket is not None

  def copy_part(it, p):
    """Part p's tile, row statistics and counts into merge slot p % S."""
    slot = lax.rem(p, merge_slots)
    for src, dst, copied in zip(
        (acc_ref, ml_ref, stats_ref),
        (sc.merge_acc.at[slot], sc.merge_ml.at[slot, pl.ds(0, 2)],
         sc.merge_stats.at[slot]), bars.merged):
      plgpu.copy_gmem_to_smem(src.at[it.batch, it.kv_head, p], dst,
                              copied.at[slot])

  def wait_for_parts(it):
    """Until every split's partials of the item are in global memory (this
    program's by a barrier, the others' by the semaphore)."""
    plgpu.barrier_wait(bars.written)
    if sem is not None:
      merge_wait(it, (num_splits - 1) * part_wgs)
    mosaic_merge.async_proxy_fence(interpret=interpret)

  def combine_part(carry, part):
    """(acc, l, m, skipped, visited) with a part's joined, at their
    running max (acc and l unnormalized)."""
    acc, l, m, skipped, visited = carry
    acc_p, m_p, l_p, skipped_p, visited_p = part
    m_new = jnp.maximum(m, m_p)     # -inf where no part kept a key yet
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha, beta = jnp.exp2(m - m_safe), jnp.exp2(m_p - m_safe)
    return (acc * over_rows(alpha, acc_shape)
            + acc_p * over_rows(beta, acc_shape),
            l * alpha + l_p * beta, m_new, skipped + skipped_p,
            visited + visited_p)

  def load_part(tiles, ml, stats):
    """A part's (tile, row max, row sums, skipped, visited) from shared
    memory."""
    return (plgpu.load(tiles, layout=plgpu.Layout.WGMMA, optimized=False),
            plgpu.load(ml.at[0], layout=row_layout, optimized=False),
            plgpu.load(ml.at[1], layout=row_layout, optimized=False),
            stats[0], stats[1])

  def merge_splits(it, out_ref, merged_ml_ref, counts_ref):
    """The last split's warpgroup 0: every part of this (sequence, KV
    head), combined online at their running max as the splits' own blocks
    are, normalized; writes the output rows, their row max and sums, and
    the block counts."""
    if self_load:
      if ticketed:   # the ticket ordered every split's partials first
        mosaic_merge.async_proxy_fence(interpret=interpret)
      else:
        wait_for_parts(it)
      for p in range(min(merge_slots, n_parts)):
        copy_part(it, jnp.int32(p))

    def read_part(p):
      """Part p's tile, row max, row sums, block counts."""
      if local_merge:   # this program's warpgroup p
        tiles, ml, stats = sc.out.at[p], sc.ml.at[p], sc.stats.at[p]
      else:
        slot = lax.rem(p, merge_slots)
        for copied in bars.merged:
          plgpu.barrier_wait(copied.at[slot])
        tiles, ml, stats = (sc.merge_acc.at[slot], sc.merge_ml.at[slot],
                            sc.merge_stats.at[slot])
      part = load_part(tiles, ml, stats)
      if self_load:   # every thread has read the slot: refill it
        mosaic_merge.warpgroup_barrier(interpret=interpret)
        pl.when(p + merge_slots < n_parts)(
            lambda: copy_part(it, p + merge_slots))
      elif not local_merge:
        plgpu.barrier_arrive(bars.merge_free.at[slot])
      return part

    def combine(p, carry):
      return combine_part(carry, read_part(p))

    if local_merge:   # both warpgroups' tiles are in shared memory
      plgpu.barrier_wait(bars.written)
    zeros = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.zeros(acc_shape, jnp.float32),
                            plgpu.Layout.WGMMA)
    acc, l, m, skipped, visited = lax.fori_loop(
        0, n_parts, combine,
        (acc, zeros, zeros - jnp.inf, jnp.int32(0), jnp.int32(0)))
    out = acc * over_rows(1.0 / jnp.where(l > 0, l, 1.0),   # 0 if none
                          acc_shape)                         # kept
    # Every thread has read the parts (this program's own in sc.out, sc.ml
    # and sc.stats, which the stores below overwrite).
    mosaic_merge.warpgroup_barrier(interpret=interpret)
    sc.ml.at[0, 0][...] = m
    sc.ml.at[0, 1][...] = l
    sc.stats[0, 0] = skipped
    sc.stats[0, 1] = visited
    if transposed:   # [d, R] through the (free) output tile
      sc.out.at[0][...] = out
      mosaic_merge.transpose_cast(sc.out.at[0], sc.staged,
                                  interpret=interpret)
    else:
      sc.staged[...] = out.astype(sc.staged.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        sc.staged.at[pl.ds(0, group)],
        out_ref.at[it.batch, pl.ds(it.kv_head * group, group)])
    plgpu.copy_smem_to_gmem(sc.ml.at[0], merged_ml_ref.at[it.batch,
                                                          it.kv_head])
    plgpu.copy_smem_to_gmem(sc.stats.at[0], counts_ref.at[it.batch,
                                                          it.kv_head])
    plgpu.wait_smem_to_gmem(0)

  def load_partials(it):
    """The last split's memory warpgroup (not persistent): once every
    split's partials are written, streams them into the merge ring, part
    by part."""
    wait_for_parts(it)

    @pl.loop(0, n_parts)
    def _parts(p):
      @pl.when(p >= merge_slots)
      def _():
        plgpu.barrier_wait(bars.merge_free.at[lax.rem(p, merge_slots)])
      copy_part(it, p)

    @pl.loop(jnp.maximum(n_parts - merge_slots, 0), n_parts)
    def _drain(p):
      plgpu.barrier_wait(bars.merge_free.at[lax.rem(p, merge_slots)])

  @pl.when(wg < n_wgs)
  def _compute():
    # Block vp (and K stream position vp + n_anchor) belongs to warpgroup
    # vp % C (an anchor, K position a, is block a - 2); with rings of a
    # multiple of C slots each slot has one reader, so every warpgroup
    # waits on each of its barriers' phases in order.
    if split_registers:
      plgpu.set_max_registers(REGISTERS[n_wgs][0], action="increase")
    w = wg

    def issue_query(r):
      """Warpgroup 0: TMA of round r's query tile (and `initial_max`)."""
      batch, kv_head, _ = item_of(r)
      plgpu.copy_gmem_to_smem(ctrl_ref.at[batch, kv_head, pl.ds(0, rows)],
                              sc.q, bars.q)
      if sc.rows is not None:   # `initial_max`: read before the first vote
        plgpu.copy_gmem_to_smem(init_ref.at[batch, kv_head], sc.rows,
                                bars.rows)

    pl.when(w == 0)(lambda: issue_query(jnp.int32(0)))
    issue_params(jnp.int32(0))
    wide = p_smem = None
    # FP8 K widened in registers: a whole page, or with three compute
    # warpgroups and pages of more than 8192 elements (64 registers a
    # thread at 128 x 128), WIDEN_KEYS keys at a time, which fit their
    # registers (`REGISTERS`).
    k_chunk = (WIDEN_KEYS if n_wgs > 2 and block_kv * head_dim > 8192
               else block_kv)
    if fp8:
      wide = sc.wide.at[w]
    if sc.p is not None:
      p_smem = sc.p.at[w]

    def widen(page_ref):
      """An FP8 page into this warpgroup's f16 tile (exact), WIDEN_KEYS
      keys at a time."""
      for keys in range(0, block_kv, WIDEN_KEYS):
        chunk = pl.ds(keys, WIDEN_KEYS)   # (block_kv: a multiple of 64)
        page8 = plgpu.load(page_ref.at[chunk],
                           layout=plgpu.Layout.WGMMA_8BIT, optimized=False)
        wide.at[chunk][...] = page8.astype(jnp.float16)
      plgpu.commit_smem()
      return wide
    tile = (block_kv, rows) if transposed else (rows, block_kv)
    key_iota = plgpu.broadcasted_iota(jnp.int32, tile, 1 - q_axis,
                                      layout=plgpu.Layout.WGMMA)
    minus_inf = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32),
                                  row_layout)

    def key_reduce(x, op):
      """max / sum over the keys of a score tile: within each warp for
      rows; transposed, across the warps, through this warpgroup's
      scratch (every warp then holds the same result)."""
      if not transposed:
        return x.max(axis=1) if op == "max" else x.sum(axis=1)
      return mosaic_vote.warpgroup_column_reduce(
          x, op, sc.colred.at[w], interpret=interpret)

    n_handoff = sc.handoff.shape[0]

    def hand_over(j, m):
      """Publishes m for j in slot j % n_handoff: the running max after
      block j (-1: the anchors); with `block_max_handoff`, the max of K
      stream position j."""
      slot = lax.rem(j + n_handoff, n_handoff)
      sc.handoff.at[slot][...] = m
      plgpu.barrier_arrive(bars.handoff.at[slot])

    def take_over(j):
      """What the other warpgroup published for j."""
      slot = lax.rem(j + n_handoff, n_handoff)
      plgpu.barrier_wait(bars.handoff.at[slot])
      return plgpu.load(sc.handoff.at[slot], layout=row_layout)

    def add_product(acc, a, b):
      """acc + a·b by wgmma; in interpret mode, which takes no accumulator
      as input, into a fresh one added to acc."""
      def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
      if not interpret:
        return pl.run_state(product)(plgpu.ACC.init(acc))

      def fresh(acc_ref):
        product(acc_ref)
        return acc_ref[...]
      return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

    zero_tile = plgpu.layout_cast(jnp.zeros(tile, jnp.float32),
                                  plgpu.Layout.WGMMA)
    if transposed:   # (P in shared memory, the row-sum tile)
      no_probs = (None, zero_tile)
    else:
      no_probs = (zero_tile.astype(dtype),
                  plgpu.layout_cast(jnp.zeros((rows,), jnp.float32),
                                    row_layout))
    # With compute_issues_v, V of block vp goes into slot vp % v_stages
    # (this warpgroup's alone: v_stages is a multiple of C) once block
    # vp - v_stages is accumulated: with v_stages >= (ahead + 1) C that was
    # in an earlier step, so the copy starts at the decision; with
    # v_stages = C (ahead 1) it is the block accumulated in this step, so
    # after it.
    early_v = compute_issues_v and v_stages >= (ahead + 1) * n_wgs
    assert ahead == 1 or early_v
    handing = skip_enabled and n_wgs > 1

    def item(r, carry):
      """Round r's item: its blocks, then its partial (and the merge)."""
      params = read_params()
      kv_len = control_word(params, 0)
      scale = sm_scale * LOG2E
      # log2 λ, for the votes (the memory warpgroup needs only kv_len).
      log2_thr = (float_from_bits(control_word(params, 1)) if skip_enabled
                  else None)
      v_scale = None
      if fp8:   # this warpgroup's control row holds the scales
        scale = scale * float_from_bits(control_word(params, 2))
        v_scale = float_from_bits(control_word(params, 3))
      it = item_view(r, kv_len)
      start, n, n_anchor = it.start, it.n, it.n_anchor
      plgpu.barrier_wait(bars.q)
      if compute_issues_v and it.table is not None:   # the pages of the V
        plgpu.barrier_wait(it.table_bar)              # copies it issues

      def scores(kp):
        """Scaled scores (log2 units) of K position kp, [R, block_kv]
        (transposed: [block_kv, R]), keys past kv_len at -inf; frees its K
        slot."""
        slot = k_slot(kp)
        plgpu.barrier_wait(bars.k.at[slot])
        k_tile = sc.k.at[slot]

        def qk(k_tile):
          """The score tile of these keys (a whole page, or a chunk of
          one in registers)."""
          def product(acc_ref):
            if transposed:   # K·qᵀ
              plgpu.wgmma(acc_ref, k_tile, sc.q.transpose((1, 0)))
            else:
              plgpu.wgmma(acc_ref, sc.q, k_tile.transpose((1, 0)))
            return acc_ref[...]
          shape = ((k_tile.shape[0], rows) if transposed
                   else (rows, k_tile.shape[0]))
          return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))

        if fp8 and fp8_k_registers:   # widened in registers, wgmma's A,
          # k_chunk keys at a time, each multiplied before the next loads
          chunks = []
          for first in range(0, block_kv, k_chunk):
            keys = pl.ds(first, k_chunk)
            k8 = plgpu.load(k_tile.at[keys],
                            layout=plgpu.Layout.WGMMA_UPCAST_2X,
                            optimized=False)
            k16 = plgpu.layout_cast(k8.astype(jnp.float16),
                                    plgpu.Layout.WGMMA)
            if interpret:   # whose wgmma takes no register operand
              wide.at[keys][...] = k16
              plgpu.commit_smem()
              k16 = wide.at[keys]
            if first + k_chunk == block_kv:   # every key is in registers
              plgpu.barrier_arrive(bars.k_free.at[slot])
            chunks.append(qk(k16))
          s = jnp.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]
        elif fp8:   # The slot is free once widened.
          k16 = widen(k_tile)
          plgpu.barrier_arrive(bars.k_free.at[slot])
          s = qk(k16)
        else:
          s = qk(k_tile)
          plgpu.barrier_arrive(bars.k_free.at[slot])
        keys = key_iota + k_block(it, kp) * block_kv
        return jnp.where(keys < kv_len, s * scale, -jnp.inf)

      # The running max before the split's first block: the anchors' row
      # max ("anchored"; with two warpgroups each scores one anchor and the
      # second hands its max to the first; handing block maxima, each hands
      # its own to the other, the first reading the second's at its first
      # block; with three, the anchors are blocks -2 and -1 of the running
      # max's chain, on warpgroups 1 and 2), else -inf.
      if anchored and skip_enabled:
        if n_wgs == 1:
          m0 = lax.fori_loop(0, n_anchor, lambda kp, m: jnp.maximum(
              m, key_reduce(scores(kp), "max")), minus_inf)
        elif n_wgs == 2:
          own = lax.cond(n_anchor > 0,
                         lambda: key_reduce(scores(w), "max"),
                         lambda: minus_inf)

          def exchange():   # both ways: each anchor is K position w
            hand_over(w, own)
            return lax.cond(w == 1, lambda: jnp.maximum(
                own, take_over(jnp.int32(0))), lambda: own)

          def first_anchor():
            pl.when(w == 1)(lambda: hand_over(jnp.int32(-1), own))
            return lax.cond(w == 0, lambda: jnp.maximum(
                own, take_over(jnp.int32(-1))), lambda: own)

          m0 = lax.cond(n_anchor > 0,
                        exchange if block_max_handoff else first_anchor,
                        lambda: own)
        else:
          def chain():   # -2 (warpgroup C - 2) -> -1 (C - 1) -> block 0
            first, second = w == n_wgs - 2, w == n_wgs - 1
            own = lax.cond(first | second, lambda: key_reduce(
                scores(w - (n_wgs - 2)), "max"), lambda: minus_inf)
            pl.when(first)(lambda: hand_over(jnp.int32(-2), own))
            m = lax.cond(second, lambda: jnp.maximum(
                own, take_over(jnp.int32(-2))), lambda: own)
            pl.when(second)(lambda: hand_over(jnp.int32(-1), m))
            return lax.cond(w == 0, lambda: take_over(jnp.int32(-1)),
                            lambda: m)

          m0 = lax.cond(n_anchor > 0, chain, lambda: minus_inf)
      else:
        m0 = minus_inf
      if sc.rows is not None:   # A given start: every split begins there.
        plgpu.barrier_wait(bars.rows)
        m0 = jnp.maximum(m0, plgpu.load(sc.rows, layout=row_layout,
                                        optimized=False))

      def probabilities(s, m, vp):
        """P = 2^(s - m) in the products' dtype, and its row sums: a kept
        block's weights at the running max m. Transposed, Pᵀ goes to
        shared memory (the B operand of Vᵀ·Pᵀ), slot i % (ahead + 1) for
        the warpgroup's i-th block, and the row sums stay per-thread: the
        f32 tile itself."""
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp2(s - over_rows(m_safe, s.shape))
        if transposed:
          slot = lax.rem(vp // n_wgs, ahead + 1)
          p_smem.at[slot].transpose((1, 0))[...] = p.astype(dtype)
          return None, p
        return p.astype(dtype), p.sum(axis=1)

      def accumulate(vp, pending, acc, l, m_acc):
        """Block vp (its P, row sums, the max they are taken at, and its
        decision): waits for its V phase, adds P·V if kept, frees the V
        slot (`compute_issues_v`: waits only for a kept block's copy, and
        the slot is this warpgroup's own, so nothing is freed). P rather
        than the f32 scores is what waits a step (64 rows: in registers,
        half of the scores'; transposed: Pᵀ in shared memory and its f32
        tile, for the row sums, in registers)."""
        p16, p_sum, m_p, keep = pending
        slot = v_slot(vp)
        if not compute_issues_v:   # copied, or its phase completed empty
          plgpu.barrier_wait(bars.v.at[slot])
        v_tile = sc.v.at[slot]

        def zero_past_end(v_tile):
          # Past kv_len a page may hold anything, NaN included: 0·NaN must
          # not reach the accumulator. WIDEN_KEYS keys at a time, those
          # holding a key past kv_len.
          for first in range(0, block_kv, WIDEN_KEYS):
            chunk = pl.ds(first, WIDEN_KEYS)

            @pl.when((start + vp) * block_kv + first + WIDEN_KEYS > kv_len)
            def _():
              v = plgpu.load(v_tile.at[chunk], layout=plgpu.Layout.WGMMA)
              keys = plgpu.broadcasted_iota(jnp.int32, v.shape, 0,
                                            layout=plgpu.Layout.WGMMA)
              keys = keys + (start + vp) * block_kv + first
              v_tile.at[chunk][...] = jnp.where(keys < kv_len, v,
                                                jnp.zeros_like(v))
          plgpu.commit_smem()

        def kept():
          if compute_issues_v:   # only a kept block's copy was issued
            plgpu.barrier_wait(bars.v.at[slot])
          tile = widen(v_tile) if fp8 else v_tile
          pl.when((start + vp + 1) * block_kv > kv_len)(
              lambda: zero_past_end(tile))
          alpha = jnp.exp2(m_acc - jnp.where(m_p == -jnp.inf, 0.0, m_p))
          acc_scaled = acc * over_rows(alpha, acc.shape)
          l_new = (l * (over_rows(alpha, l.shape) if transposed else alpha)
                   + p_sum)
          if transposed:   # Vᵀ·Pᵀ, Pᵀ written when block vp was decided
            p_tile = p_smem.at[lax.rem(vp // n_wgs, ahead + 1)].transpose(
                (1, 0))
            plgpu.commit_smem()
            acc_new = add_product(acc_scaled, tile.transpose((1, 0)),
                                  p_tile)
          elif interpret:   # P through shared memory
            p_smem[...] = p16
            plgpu.commit_smem()
            acc_new = add_product(acc_scaled, p_smem, tile)
          else:
            acc_new = add_product(acc_scaled, p16, tile)
          return acc_new, l_new, m_p

        out = lax.cond(keep, kept, lambda: (acc, l, m_acc))
        if not compute_issues_v:
          plgpu.barrier_arrive(bars.v_free.at[slot])
        return out

      def step(i, carry):
        """Scores and decides this warpgroup's i-th block vp, publishes
        the decision, takes its P if kept, then accumulates its block
        `ahead` steps back (whose V copy ran meanwhile)."""
        acc, l, m_acc, m, n_skipped, pending = carry
        vp = w + i * n_wgs
        s = scores(vp + n_anchor)
        m_blk = key_reduce(s, "max")
        if skip_enabled:
          if handing and block_max_handoff:   # its max to the other; the
            # max of K position kp - 1 from it: m is then the max over
            # every position before kp.
            kp = vp + n_anchor
            hand_over(kp, m_blk)
            m = lax.cond(kp == 0, lambda: m,
                         lambda: jnp.maximum(m, take_over(kp - 1)))
          elif handing:   # The running max after block vp - 1.
            m = lax.cond(vp == 0, lambda: m, lambda: take_over(vp - 1))
          # max over real rows of (block max - running max), from the
          # scores of visible keys; padded rows take no part. A split's
          # first block without anchors meets m = -inf: gap +inf, kept.
          real_rows = plgpu.broadcasted_iota(jnp.int32, (rows,), 0,
                                             layout=row_layout) < group
          gap = jnp.where(real_rows, m_blk - m, -jnp.inf)
          if transposed or sc.vote is None:   # transposed: every warp
            # holds every column (key_reduce), so a warp's own reduction
            # is uniform.
            keep = gap.max() >= log2_thr
          else:
            keep = mosaic_vote.warpgroup_any(
                gap, log2_thr, sc.vote.at[w], lax.rem(i, 2),
                interpret=interpret)
          if block_max_handoff:   # the same on the real rows: a skipped
            # block's max lies below m there (log λ < 0)
            m = jnp.maximum(m, m_blk)
          else:
            m = lax.cond(keep, lambda: jnp.maximum(m, m_blk), lambda: m)
          if handing and not block_max_handoff:
            hand_over(vp, m)
          if not compute_issues_v:
            sc.votes[k_slot(vp)] = keep.astype(jnp.int32)
            plgpu.barrier_arrive(bars.votes.at[k_slot(vp)])
          p16, p_sum = lax.cond(keep, lambda: probabilities(s, m, vp),
                                lambda: no_probs)
        else:
          keep = vp >= 0
          m = jnp.maximum(m, m_blk)
          p16, p_sum = probabilities(s, m, vp)
        if early_v:
          pl.when(keep)(lambda: issue_v(it, vp))
        acc, l, m_acc = lax.cond(
            i >= ahead,
            lambda: accumulate(vp - ahead * n_wgs, pending[0], acc, l,
                               m_acc),
            lambda: (acc, l, m_acc))
        if compute_issues_v and not early_v:   # into the slot just read
          pl.when(keep)(lambda: issue_v(it, vp))
        return (acc, l, m_acc, m, n_skipped + 1 - keep.astype(jnp.int32),
                (*pending[1:], (p16, p_sum, m, keep)))

      if persistent:   # the V ring, under the last round's output and
        # merge buffers, takes V copies once both warpgroups are done there
        pl.when(r > 0)(lambda: plgpu.barrier_wait(bars.ring_free))
      n_mine = lax.div(jnp.maximum(n - w + n_wgs - 1, 0), n_wgs)
      acc = plgpu.layout_cast(jnp.zeros(acc_shape, jnp.float32),
                              plgpu.Layout.WGMMA)
      l = zero_tile if transposed else plgpu.layout_cast(
          jnp.zeros((rows,), jnp.float32), row_layout)
      nothing = (*no_probs, minus_inf, n < 0)
      acc, l, m_acc, m, n_skipped, pending = lax.fori_loop(
          0, n_mine, step,
          (acc, l, minus_inf, m0, n * 0, (nothing,) * ahead))
      if handing:   # The last hand-over is for the next warpgroup.
        last = it.n_k - 1 if block_max_handoff else n - 1

        @pl.when((last >= 0) & (lax.rem(last + 1, n_wgs) == w))
        def _():
          take_over(last)
      for back, last_pending in enumerate(pending):   # the last `ahead`
        i = n_mine - ahead + back
        acc, l, m_acc = lax.cond(
            i >= 0,
            functools.partial(accumulate, w + i * n_wgs, last_pending, acc,
                              l, m_acc),
            lambda acc=acc, l=l, m_acc=m_acc: (acc, l, m_acc))

      # Every K copy has been read (by both warpgroups): the output tiles
      # reuse the K ring (persistent: the V ring, which no V copy of the
      # next round enters before `ring_free`; the next round's query and
      # control rows may be copied in, and its table buffer refilled for
      # the round after next).
      if n_wgs > 1:
        plgpu.barrier_arrive(bars.done)
        plgpu.barrier_wait(bars.done)
      next_round(r, issue_params, lambda r: pl.when(w == 0)(
          lambda: issue_query(r)))
      if persistent and it.table is not None:
        plgpu.barrier_arrive(bars.table_free.at[lax.rem(r, 2)])
      if transposed:   # the row sums' per-thread partials, summed
        l = key_reduce(l, "add")
      write_partial(it, acc if v_scale is None else acc * v_scale, m_acc,
                    l, n_skipped, n_mine)
      if persistent:   # done with the V ring's output and merge buffers
        plgpu.barrier_arrive(bars.ring_free)
      return carry

    def write_partial(it, acc, m_acc, l, n_skipped, n_mine):
      """This warpgroup's partial of the item, to global memory (merged
      with one split, kept in shared memory), then the merge where this
      program does it (stores waited for)."""
      def stage(tile, acc, m, l, skipped, visited):
        """A partial into shared memory slot `tile`, for the proxy."""
        sc.out.at[tile][...] = acc
        sc.ml.at[tile, 0][...] = m
        sc.ml.at[tile, 1][...] = l
        sc.stats[tile, 0] = skipped
        sc.stats[tile, 1] = visited
        plgpu.commit_smem()

      mine = (acc, m_acc, l, n_skipped, n_mine)
      if pair_merge:   # warpgroup 0 stages the joined partial only
        pl.when(w != 0)(lambda: stage(w, *mine))
      else:
        stage(w, *mine)
      if merged_refs is not None and local_merge:
        plgpu.barrier_arrive(bars.written)
        pl.when(w == 0)(lambda: merge_splits(it, *merged_refs))
        return

      def store(part, tile=w):
        plgpu.copy_smem_to_gmem(sc.out.at[tile],
                                acc_ref.at[it.batch, it.kv_head, part])
        plgpu.copy_smem_to_gmem(sc.ml.at[tile],
                                ml_ref.at[it.batch, it.kv_head, part])
        plgpu.copy_smem_to_gmem(sc.stats.at[tile],
                                stats_ref.at[it.batch, it.kv_head, part])
        plgpu.wait_smem_to_gmem(0)

      if pair_merge:   # warpgroup 0 joins the others' partials to its own
        pl.when(w != 0)(lambda: plgpu.barrier_arrive(bars.pair))

        @pl.when(w == 0)
        def _():
          plgpu.barrier_wait(bars.pair)
          carry = (acc, l, m_acc, n_skipped, n_mine)
          for other in range(1, n_wgs):
            carry = combine_part(carry, load_part(
                sc.out.at[other], sc.ml.at[other], sc.stats.at[other]))
          joined, l_joined, m_joined, skipped, visited = carry
          stage(0, joined, m_joined, l_joined, skipped, visited)
          store(it.split, tile=0)
      else:
        store(it.split * n_wgs + w)
      if merged_refs is None:
        return
      # The partial is in global memory: tell the merging program.
      mosaic_merge.async_proxy_fence(interpret=interpret)
      if ticketed:   # both partials stored, warpgroup 0 takes the ticket
        plgpu.barrier_arrive(bars.written)

        @pl.when(w == 0)
        def _():
          plgpu.barrier_wait(bars.written)
          mosaic_merge.take_ticket(item_semaphore(it), sc.ticket, num_splits)
          pl.when(sc.ticket[0] == num_splits - 1)(
              lambda: merge_splits(it, *merged_refs))
        return
      merger = it.split == num_splits - 1
      if sem is not None:   # every part's writer
        pl.when(~merger & ((w == 0) | (not pair_merge)))(
            lambda: merge_signal(it))
      pl.when(merger)(lambda: plgpu.barrier_arrive(bars.written))
      pl.when(merger & (w == 0))(lambda: merge_splits(it, *merged_refs))

    over_rounds(item, ())
    if persistent:   # the last round's
      plgpu.barrier_wait(bars.ring_free)

  @pl.when(wg == n_wgs)
  def _memory():
    if split_registers:
      plgpu.set_max_registers(REGISTERS[n_wgs][1], action="decrease")
    issue_params(jnp.int32(0))

    def copy_table(r, it):
      """The item's page numbers into its table buffer: the window's rows
      and the anchors' (one barrier, one arrival a copy), else every row
      (persistent: once the compute warpgroups are done with the buffer's
      round r - 2)."""
      if persistent:
        pl.when(r >= 2)(
            lambda: plgpu.barrier_wait(bars.table_free.at[lax.rem(r, 2)]))
      if window:
        plgpu.copy_gmem_to_smem(
            table_ref.at[it.batch, pl.ds(it.first_row, window)],
            it.table.at[pl.ds(0, window)], it.table_bar)
        if anchor_rows:
          assert anchor_rows == ANCHOR_TABLE_ROWS, anchor_rows
          for i, row in enumerate((0, it.last_row)):
            plgpu.copy_gmem_to_smem(table_ref.at[it.batch, pl.ds(row, 1)],
                                    it.table.at[pl.ds(window + i, 1)],
                                    it.table_bar)
      else:
        plgpu.copy_gmem_to_smem(table_ref.at[it.batch], it.table,
                                it.table_bar)
      plgpu.barrier_wait(it.table_bar)

    def issue_k(it, kp):
      slot = k_slot(kp)
      plgpu.copy_gmem_to_smem(head_page(it, k_ref, k_block(it, kp)),
                              sc.k.at[slot], bars.k.at[slot])

    def item(r, used):
      """Round r's K stream. used: the K slots earlier rounds took (a
      slot's last release is awaited before its next copy)."""
      kv_len = control_word(read_params(), 0)
      next_round(r, issue_params)   # (kv_len is all this one reads)
      it = item_view(r, kv_len)
      if it.table is not None:
        copy_table(r, it)
      n_k, n = it.n_k, it.n
      if persistent:
        @pl.loop(0, n_k)
        def _stream(kp):
          @pl.when((kp >= k_stages) | (k_slot(kp) < used))
          def _():
            plgpu.barrier_wait(bars.k_free.at[k_slot(kp)])
          issue_k(it, kp)
        return jnp.maximum(used, jnp.minimum(n_k, k_stages))

      def refill_k(kp):
        """K position kp + k_stages into kp's slot once it is free."""

        @pl.when(kp + k_stages < n_k)
        def _():
          plgpu.barrier_wait(bars.k_free.at[k_slot(kp)])
          issue_k(it, kp + k_stages)

      for i in range(k_stages):
        pl.when(i < n_k)(functools.partial(issue_k, it, jnp.int32(i)))

      if compute_issues_v:   # K only: each slot refilled as soon as it frees
        pl.loop(0, n_k)(refill_k)
      else:
        @pl.loop(0, it.n_anchor)
        def _anchors(kp):
          refill_k(kp)

        @pl.loop(0, n)
        def _stream(vp):
          slot = v_slot(vp)

          @pl.when(vp >= v_stages)
          def _():
            plgpu.barrier_wait(bars.v_free.at[slot])

          if skip_enabled:   # V once the block is kept; else an empty
            # phase. The vote of block vp is read before K of block
            # vp + k_stages is issued: its writer cannot overwrite the
            # vote slot too early.
            vote = k_slot(vp)
            plgpu.barrier_wait(bars.votes.at[vote])
            pl.when(sc.votes[vote] != 0)(lambda: issue_v(it, vp))
            pl.when(sc.votes[vote] == 0)(
                lambda: plgpu.barrier_arrive(bars.v.at[slot]))
          else:
            issue_v(it, vp)

          refill_k(vp + it.n_anchor)

      # Observe the last releases, so every phase is seen before exit.
      @pl.loop(jnp.maximum(n_k - k_stages, 0), n_k)
      def _drain_k(kp):
        plgpu.barrier_wait(bars.k_free.at[k_slot(kp)])

      if not compute_issues_v:
        @pl.loop(jnp.maximum(n - v_stages, 0), n)
        def _drain_v(vp):
          plgpu.barrier_wait(bars.v_free.at[v_slot(vp)])

      if merged_refs is not None and not local_merge:
        pl.when(it.split == num_splits - 1)(lambda: load_partials(it))
      return used

    used = over_rounds(item, jnp.int32(0))
    if persistent:   # every slot's last release, every table buffer's
      for slot in range(k_stages):
        pl.when(slot < used)(
            lambda slot=slot: plgpu.barrier_wait(bars.k_free.at[slot]))
      if sc.table is not None:
        for back in (2, 1):   # the last two rounds', in order
          r = n_rounds - back
          pl.when(r >= 0)(lambda r=r: plgpu.barrier_wait(
              bars.table_free.at[lax.rem(r, 2)]))


_STATIC = ("group", "sm_scale", "num_splits", "max_mode", "config",
           "interpret", "skip_enabled", "kv_layout")
# Page layouts: a page's rows token-major, each token's KV heads side by
# side ("NHD", [n_pages, block_kv, hkv, d]), or head-major ("HND",
# [n_pages, hkv, block_kv, d]: each head's block one run of memory).
KV_LAYOUTS = ("NHD", "HND")


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_partials(q, k_pages, v_pages, page_table, kv_lengths,
                    log_threshold, k_scale=None, v_scale=None,
                    initial_max=None, *, group: int,
                    sm_scale: float,
                    num_splits: int, max_mode: str = "anchored",
                    config: MosaicDecodeConfig = MosaicDecodeConfig(),
                    interpret=None, skip_enabled: bool = True,
                    kv_layout: str = "NHD"):
  """Per-split partials of skip-softmax decode attention on Hopper.

  Args:
    q: [batch, kv_heads, group, head_dim] bf16/f16: each KV head's query
      heads.
    k_pages, v_pages: [n_pages, block_kv, kv_heads, head_dim] (or, with
      kv_layout "HND", [n_pages, kv_heads, block_kv, head_dim]), q's dtype
      or float8_e4m3fn (then with `k_scale` and `v_scale`).
    page_table: int32 [batch, pages_per_seq]: page of each logical block;
      None: a contiguous cache (n_pages = batch * pages_per_seq, block j
      of sequence i in page i * pages_per_seq + j), no table read.
    kv_lengths: int32 [batch] (<= pages_per_seq * block_kv); log_threshold:
      f32 [batch] (natural log).
    k_scale, v_scale: f32 [kv_heads], FP8 pages only: a page holds
      values / scale.
    initial_max: optional f32 [batch, kv_heads, group], log2 units (-inf:
      none): every split's running max starts at least there (the skip
      build's; the dense build ignores it).
    num_splits: split-K factor; max_mode: "split" or "anchored".
    interpret: None on a GPU, or a `plgpu.InterpretGPUParams` to run on CPU
      (warpgroups, TMA and barriers simulated; races detected on request).
    skip_enabled: False builds the dense kernel (every V page read).
    kv_layout: "NHD" or "HND" (`KV_LAYOUTS`): the pages' layout.

  Returns:
    acc f32 [batch, kv_heads, parts, R, head_dim] (unnormalized; R = 64,
    or `query_tile` transposed; rows past `group` are padding; parts =
    splits, or with `merge_warpgroups=False` splits * compute warpgroups,
    one per compute warpgroup of a split),
    m f32 [batch, kv_heads, parts, R] (row max, log2 units, -inf where a
    part kept nothing), l f32 (row sums); skipped, visited int32 [batch,
    kv_heads, splits].
  """
  config = dataclasses.replace(config, merge_in_kernel=False)
  acc, ml, stats = _launch(
      q, k_pages, v_pages, page_table, kv_lengths, log_threshold, k_scale,
      v_scale, initial_max, group=group, sm_scale=sm_scale,
      num_splits=num_splits, max_mode=max_mode, config=config,
      interpret=interpret, skip_enabled=skip_enabled, kv_layout=kv_layout)
  b, hkv = q.shape[:2]
  n_wgs = acc.shape[2] // num_splits
  # Per split: the compute warpgroups' block counts add up.
  counts = stats[..., :2].reshape(b, hkv, num_splits, n_wgs, 2).sum(axis=3)
  if config.transposed:   # [..., d, R] -> [..., R, d]
    acc = acc.swapaxes(-1, -2)
  return (acc, ml[..., 0, :], ml[..., 1, :], counts[..., 0], counts[..., 1])


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_merged(q, k_pages, v_pages, page_table, kv_lengths,
                  log_threshold, k_scale=None, v_scale=None,
                  initial_max=None, *, group: int, sm_scale: float,
                  num_splits: int, max_mode: str = "anchored",
                  config: MosaicDecodeConfig = MosaicDecodeConfig(),
                  interpret=None, skip_enabled: bool = True,
                  kv_layout: str = "NHD"):
  """Skip-softmax decode attention on Hopper, split-K merged in the kernel
  (`MosaicDecodeConfig.merge_in_kernel`): arguments as `decode_partials`.

  Returns:
    out [batch, kv_heads * group, head_dim] in q's dtype (0 for a row that
    kept no key), m f32 [batch, kv_heads, R] (the merged row max, log2
    units, -inf where nothing was kept; rows past `group` are padding), l
    f32 (its row sums), skipped, visited int32 [batch, kv_heads] (over the
    splits).
  """
  config = dataclasses.replace(config, merge_in_kernel=True)
  out, ml, counts = _launch(
      q, k_pages, v_pages, page_table, kv_lengths, log_threshold, k_scale,
      v_scale, initial_max, group=group, sm_scale=sm_scale,
      num_splits=num_splits, max_mode=max_mode, config=config,
      interpret=interpret, skip_enabled=skip_enabled,
      kv_layout=kv_layout)[3:]
  return out, ml[:, :, 0], ml[:, :, 1], counts[..., 0], counts[..., 1]


def _launch(q, k_pages, v_pages, page_table, kv_lengths, log_threshold,
            k_scale, v_scale, initial_max, *, group, sm_scale, num_splits,
            max_mode, config, interpret, skip_enabled, kv_layout):
  """The kernel's outputs: partials (acc, ml, stats; with
  `config.merge_in_kernel` and one split never written) and, with
  `config.merge_in_kernel`, the merged (out, ml, counts)."""
  b, hkv, g, d = q.shape
  out_dtype = q.dtype
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"`kv_layout` must be one of {KV_LAYOUTS}, got "
                     f"{kv_layout!r}.")
  heads_first = kv_layout == "HND"
  n_pages = k_pages.shape[0]
  block_kv = k_pages.shape[2 if heads_first else 1]
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
  transposed = config.transposed
  rows = query_tile(g, transposed)
  contiguous = page_table is None
  anchors = max_mode == "anchored" and skip_enabled
  if contiguous:   # block j of sequence i is page i * pages_per_seq + j
    if n_pages % b:
      raise ValueError(
          f"Without a page table the pages are the contiguous cache's, "
          f"batch * pages_per_seq of them; got {n_pages} pages for batch "
          f"{b}. Pass `page_table`.")
    pages_per_seq, table_pages, window, anchor_rows = n_pages // b, 0, 0, 0
    table = None
  else:
    pages_per_seq = page_table.shape[1]
    window = table_window(pages_per_seq, num_splits, anchors)
    # The anchors' two rows, held apart from a window.
    anchor_rows = ANCHOR_TABLE_ROWS if window and anchors else 0
    table_pages = held_table_pages(pages_per_seq, window, anchor_rows)
    width = -(-pages_per_seq // TABLE_ROW) * TABLE_ROW
    table = jnp.pad(page_table.astype(jnp.int32),
                    ((0, 0), (0, width - pages_per_seq))).reshape(
                        b, -1, TABLE_ROW)
  n_wgs, k_stages, v_stages = pipeline(config, d, block_kv, table_pages,
                                       fp8, g)
  ahead = blocks_ahead(config, n_wgs, v_stages)
  log2_thr = jnp.broadcast_to(log_threshold * LOG2E, (b,))
  if config.hand_over_block_max and n_wgs == 2:   # λ > 1 acts as 1 (see
    log2_thr = jnp.minimum(log2_thr, 0.0)          # the config)
  # Every small input in one array, which XLA writes in one fusion (each
  # small kernel before this one costs ~3 us; `.at[].set` would add a
  # scatter kernel apiece).
  def bits(x, shape):   # f32 -> its int32 bits, broadcast to [b, hkv]
    x = jnp.asarray(x, jnp.float32)
    return jnp.broadcast_to(lax.bitcast_convert_type(x, jnp.int32), shape)
  words = [jnp.broadcast_to(kv_lengths.astype(jnp.int32)[:, None], (b, hkv)),
           bits(log2_thr[:, None], (b, hkv))]
  words += ([bits(k_scale, (b, hkv)), bits(v_scale, (b, hkv))] if fp8
            else [jnp.zeros((b, hkv), jnp.int32)] * 2)
  ctrl = control_block(q, jnp.stack(words, axis=-1), rows)
  merge = config.merge_in_kernel
  smem_bytes = config_bytes(config, d, block_kv, table_pages, fp8, g,
                            n_wgs, k_stages, v_stages)
  if smem_bytes > MAX_SHARED_MEMORY:
    held = ("no page table" if contiguous
            else f"{table_pages} page numbers of the table")
    raise ValueError(
        f"head_dim {d}, pages of {block_kv} keys, {held}, rings of "
        f"{k_stages} K / {v_stages} V "
        f"pages and {n_wgs} compute warpgroups need {smem_bytes} bytes of "
        f"shared memory (max {MAX_SHARED_MEMORY}); use smaller pages, fewer "
        "stages or compute_wgs=1.")
  def swizzled(itemsize, minor=d):   # Rows of `minor` elements, in 128
    swizzle = 128 if minor * itemsize >= 128 else 64   # or 64 bytes.
    return (plgpu.TilingTransform((8, swizzle // itemsize)),
            plgpu.SwizzleTransform(swizzle))

  page_dtype = k_pages.dtype
  page_swizzle = swizzled(jnp.dtype(page_dtype).itemsize)
  given = initial_max is not None and skip_enabled
  # One part a split where the program combines its warpgroups' partials
  # (`merge_warpgroups`; one split merged in the kernel has no parts).
  part_wgs = (1 if config.merge_warpgroups and not (merge and num_splits == 1)
              else n_wgs)
  parts = num_splits * part_wgs
  out_shape = (d, rows) if transposed else (rows, d)
  # The merge ring takes the K ring's bytes (free by then), up to
  # MERGE_SLOTS partial tiles; a persistent kernel's the V ring's.
  page_bytes = block_kv * d * jnp.dtype(k_pages.dtype).itemsize
  tile_bytes = rows * d * 4
  persistent = config.programs is not None
  merge_slots = merge_ring_slots(parts, rows, d, k_stages * page_bytes,
                                 v_stages * page_bytes, n_wgs, persistent)
  # On a GPU the other splits signal the merging one through a semaphore
  # per (sequence, KV head); Pallas' interpreter runs the grid in order,
  # so there the last split finds the others' partials written.
  use_semaphore = merge and num_splits > 1 and interpret is None
  programs = (persistent_programs(config.programs, b * hkv, num_splits,
                                  merge, config.split_major,
                                  interpret is not None)
              if persistent else None)
  # Inside a shard_map that tracks varying axes (check_vma), a Ref that
  # varies cannot enter the kernel: the semaphores come from pl.get_global.
  axis_type = getattr(jax.typeof(ctrl), "manual_axis_type", None)
  varying = axis_type is not None and not axis_type.empty
  control_semaphore = (use_semaphore and not config.global_semaphores
                       and not varying)
  if control_semaphore:   # the kernel writes the block: an aliased buffer
    ctrl = jax.new_ref(ctrl)
  inputs = [ctrl, k_pages, v_pages, *([] if contiguous else [table])]
  if given:   # [b, hkv, R], padding rows at -inf
    inputs.append(jnp.pad(initial_max.astype(jnp.float32),
                          ((0, 0), (0, 0), (0, rows - g)),
                          constant_values=-jnp.inf))

  def blasst_decode_mosaic(ctrl_ref, k_ref, v_ref, *refs):
    table_ref = None if contiguous else refs[0]
    refs = refs[0 if contiguous else 1:]
    if merge:
      *optional, acc_ref, ml_ref, stats_ref, out_ref, mml_ref, counts_ref = (
          refs)
      merged_refs = (out_ref, mml_ref, counts_ref)
    else:
      *optional, acc_ref, ml_ref, stats_ref = refs
      merged_refs = None
    if control_semaphore:
      sem = "control"
    elif use_semaphore:
      sem = pl.get_global(plgpu.SemaphoreType.REGULAR((b * hkv,)))
    else:
      sem = None
    init_ref = optional[-1] if given else None
    if transposed:   # Pᵀ of a warpgroup's last ahead + 1 blocks
      p = plgpu.SMEM((n_wgs, ahead + 1, rows, block_kv), dtype,
                     transforms=swizzled(2, block_kv))
    elif interpret is not None:
      p = plgpu.SMEM((n_wgs, ROWS, block_kv), dtype,
                     transforms=swizzled(2, block_kv))
    else:
      p = None
    k_ring = plgpu.SMEM((k_stages, block_kv, d), page_dtype,
                        transforms=page_swizzle)
    v_ring = plgpu.SMEM((v_stages, block_kv, d), page_dtype,
                        transforms=page_swizzle)
    out_tiles = plgpu.SMEM((n_wgs, *out_shape), jnp.float32)
    merge_tiles = plgpu.SMEM((merge_slots, *out_shape), jnp.float32)
    merge_rest = (plgpu.SMEM((rows, d), out_dtype),
                  plgpu.SMEM((merge_slots, merge_stat_rows(rows), rows),
                             jnp.float32),
                  plgpu.SMEM((merge_slots, SLOT), jnp.int32))
    # What ends an item: the output tiles, and the merge's buffers only
    # where it runs. Over the (by then read) K ring and V ring; persistent,
    # all over the V ring, as the K ring streams the next item meanwhile.
    ends = (out_tiles, *((merge_tiles, *merge_rest) if merge else ()))
    if persistent:
      rings = dict(k=k_ring, v=plgpu.RefUnion(v_ring, ends))
    else:
      rings = dict(k=plgpu.RefUnion(k_ring, *ends[:2]),
                   v=plgpu.RefUnion(v_ring, ends[2:]) if merge else v_ring)
    scratch = _Scratch(
        q=plgpu.SMEM((rows, d), dtype, transforms=swizzled(2)),
        out=None, **rings,
        table=(None if contiguous
               else plgpu.SMEM((2 if persistent else 1,
                                table_pages // TABLE_ROW, TABLE_ROW),
                               jnp.int32)),
        params=plgpu.SMEM((n_wgs + 1, CONTROL_HALVES), dtype),
        votes=(None if config.compute_issues_v
               else plgpu.SMEM((k_stages,), jnp.int32)),
        handoff=plgpu.SMEM((hand_over_slots(config, n_wgs), rows),
                           jnp.float32),
        ml=plgpu.SMEM((n_wgs, 2, rows), jnp.float32),
        stats=plgpu.SMEM((n_wgs, SLOT), jnp.int32),
        p=p,
        wide=(plgpu.SMEM((n_wgs, block_kv, d), jnp.float16,
                         transforms=swizzled(2)) if fp8 else None),
        rows=plgpu.SMEM((rows,), jnp.float32) if given else None,
        vote=(plgpu.SMEM((n_wgs, mosaic_vote.ANY_WORDS), jnp.float32)
              if config.one_barrier_vote and skip_enabled and not transposed
              else None),
        colred=(plgpu.SMEM((n_wgs, mosaic_vote.column_scratch_words(rows)),
                           jnp.float32) if transposed else None),
        merge_acc=None, merge_ml=None, merge_stats=None, staged=None,
        ticket=(plgpu.SMEM((SLOT,), jnp.int32)
                if persistent and control_semaphore else None))
    two = dict(num_barriers=2) if persistent else {}   # buffers
    barriers = _Barriers(
        q=plgpu.Barrier(),
        table=(None if contiguous else plgpu.Barrier(
            num_arrivals=1 + anchor_rows, **two)),
        table_free=(plgpu.Barrier(num_arrivals=n_wgs, num_barriers=2)
                    if persistent and not contiguous else None),
        params=plgpu.Barrier(num_barriers=n_wgs + 1),
        k=plgpu.Barrier(num_barriers=k_stages),
        k_free=plgpu.Barrier(num_barriers=k_stages),
        v=plgpu.Barrier(num_barriers=v_stages),
        v_free=(None if config.compute_issues_v
                else plgpu.Barrier(num_barriers=v_stages)),
        votes=(None if config.compute_issues_v
               else plgpu.Barrier(num_barriers=k_stages)),
        handoff=plgpu.Barrier(num_barriers=hand_over_slots(config, n_wgs)),
        done=plgpu.Barrier(num_arrivals=n_wgs),
        ring_free=(plgpu.Barrier(num_arrivals=n_wgs) if persistent
                   else None),
        rows=plgpu.Barrier() if given else None,
        written=plgpu.Barrier(num_arrivals=n_wgs) if merge else None,
        pair=(plgpu.Barrier(num_arrivals=n_wgs - 1) if part_wgs < n_wgs
              else None),
        merged=(tuple(plgpu.Barrier(num_barriers=merge_slots)
                      for _ in range(3)) if merge else None),
        merge_free=(plgpu.Barrier(num_barriers=merge_slots)
                    if merge and not persistent else None))

    def body(sc, bars):
      if persistent:   # the unions' views
        k_ring, (v_ring, ends) = sc.k, sc.v
      else:
        (k_ring, *ends), v_ring = sc.k, sc.v
        if merge:
          v_ring, rest = v_ring
          ends += list(rest)
      out_tiles, *merge_ends = ends
      if merge:
        merge_tiles, staged, merge_ml, merge_stats = merge_ends
        sc = sc._replace(merge_acc=merge_tiles, merge_ml=merge_ml,
                         merge_stats=merge_stats, staged=staged)
      sc = sc._replace(k=k_ring, out=out_tiles, v=v_ring)
      _kernel(ctrl_ref, k_ref, v_ref, table_ref, init_ref, acc_ref, ml_ref,
              stats_ref, merged_refs, sem,
              sc, bars, sm_scale=sm_scale,
              block_kv=block_kv, head_dim=d, dtype=dtype, group=g,
              num_splits=num_splits, skip_enabled=skip_enabled,
              anchored=max_mode == "anchored", k_stages=k_stages,
              v_stages=v_stages, compute_wgs=n_wgs,
              split_registers=on_for_fp8(config.split_registers, fp8)
              and n_wgs > 1,
              transposed=transposed, kv_heads=hkv, merge_slots=merge_slots,
              pages_per_seq=pages_per_seq,
              compute_issues_v=config.compute_issues_v,
              block_max_handoff=config.hand_over_block_max and n_wgs == 2,
              fp8_k_registers=(on_for_fp8(config.fp8_k_in_registers, fp8)
                               and transposed),
              ahead=ahead, window=window, anchor_rows=anchor_rows,
              heads_first=heads_first, programs=programs,
              split_major=config.split_major, interpret=interpret is not None)

    pl.run_scoped(body, scratch, barriers, collective_axes="wg")

  out_type = (
      jax.ShapeDtypeStruct((b, hkv, parts, *out_shape), jnp.float32),
      jax.ShapeDtypeStruct((b, hkv, parts, 2, rows), jnp.float32),
      jax.ShapeDtypeStruct((b, hkv, parts, SLOT), jnp.int32))
  if merge:
    out_type += (jax.ShapeDtypeStruct((b, hkv * g, d), out_dtype),
                 jax.ShapeDtypeStruct((b, hkv, 2, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, SLOT), jnp.int32))
  return plgpu.kernel(
      blasst_decode_mosaic,
      out_type=out_type,
      grid=(num_splits, hkv, b) if programs is None else (programs,),
      grid_names=(("split", "kv_heads", "batch") if programs is None
                  else ("program",)),
      num_threads=n_wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, unsafe_no_auto_barriers=not config.auto_barriers),
      interpret=interpret,
  )(*inputs)
