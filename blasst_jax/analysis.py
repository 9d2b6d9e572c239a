"""Measurements of what skipping costs: dropped softmax mass and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blasst_jax import config as config_lib
from blasst_jax import reference


def dropped_attention_mass(q, k, skip_mask, *, block_q=None, block_kv=None,
                           causal=False, sm_scale=None, kv_lengths=None):
  """Dense softmax mass that falls in skipped blocks, per query row.

  Args:
    q: [batch, q_len, q_heads, head_dim]; k: [batch, kv_len, kv_heads, d].
    skip_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks], e.g.
      `reference.blockwise_attention(...).skip_mask`.
    block_q, block_kv: the block sizes the mask was made with.

  Returns:
    f32 [batch, q_heads, q_len] in [0, 1]: for each row, the probability
    that dense attention puts on keys of skipped blocks.
  """
  b, lq, hq, _ = q.shape
  lk = k.shape[1]
  block_q, block_kv = config_lib.effective_block_sizes(lq, lk, block_q,
                                                       block_kv)
  p = reference.attention_probabilities(q, k, causal=causal,
                                        sm_scale=sm_scale,
                                        kv_lengths=kv_lengths)
  nq, nk = skip_mask.shape[-2:]
  p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, nk * block_kv - lk)))
  p_blocks = p.reshape(b, hq, lq, nk, block_kv).sum(-1)   # [b, hq, lq, nk]
  row_tile = jnp.arange(lq) // block_q                     # [lq]
  skipped_rows = skip_mask[:, :, row_tile, :]              # [b, hq, lq, nk]
  return jnp.sum(jnp.where(skipped_rows, p_blocks, 0.0), axis=-1)


def error_summary(out, expected) -> dict[str, jax.Array]:
  """Max abs, mean abs and relative L2 error of `out` against `expected`."""
  out = jnp.asarray(out, jnp.float32)
  expected = jnp.asarray(expected, jnp.float32)
  diff = out - expected
  return {
      "max_abs": jnp.max(jnp.abs(diff)),
      "mean_abs": jnp.mean(jnp.abs(diff)),
      "rel_l2": jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(expected),
                                                    1e-30),
  }


def skip_error_bound(v, skip_mask, threshold, *, block_q, block_kv,
                     q_len: int):
  """Upper bound on |out_skip - out_dense| per (batch, q-head, row).

  Every skipped block j has, for every row, `max_j s - m_prev < log λ`, so
  each of its <= block_kv weights is below λ relative to the row max, which
  itself lies in a kept block. The dropped probability is therefore
  δ <= D / (1 + D) with D = n_skipped * block_kv * λ, and the output moves by
  at most δ * (max v - min v) per feature.

  Args:
    v: [batch, kv_len, kv_heads, head_dim].
    skip_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks].
    threshold: λ, a float or f32 [batch].

  Returns:
    f32 [batch, q_heads, q_len].
  """
  b, _, hkv, _ = v.shape
  hq = skip_mask.shape[1]
  vf = v.astype(jnp.float32)
  spread = (jnp.max(vf, axis=(1, 3)) - jnp.min(vf, axis=(1, 3)))  # [b, hkv]
  spread = jnp.repeat(spread, hq // hkv, axis=1)                   # [b, hq]
  n_skip = jnp.sum(skip_mask, axis=-1).astype(jnp.float32)          # [b,hq,nq]
  lam = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (b,))
  dropped = n_skip * block_kv * lam[:, None, None]
  delta = dropped / (1.0 + dropped)
  per_tile = delta * spread[..., None]
  return jnp.repeat(per_tile, block_q, axis=-1)[..., :q_len]
