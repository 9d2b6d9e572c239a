"""XAttention-style block selection (antidiagonal scoring).

    mask = bj.xattention.select_blocks(q, k, block_size=128, stride=8,
                                       threshold=0.9, causal=True)
    out = bj.attention(q, k, v, causal=True, block_mask=mask, threshold=1e-3)

Each (q-block, kv-block) pair is scored cheaply: queries and keys are cut
into groups of `stride` consecutive tokens, and a query group scores a key
group by the sum of q·k along the group's antidiagonal (query `stride-1-t`
with key `t`), i.e. one dot product of the reversed-and-concatenated query
group with the concatenated key group. A softmax over these strided scores
(per query group, causal and length masks applied at group granularity),
summed over the groups of each block, estimates the attention mass of the
block. Per query block the selection keeps the forced blocks (the first,
attention sinks; the diagonal) and then blocks in decreasing mass until the
kept mass reaches `threshold` of the row's total (the block that crosses it
is kept).

The estimate costs `(q_len / stride) * (kv_len / stride) * stride * head_dim`
multiply-adds per head, 1/stride of dense attention's q·kᵀ. On a GPU it runs
as one fused Pallas kernel (`kernels/xattention_triton.py`: the strided scores
never reach memory); elsewhere as XLA in chunks of query groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blasst_jax import reference
from blasst_jax import validation
from blasst_jax.kernels import xattention_triton
from blasst_jax.ops import base as ops_base

ESTIMATE_IMPLEMENTATIONS = ("xla", "pallas_triton")


def _strided(x, stride: int, reverse: bool):
  """[b, len, h, d] -> [b, len // stride, h, stride * d]: token groups
  concatenated along features (reversed inside the group for queries)."""
  b, n, h, d = x.shape
  x = x.reshape(b, n // stride, stride, h, d)
  if reverse:
    x = x[:, :, ::-1]
  return x.transpose(0, 1, 3, 2, 4).reshape(b, n // stride, h, stride * d)


def block_scores(q, k, *, block_size: int = 128, stride: int = 8,
                 causal: bool = False, kv_lengths=None, sm_scale=None,
                 q_chunk_blocks: int = 16, implementation: str | None = None,
                 config: xattention_triton.EstimateConfig | None = None,
                 interpret: bool = False) -> jax.Array:
  """Estimated attention mass per (q block, kv block).

  Each real query group's softmax over the strided scores sums to 1, so a
  q-block row sums to its number of real query groups.

  Args:
    q: [batch, q_len, q_heads, head_dim], float32/bfloat16/float16.
    k: [batch, kv_len, kv_heads, head_dim], same dtype, q_heads % kv_heads
      == 0 (GQA: each q head scores against its KV head).
    block_size: tokens per block, a multiple of `stride`; lengths are
      padded to whole blocks.
    stride: tokens per antidiagonal group.
    causal: top-left aligned, at group granularity (query group i sees key
      groups j <= i).
    kv_lengths: optional int [batch]; key groups starting at or past the
      length are masked.
    sm_scale: default 1/sqrt(head_dim); the strided scores are divided by
      `stride` as well (a group score sums `stride` products).
    q_chunk_blocks: XLA path: q blocks scored per step (memory: chunk *
      block_size / stride * kv_len / stride f32 per head).
    implementation: "pallas_triton" (the fused kernel; default on GPU when
      block_size / stride is a power of two) or "xla" (default elsewhere).
    config: `xattention_triton.EstimateConfig` tuning knobs of the kernel.
    interpret: run the kernel in Pallas interpret mode (CPU tests).

  Returns:
    f32 [batch, q_heads, n_q_blocks, n_kv_blocks], n_*_blocks =
    ceil(length / block_size).

  Raises:
    ValueError: on shapes of the wrong rank, mismatched batch / head_dim,
      q heads that are not a multiple of the KV heads, a stride or block
      size that does not fit, an unknown `implementation`, or
      "pallas_triton" with a block_size / stride it cannot tile.
  """
  validation.check_select_blocks_args(q, k, block_size, stride, 0.5,
                                       q_chunk_blocks)
  validation.check_causal(causal)
  validation.check_sm_scale(sm_scale)
  validation.check_kv_lengths(kv_lengths, q.shape[0])
  config = config or xattention_triton.EstimateConfig()
  implementation = _estimate_implementation(implementation, block_size,
                                            stride, config, interpret)
  b, lq, hq, d = q.shape
  lk = k.shape[1]
  sm_scale = reference.default_sm_scale(d) if sm_scale is None else sm_scale
  nq, nk = -(-lq // block_size), -(-lk // block_size)
  gpb = block_size // stride                        # groups per block
  lengths = reference.kv_lengths_or_full(kv_lengths, b, lk)
  if implementation == "pallas_triton":
    e, m = xattention_triton.chunk_sums(
        q, k, lengths, block_size=block_size, stride=stride, causal=causal,
        sm_scale=float(sm_scale), config=config, interpret=interpret)
    return xattention_triton.combine(
        e, m, n_q_groups=-(-lq // stride), n_q_blocks=nq, n_kv_blocks=nk,
        groups_per_block=gpb)
  return _xla_block_scores(q, k, lengths, block_size=block_size,
                           stride=stride, causal=causal, sm_scale=sm_scale,
                           q_chunk_blocks=q_chunk_blocks)


def _estimate_implementation(implementation, block_size, stride, config,
                             interpret):
  fits = xattention_triton.supports(block_size, stride, config)
  if implementation is None:
    return ("pallas_triton" if fits and (ops_base.on_gpu() or interpret)
            else "xla")
  if implementation not in ESTIMATE_IMPLEMENTATIONS:
    raise ValueError(f"`implementation` must be one of "
                     f"{ESTIMATE_IMPLEMENTATIONS} or None, got "
                     f"{implementation!r}.")
  if implementation == "pallas_triton" and not fits:
    raise ValueError(
        f"implementation='pallas_triton' needs block_size / stride "
        f"({block_size} / {stride}) to be a power of two and `config` "
        f"block_cols ({config.block_cols}) a power-of-two multiple of it; "
        "use implementation='xla'.")
  return implementation


def _xla_block_scores(q, k, lengths, *, block_size, stride, causal, sm_scale,
                      q_chunk_blocks):
  """The estimate in XLA, chunked over q blocks (see `block_scores`)."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  nq, nk = -(-lq // block_size), -(-lk // block_size)
  gpb = block_size // stride                        # groups per block
  chunk = min(q_chunk_blocks, nq)
  n_chunks = -(-nq // chunk)
  qp = jnp.pad(q, ((0, 0), (0, n_chunks * chunk * block_size - lq), (0, 0),
                   (0, 0)))
  kp = jnp.pad(k, ((0, 0), (0, nk * block_size - lk), (0, 0), (0, 0)))
  qs = _strided(qp, stride, reverse=True)           # [b, Gq, hq, stride*d]
  ks = _strided(kp, stride, reverse=False)          # [b, Gk, hkv, stride*d]
  key_group = jnp.arange(nk * gpb)
  key_ok = key_group[None, :] * stride < lengths[:, None]      # [b, Gk]
  scale = sm_scale / stride
  qs = qs.reshape(b, n_chunks, chunk * gpb, hkv, g, stride * d)
  n_q_groups = -(-lq // stride)

  def score_chunk(c):
    qc = qs[:, c]                                   # [b, cg, hkv, g, sd]
    s = jnp.einsum("bqhgx,bkhx->bhgqk", qc, ks,
                   preferred_element_type=jnp.float32) * scale
    q_group = c * chunk * gpb + jnp.arange(chunk * gpb)        # [cg]
    mask = key_ok[:, None, :]                                   # [b, 1, Gk]
    if causal:
      mask = mask & (key_group[None, :] <= q_group[:, None])[None]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    p = jnp.where((q_group < n_q_groups)[:, None], p, 0.0)     # padded rows
    p = p.reshape(b, hkv, g, chunk, gpb, nk, gpb)
    return jnp.sum(p, axis=(4, 6)).reshape(b, hq, chunk, nk)

  sums = jax.lax.map(score_chunk, jnp.arange(n_chunks))  # [nc, b, hq, ch, nk]
  sums = jnp.moveaxis(sums, 0, 2).reshape(b, hq, n_chunks * chunk, nk)
  return sums[:, :, :nq]


def select_from_scores(scores, threshold, *, allowed, forced) -> jax.Array:
  """Cumulative-mass selection.

  Args:
    scores: f32 [batch, heads, n_q_blocks, n_kv_blocks] block masses.
    threshold: τ in (0, 1]: a float, [heads] or [batch, heads].
    allowed: bool broadcastable to scores: blocks that may be selected.
    forced: bool broadcastable to scores: blocks always selected (when
      allowed).

  Returns:
    bool like scores: forced blocks, then blocks in decreasing mass while
    the mass kept before them is below τ · total (τ = 1 keeps every allowed
    block).

  τ is not range-checked here (`select_blocks` checks it).
  """
  b, h = scores.shape[:2]
  tau = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32).reshape(
      (-1, h) if jnp.ndim(threshold) == 2 else (1, -1)), (b, h))
  tau = tau[:, :, None, None]
  allowed = jnp.broadcast_to(allowed, scores.shape)
  forced = jnp.broadcast_to(forced, scores.shape) & allowed
  scores = jnp.where(allowed, scores, 0.0)
  total = jnp.sum(scores, axis=-1, keepdims=True)
  forced_mass = jnp.sum(jnp.where(forced, scores, 0.0), axis=-1,
                        keepdims=True)
  # Others by decreasing mass; the stable sort keeps ties in block order.
  others = jnp.where(forced | ~allowed, -1.0, scores)
  order = jnp.argsort(-others, axis=-1, stable=True)
  ranked = jnp.take_along_axis(others, order, axis=-1)
  before = forced_mass + jnp.cumsum(jnp.maximum(ranked, 0.0), axis=-1) \
      - jnp.maximum(ranked, 0.0)
  take_ranked = (before < tau * total) & (ranked >= 0)
  # Scatter back to block order (one sort, not a second one to invert it).
  take = jnp.put_along_axis(jnp.zeros_like(take_ranked), order, take_ranked,
                            axis=-1, inplace=False)
  keep_all = tau >= 1.0
  return forced | (allowed & (take | keep_all))


def select_blocks(q, k, *, block_size: int = 128, stride: int = 8,
                  threshold=0.9, causal: bool = False, kv_lengths=None,
                  keep_sink: bool = True, keep_diagonal: bool = True,
                  sm_scale=None, q_chunk_blocks: int = 16,
                  implementation: str | None = None,
                  config: xattention_triton.EstimateConfig | None = None,
                  interpret: bool = False) -> jax.Array:
  """XAttention block selection.

  Args:
    q: [batch, q_len, q_heads, head_dim].
    k: [batch, kv_len, kv_heads, head_dim]; q_heads % kv_heads == 0.
    block_size: tokens per block (a multiple of `stride`); the mask is for
      `bj.attention(..., block_mask=mask)` with this block size.
    stride: antidiagonal group size (8 or 16 in the paper).
    threshold: τ in (0, 1], the fraction of each q block's estimated
      attention mass to keep: a float, [q_heads] or [batch, q_heads].
    causal: top-left aligned; blocks above the diagonal are never selected.
    kv_lengths: optional int [batch]; blocks past the length are never
      selected.
    keep_sink: always keep kv block 0 (attention sinks).
    keep_diagonal: always keep kv block i for q block i (local context).
    sm_scale: default 1/sqrt(head_dim).
    q_chunk_blocks, implementation, config, interpret: how the estimate
      runs, see `block_scores` (no effect on the selection beyond f32
      rounding).

  Returns:
    bool [batch, q_heads, n_q_blocks, n_kv_blocks].

  Raises:
    ValueError: on bad shapes, stride/block size, τ outside (0, 1] or of
      another shape, or an estimate `implementation` that cannot run (see
      `block_scores`).
  """
  validation.check_select_blocks_args(q, k, block_size, stride, threshold,
                                       q_chunk_blocks)
  b, lq = q.shape[:2]
  lk = k.shape[1]
  scores = block_scores(q, k, block_size=block_size, stride=stride,
                        causal=causal, kv_lengths=kv_lengths,
                        sm_scale=sm_scale, q_chunk_blocks=q_chunk_blocks,
                        implementation=implementation, config=config,
                        interpret=interpret)
  nq, nk = scores.shape[2:]
  lengths = reference.kv_lengths_or_full(kv_lengths, b, lk)
  allowed = reference.visited_blocks_mask(lq, lk, block_size, block_size,
                                          lengths, causal)  # [b, 1, nq, nk]
  qi = jnp.arange(nq)[:, None]
  kj = jnp.arange(nk)[None, :]
  forced = jnp.zeros((nq, nk), bool)
  if keep_sink:
    forced = forced | (kj == 0)
  if keep_diagonal:
    forced = forced | (kj == qi)
  return select_from_scores(scores, threshold, allowed=allowed,
                            forced=forced[None, None])
