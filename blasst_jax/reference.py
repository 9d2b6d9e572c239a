"""Pure-JAX oracles: dense attention and blockwise skip-softmax attention.

`blockwise_attention` is the semantic contract of the library: every kernel
must produce its outputs *and* its skip decisions. It runs on any backend.

Layout (as `jax.nn.dot_product_attention`):
  q: [batch, q_len, q_heads, head_dim]
  k, v: [batch, kv_len, kv_heads, head_dim], q_heads % kv_heads == 0.
Query head `h` reads KV head `h // (q_heads // kv_heads)`.

Masks: `causal` is top-left aligned (query `i` sees keys `j <= i`), as in
`jax.nn.dot_product_attention(is_causal=True)`. `kv_lengths` [batch] marks
keys at positions `>= kv_lengths[b]` as padding. A query row with no visible
key gives output 0 and log-sum-exp -inf.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from blasst_jax import config as config_lib
from blasst_jax.config import SkipStats


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockwiseResult:
  """Everything the oracle knows about one call.

  Attributes:
    out: [batch, q_len, q_heads, head_dim], dtype of q.
    lse: f32 [batch, q_heads, q_len], natural-log log-sum-exp of the kept
      scores (-inf for rows with no visible key).
    skip_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks], skipped blocks.
    visited_mask: bool, same shape, blocks not removed by masks.
    block_gap: f32, same shape: max over the tile's rows of
      `block_max - running_max`, the statistic compared with log λ
      (-inf where no row of the tile sees the block).
    stats: per (batch, q-head) counts.
    row_max: f32 [batch, q_heads, q_len]: the running max at the end (the
      row max of the visible scores, or of `initial_max` where that is
      larger; -inf for rows that saw nothing), or None.
  """

  out: jax.Array
  lse: jax.Array
  skip_mask: jax.Array
  visited_mask: jax.Array
  block_gap: jax.Array
  stats: SkipStats
  row_max: jax.Array | None = None


def default_sm_scale(head_dim: int) -> float:
  """The default score scale, 1 / sqrt(head_dim), as a Python float."""
  return 1.0 / math.sqrt(head_dim)


def kv_lengths_or_full(kv_lengths, batch: int, kv_len: int) -> jax.Array:
  """int32 [batch]: `kv_lengths` clipped to kv_len, or kv_len when None."""
  if kv_lengths is None:
    return jnp.full((batch,), kv_len, jnp.int32)
  return jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), kv_len)


def _group_q(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[b, t, hq, d] -> [b, t, hkv, g, d]: q heads grouped by their KV head."""
  b, t, hq, d = q.shape
  return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def key_mask(q_len: int, kv_len: int, kv_lengths: jax.Array, causal: bool,
             q_offset: int = 0, k_offset: int = 0) -> jax.Array:
  """bool [batch, q_len, kv_len]: True where query i may see key j.

  Args:
    q_len, kv_len: sequence lengths.
    kv_lengths: int [batch]; keys at positions >= kv_lengths[b] are hidden.
    causal: hide keys j > i (top-left aligned, after the offsets).
    q_offset, k_offset: absolute positions of query 0 and key 0.
  """
  qi = q_offset + jnp.arange(q_len)[:, None]
  kj = k_offset + jnp.arange(kv_len)[None, :]
  mask = kj[None] < kv_lengths[:, None, None]
  if causal:
    mask = mask & (kj <= qi)[None]
  return mask


def attention_scores(q, k, *, causal=False, sm_scale=None, kv_lengths=None):
  """Masked scores f32 [batch, q_heads, q_len, kv_len] (-inf where masked).

  q [batch, q_len, q_heads, head_dim] and k [batch, kv_len, kv_heads,
  head_dim] (q_heads % kv_heads == 0); other arguments as `dense_attention`.
  Shapes are not validated here (`blasst_jax.attention` does that).
  """
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  sm_scale = default_sm_scale(d) if sm_scale is None else sm_scale
  qg = _group_q(q, hkv)
  kv_lengths = kv_lengths_or_full(kv_lengths, b, lk)
  # Keys past the length may hold garbage (NaN): zeroed, so that the
  # gradient's 0-weight · key stays 0.
  key_valid = jnp.arange(lk)[None, :] < kv_lengths[:, None]
  k = jnp.where(key_valid[:, :, None, None], k, jnp.zeros_like(k))
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                 preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST)
  s = s.reshape(b, hq, lq, lk) * sm_scale
  mask = key_mask(lq, lk, kv_lengths, causal)
  return jnp.where(mask[:, None], s, -jnp.inf)


def attention_probabilities(q, k, *, causal=False, sm_scale=None,
                            kv_lengths=None) -> jax.Array:
  """Dense softmax f32 [batch, q_heads, q_len, kv_len]; 0 for masked rows.

  Arguments as `attention_scores`. Memory: batch * q_heads * q_len * kv_len
  floats.
  """
  s = attention_scores(q, k, causal=causal, sm_scale=sm_scale,
                       kv_lengths=kv_lengths)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def dense_attention(q, k, v, *, causal=False, sm_scale=None, kv_lengths=None,
                    return_lse=False):
  """Plain softmax attention with f32 math.

  Args:
    q: [batch, q_len, q_heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim].
    causal: top-left aligned causal mask.
    sm_scale: score scale, default 1/sqrt(head_dim).
    kv_lengths: optional int [batch], valid keys per sequence.
    return_lse: also return f32 [batch, q_heads, q_len] log-sum-exp.

  Returns:
    out [batch, q_len, q_heads, head_dim] in q's dtype (and lse, -inf for
    rows with no visible key); rows with no visible key are 0.

  Shapes and dtypes are not validated: this is the oracle the checked entry
  point `blasst_jax.attention` is tested against.
  """
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  s = attention_scores(q, k, causal=causal, sm_scale=sm_scale,
                       kv_lengths=kv_lengths)
  p = attention_probabilities(q, k, causal=causal, sm_scale=sm_scale,
                              kv_lengths=kv_lengths)
  p = p.reshape(b, hkv, hq // hkv, lq, -1)
  key_valid = jnp.arange(k.shape[1])[None, :] < kv_lengths_or_full(
      kv_lengths, b, k.shape[1])[:, None]
  v = jnp.where(key_valid[:, :, None, None], v, 0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(b, lq, hq, d).astype(q.dtype)
  if not return_lse:
    return out
  m = jnp.max(s, axis=-1)
  safe_m = jnp.where(jnp.isfinite(m), m, 0.0)
  lse = safe_m + jnp.log(jnp.sum(jnp.exp(s - safe_m[..., None]), axis=-1))
  return out, jnp.where(jnp.isfinite(m), lse, -jnp.inf)


def visited_blocks_mask(q_len: int, kv_len: int, block_q: int, block_kv: int,
                        kv_lengths: jax.Array, causal: bool,
                        block_mask: jax.Array | None = None) -> jax.Array:
  """bool [batch, 1 or q_heads, n_q_tiles, n_kv_blocks].

  A (q-tile, kv-block) pair is visited when at least one real query row of
  the tile may see at least one key of the block (and, with a block mask,
  when the mask selects it).

  Args:
    q_len, kv_len: sequence lengths.
    block_q, block_kv: tile sizes.
    kv_lengths: int [batch].
    causal: top-left aligned causal mask.
    block_mask: optional bool [batch, q_heads, n_q_tiles, n_kv_blocks]; with
      it the result has q_heads, without it 1.
  """
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  # Keys visible at all per batch element: below kv_lengths.
  first_key = jnp.arange(nk) * block_kv                       # [nk]
  visited = first_key[None, None, :] < kv_lengths[:, None, None]  # [b,1,nk]
  if causal:
    last_row = jnp.minimum((jnp.arange(nq) + 1) * block_q, q_len) - 1  # [nq]
    visited = visited & (first_key[None, :] <= last_row[:, None])[None]
  visited = jnp.broadcast_to(visited, (kv_lengths.shape[0], nq, nk))[:, None]
  if block_mask is not None:
    visited = visited & block_mask
  return visited


def blockwise_attention(q, k, v, *, block_q=None, block_kv=None,
                        threshold=0.0, causal=False, sm_scale=None,
                        kv_lengths=None, block_mask=None,
                        log_threshold=None,
                        initial_max=None) -> BlockwiseResult:
  """Online-softmax attention over KV blocks with the exact skip rule.

  For each (batch, q-head, q-tile of `block_q` rows), KV blocks of
  `block_kv` keys are visited in increasing order. With scores
  `s = sm_scale * q·kᵀ` (f32, masked entries -inf), block j is skipped when
  it is not the first visited block and
  `max_rows(rowmax(s_j) - m_prev) < log(λ)`; rows that see no key of the
  block take no part. A skipped block leaves the running (acc, l, m)
  unchanged.

  `initial_max` starts the running max elsewhere: the row max of keys that
  precede these ones (context parallelism chains parts this way, taking the
  decisions one call over all the keys would take). A tile with a finite
  initial max in some row has already seen a block: its first block here
  may be skipped.

  Args:
    q: [batch, q_len, q_heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim].
    block_q, block_kv: tile sizes, the same as the kernel being checked.
    threshold: λ in [0, 1): a float, f32 [batch], or a `SkipSoftmaxConfig`.
    causal: top-left aligned causal mask.
    sm_scale: default 1/sqrt(head_dim).
    kv_lengths: optional int [batch].
    block_mask: optional bool [batch, q_heads, n_q_tiles, n_kv_blocks];
      unselected blocks are not visited.
    log_threshold: optional f32 [batch], log λ; overrides `threshold`.
    initial_max: optional f32 [batch, q_heads, q_len], the running max to
      start from (units of s; -inf: none).

  Returns:
    A `BlockwiseResult`.

  Raises:
    ValueError: for block sizes that are not powers of two >= 16, or λ
      outside [0, 1) or of a shape other than [] / [batch]. Other input is
      not validated (`blasst_jax.attention` does that).
  """
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  g = hq // hkv
  block_q, block_kv = config_lib.effective_block_sizes(lq, lk, block_q,
                                                       block_kv)
  sm_scale = default_sm_scale(d) if sm_scale is None else sm_scale
  kv_lengths = kv_lengths_or_full(kv_lengths, b, lk)
  if log_threshold is None:
    log_thr = config_lib.log_threshold(
        config_lib.resolve_threshold(threshold, kv_lengths, lk, b))  # [b]
  else:
    log_thr = jnp.broadcast_to(jnp.asarray(log_threshold, jnp.float32), (b,))
  nq, nk = -(-lq // block_q), -(-lk // block_kv)

  # [b, nq, bq, hkv, g, d] q tiles; padded rows are masked out below.
  qp = jnp.pad(q, ((0, 0), (0, nq * block_q - lq), (0, 0), (0, 0)))
  qt = qp.reshape(b, nq, block_q, hkv, g, d)
  kp = jnp.pad(k, ((0, 0), (0, nk * block_kv - lk), (0, 0), (0, 0)))
  vp = jnp.pad(v, ((0, 0), (0, nk * block_kv - lk), (0, 0), (0, 0)))
  # Padding keys may hold garbage (even NaN): zero them so that 0-weight ·
  # NaN reaches neither the output (V) nor the gradients (K, V).
  key_valid = jnp.arange(nk * block_kv)[None, :] < kv_lengths[:, None]
  kp = jnp.where(key_valid[:, :, None, None], kp, 0)
  vp = jnp.where(key_valid[:, :, None, None], vp, 0)
  kb = kp.reshape(b, nk, block_kv, hkv, d).swapaxes(0, 1)  # [nk, b, bkv, h, d]
  vb = vp.reshape(b, nk, block_kv, hkv, d).swapaxes(0, 1)

  visited = visited_blocks_mask(lq, lk, block_q, block_kv, kv_lengths, causal,
                                block_mask)
  visited = jnp.broadcast_to(visited, (b, hq, nq, nk))
  row_ids = jnp.arange(nq * block_q).reshape(nq, block_q)       # [nq, bq]

  def step(carry, xs):
    acc, l, m, seen = carry           # [b,hq,nq,bq,d], [b,hq,nq,bq] x2, [b,hq,nq]
    j, k_j, v_j, visited_j = xs       # k_j [b, bkv, hkv, d], visited_j [b,hq,nq]
    s = jnp.einsum("bnqhgd,bkhd->bhgnqk", qt, k_j,
                   preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
    s = s.reshape(b, hq, nq, block_q, block_kv) * sm_scale
    key_ids = j * block_kv + jnp.arange(block_kv)                # [bkv]
    mask = key_ids[None, None, None, :] < kv_lengths[:, None, None, None]
    mask = mask & (row_ids < lq)[None, :, :, None]               # [b,nq,bq,bkv]
    if causal:
      mask = mask & (key_ids[None, None, :] <= row_ids[:, :, None])[None]
    s = jnp.where(mask[:, None], s, -jnp.inf)

    m_blk = jnp.max(s, axis=-1)                                   # [b,hq,nq,bq]
    gap = jnp.where(m_blk == -jnp.inf, -jnp.inf, m_blk - m)
    max_gap = jnp.max(gap, axis=-1)                               # [b,hq,nq]
    max_gap = jnp.where(visited_j, max_gap, -jnp.inf)
    skip = visited_j & seen & (max_gap < log_thr[:, None, None])
    update = visited_j & ~skip

    m_new = jnp.maximum(m, m_blk)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l_new = alpha * l + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bhgnqk,bkhd->bhgnqd",
                    p.reshape(b, hkv, g, nq, block_q, block_kv),
                    v_j.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    acc_new = alpha[..., None] * acc + pv.reshape(acc.shape)
    upd = update[..., None]
    carry = (jnp.where(upd[..., None], acc_new, acc),
             jnp.where(upd, l_new, l),
             jnp.where(upd, m_new, m),
             seen | visited_j)
    return carry, (skip, max_gap)

  if initial_max is None:
    m0 = jnp.full((b, hq, nq, block_q), -jnp.inf, jnp.float32)
  else:   # padded rows start (and stay) at -inf: they take no part
    m0 = jnp.pad(jnp.asarray(initial_max, jnp.float32),
                 ((0, 0), (0, 0), (0, nq * block_q - lq)),
                 constant_values=-jnp.inf).reshape(b, hq, nq, block_q)
  init = (jnp.zeros((b, hq, nq, block_q, d), jnp.float32),
          jnp.zeros((b, hq, nq, block_q), jnp.float32),
          m0,
          jnp.any(m0 > -jnp.inf, axis=-1))
  xs = (jnp.arange(nk), kb, vb, jnp.moveaxis(visited, -1, 0))
  (acc, l, m, _), (skip, gap) = jax.lax.scan(step, init, xs)

  out = acc / jnp.where(l > 0, l, 1.0)[..., None]             # [b,hq,nq,bq,d]
  out = out.reshape(b, hq, nq * block_q, d)[:, :, :lq]
  out = out.transpose(0, 2, 1, 3).astype(q.dtype)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  lse = lse.reshape(b, hq, nq * block_q)[:, :, :lq]
  skip_mask = jnp.moveaxis(skip, 0, -1)
  stats = SkipStats(
      skipped_blocks=jnp.sum(skip_mask, axis=(2, 3), dtype=jnp.int32),
      visited_blocks=jnp.sum(visited, axis=(2, 3), dtype=jnp.int32))
  return BlockwiseResult(out=out, lse=lse, skip_mask=skip_mask,
                         visited_mask=visited,
                         block_gap=jnp.moveaxis(gap, 0, -1), stats=stats,
                         row_max=m.reshape(b, hq, nq * block_q)[:, :, :lq])


# ----------------------------------------------------------------------------
# Decode: one query row per head against a KV cache.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeResult:
  """What the decode oracle knows about one call.

  A decode tile is the `group = q_heads // kv_heads` query heads that share
  a KV head (one row each); the skip decision is taken per (batch, kv-head,
  kv-block) over those rows, because skipping a block means not reading its
  V, which every head of the group shares.

  Attributes:
    out: [batch, q_heads, head_dim], dtype of q.
    lse: f32 [batch, q_heads], natural-log log-sum-exp of the kept scores.
    skip_mask: bool [batch, kv_heads, n_kv_blocks].
    visited_mask: bool [batch, kv_heads, n_kv_blocks]: blocks holding at
      least one key below `kv_lengths`.
    block_gap: f32 [batch, kv_heads, n_kv_blocks]: max over the group's rows
      of `block_max - reference_max`, compared with log λ.
    stats: `SkipStats` per (batch, q-head) (every head of a group reports
      its group's counts).
  """

  out: jax.Array
  lse: jax.Array
  skip_mask: jax.Array
  visited_mask: jax.Array
  block_gap: jax.Array
  stats: SkipStats


DECODE_MAX_MODES = ("split", "anchored", "global")


def decode_split_starts(kv_lengths, num_blocks: int, block_kv: int,
                        num_splits: int) -> jax.Array:
  """bool [batch, num_blocks]: the blocks that start a split.

  `kv_lengths` is int [batch]; `num_blocks` the padded block count.

  A sequence's `ceil(kv_len / block_kv)` blocks are cut into `num_splits`
  contiguous runs of `ceil(n_blocks / num_splits)` blocks (the last runs may
  be shorter or empty), so ragged batches share the work evenly.
  """
  n_blocks = -(-kv_lengths // block_kv)                          # [b]
  per_split = jnp.maximum(-(-n_blocks // num_splits), 1)         # [b]
  j = jnp.arange(num_blocks)[None, :]
  return (j % per_split[:, None]) == 0


def decode_anchor_max(m_blk, kv_lengths, block_kv: int) -> jax.Array:
  """Row max over each sequence's first and last block ("anchored" mode).

  Args:
    m_blk: f32 [batch, kv_heads, group, n_blocks], block row maxima (keys
      past the length at -inf).
    kv_lengths: int [batch].
    block_kv: keys per block.

  Returns:
    f32 [batch, kv_heads, group]; -inf for empty sequences.
  """
  last = jnp.maximum(-(-kv_lengths // block_kv) - 1, 0)          # [b]
  m_last = jnp.take_along_axis(m_blk, last[:, None, None, None], axis=3)
  return jnp.maximum(m_blk[..., 0], m_last[..., 0])


def blockwise_decode_attention(q, k, v, kv_lengths, *, block_kv: int,
                               threshold=0.0, num_splits: int = 1,
                               max_mode: str = "split", sm_scale=None,
                               log_threshold=None, initial_max=None,
                               max_axis_name=None) -> DecodeResult:
  """Decode attention with the exact skip rule of the decode kernels.

  Scores `s = sm_scale * q·kᵀ` (f32), keys at positions >= kv_lengths[b]
  masked. Blocks of `block_kv` keys are split as in `decode_split_starts`.
  A block j is skipped when `max_rows(rowmax(s_j) - m_ref) < log λ`, with
  the reference max `m_ref` set by `max_mode`:

  - "split" (one pass, split-K): within each split, blocks are visited in
    order with a running max that starts at -inf at the split's first block
    (which is therefore never skipped). More splits mean weaker running
    maxima, less skipping.
  - "anchored" (one pass): as "split", but each split's running max starts
    at the row max over two anchor blocks, the sequence's first block
    (attention sinks) and its last (the most recent tokens), where the
    largest scores usually are. A lower bound of the global max: it skips
    at most what "global" skips, and nearly as much when the anchors hold
    the maximum; no split's first block is forced in.
  - "global" (two passes): every block is compared with the global row max
    `m*` over all keys, the same for every split count.

  With `initial_max` every split's running max starts at the larger of it
  and the mode's start (-inf or the anchors), and "global" compares with
  the larger of it and `m*`: a known lower bound of the row max, e.g. the
  anchors of a sequence whose cache is cut over devices.

  The block holding a row's reference max is never skipped (unless
  `initial_max` exceeds it), and the output is softmax attention restricted
  to the kept blocks (the split partials merge exactly).

  Args:
    q: [batch, q_heads, head_dim].
    k, v: [batch, max_len, kv_heads, head_dim].
    kv_lengths: int [batch], 0 <= kv_lengths <= max_len.
    block_kv: keys per block (the kernel's).
    threshold: λ: a float, f32 [batch] or a `SkipSoftmaxConfig` ("decode"
      scale factor).
    num_splits: split-K factor (no effect when `max_mode="global"`).
    max_mode: "split", "anchored" or "global" (see above).
    sm_scale: default 1/sqrt(head_dim).
    log_threshold: optional f32 [batch], log λ; overrides `threshold`.
    initial_max: optional f32 [batch, q_heads] in units of sm_scale·q·kᵀ
      (-inf: none), see above.
    max_axis_name: inside `shard_map` with the cache positions cut over
      this mesh axis, "global" mode takes `m*` over every device's part
      (`lax.pmax`), so each part decides as one device would.

  Returns:
    A `DecodeResult`.

  Raises:
    ValueError: for an unknown `max_mode` or λ outside [0, 1). Other input
      is not validated (`blasst_jax.decode_attention` does that).
  """
  if max_mode not in DECODE_MAX_MODES:
    raise ValueError(f"`max_mode` must be one of {DECODE_MAX_MODES}, got "
                     f"{max_mode!r}.")
  b, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  g = hq // hkv
  sm_scale = default_sm_scale(d) if sm_scale is None else sm_scale
  kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
  if log_threshold is None:
    log_thr = config_lib.log_threshold(config_lib.resolve_threshold(
        threshold, kv_lengths, lk, b, phase="decode"))
  else:
    log_thr = jnp.broadcast_to(jnp.asarray(log_threshold, jnp.float32), (b,))
  nk = -(-lk // block_kv)

  qg = q.reshape(b, hkv, g, d)
  s = jnp.einsum("bhgd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST) * sm_scale
  key_valid = jnp.arange(lk)[None, :] < kv_lengths[:, None]      # [b, lk]
  s = jnp.where(key_valid[:, None, None, :], s, -jnp.inf)        # [b,hkv,g,lk]
  s_blocks = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, nk * block_kv - lk)),
                     constant_values=-jnp.inf)
  m_blk = jnp.max(s_blocks.reshape(b, hkv, g, nk, block_kv), axis=-1)
  visited = jnp.arange(nk)[None, :] * block_kv < kv_lengths[:, None]  # [b,nk]
  visited = jnp.broadcast_to(visited[:, None, :], (b, hkv, nk))

  def gap_to(reference_max, blk):                                # -> [b,hkv]
    gap = jnp.where(blk == -jnp.inf, -jnp.inf, blk - reference_max)
    return jnp.max(gap, axis=2)

  m_given = (jnp.full((b, hkv, g), -jnp.inf, jnp.float32)
             if initial_max is None else
             jnp.asarray(initial_max, jnp.float32).reshape(b, hkv, g))
  if max_mode == "global":
    m_star = jnp.max(s, axis=-1)                                 # [b,hkv,g]
    if max_axis_name is not None:
      m_star = jax.lax.pmax(m_star, max_axis_name)
    m_star = jnp.maximum(m_star, m_given)
    gaps = jax.vmap(lambda blk: gap_to(m_star, blk), in_axes=3,
                    out_axes=2)(m_blk)                           # [b,hkv,nk]
    skip = visited & (gaps < log_thr[:, None, None])
  else:
    starts = decode_split_starts(kv_lengths, nk, block_kv, num_splits)
    m_start = m_given                                            # [b,hkv,g]
    if max_mode == "anchored":
      m_start = jnp.maximum(m_start,
                            decode_anchor_max(m_blk, kv_lengths, block_kv))

    def step(m_run, xs):                                         # [b,hkv,g]
      blk, start, visited_j = xs        # [b,hkv,g], [b], [b,hkv]
      m_prev = jnp.where(start[:, None, None], m_start, m_run)
      gap = gap_to(m_prev, blk)
      # With m_prev = -inf the gap is +inf: a split's first block is kept.
      skip_j = visited_j & (gap < log_thr[:, None])
      keep = (visited_j & ~skip_j)[..., None]
      return jnp.where(keep, jnp.maximum(m_prev, blk), m_prev), (skip_j, gap)

    _, (skip, gaps) = jax.lax.scan(
        step, m_start, (jnp.moveaxis(m_blk, 3, 0), starts.T,
                        jnp.moveaxis(visited, 2, 0)))
    skip, gaps = jnp.moveaxis(skip, 0, 2), jnp.moveaxis(gaps, 0, 2)
  gaps = jnp.where(visited, gaps, -jnp.inf)

  kept_keys = jnp.repeat(visited & ~skip, block_kv, axis=2)[..., :lk]
  s_kept = jnp.where(kept_keys[:, :, None, :], s, -jnp.inf)
  m = jnp.max(s_kept, axis=-1, keepdims=True)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(s_kept - m_safe)                                   # [b,hkv,g,lk]
  l = jnp.sum(p, axis=-1)
  v_safe = jnp.where(key_valid[:, :, None, None], v, 0).astype(jnp.float32)
  acc = jnp.einsum("bhgk,bkhd->bhgd", p, v_safe,
                   precision=jax.lax.Precision.HIGHEST)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, m_safe[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)),
                  -jnp.inf)
  per_head = lambda x: jnp.repeat(jnp.sum(x, axis=-1, dtype=jnp.int32), g,  # pylint: disable=g-long-lambda
                                  axis=1)
  stats = SkipStats(skipped_blocks=per_head(skip),
                    visited_blocks=per_head(visited))
  return DecodeResult(out=out.reshape(b, hq, d).astype(q.dtype),
                      lse=lse.reshape(b, hq), skip_mask=skip,
                      visited_mask=visited, block_gap=gaps, stats=stats)
