"""Synthetic q/k/v with the score structure of trained language models.

Real attention heads mix an *attention sink* (the first few tokens take much
of the mass), a *local window* (recent tokens), and noise, with a sharpness
that differs between heads. `sink_local_qkv` builds q and k so that, with the
default `sm_scale = 1/sqrt(head_dim)`,

    s[i, j] ≈ sharpness[h] * L(i - j) + sink[h] * [j < sink_tokens] + noise

where `L(0) = 1` and `L` decays over about `window` positions (a sum of
cosines with random frequencies below π / window). That is the regime in
which skip-softmax finds its sparsity: once the sink block sets a high
running max, far-away blocks fall below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _per_head(value, num_heads: int) -> jax.Array:
  """A scalar or a sequence cycled over heads -> f32 [num_heads]."""
  if isinstance(value, (int, float)):
    return jnp.full((num_heads,), float(value), jnp.float32)
  values = list(value)
  return jnp.asarray([values[h % len(values)] for h in range(num_heads)],
                     jnp.float32)


def sink_local_qkv(key: jax.Array, *, batch: int, seq_len: int,
                   q_heads: int, kv_heads: int | None = None,
                   head_dim: int = 64, kv_len: int | None = None,
                   sharpness: float | Sequence[float] = (2.0, 6.0, 12.0, 20.0),
                   sink: float | Sequence[float] | None = None,
                   sink_tokens: int = 4, window: int = 64, noise: float = 1.0,
                   q_start: int = 0, dtype=jnp.float32):
  """Builds (q, k, v) with sink + local-window + noise scores.

  Args:
    key: PRNG key.
    batch, seq_len, q_heads, kv_heads, head_dim: shapes; q is
      [batch, seq_len, q_heads, head_dim], k and v are
      [batch, kv_len, kv_heads, head_dim]. Query i sits at position i,
      matching the top-left causal mask of `bj.attention`.
    kv_len: key length, default `seq_len`.
    sharpness: peak score of the local window, per head (cycled).
    sink: score of the sink tokens per head; default `0.75 * sharpness`.
    sink_tokens: how many leading tokens act as the sink.
    window: width of the local window in tokens.
    noise: standard deviation of the random part of each score.
    q_start: position of the first query (e.g. kv_len - 1 and seq_len = 1:
      the newest token of a decode step, without the other queries).
    dtype: dtype of the returned arrays.

  Returns:
    q, k, v.

  Raises:
    ValueError: for head_dim < 8 (too few dims for position and sink).
  """
  kv_heads = q_heads if kv_heads is None else kv_heads
  kv_len = seq_len if kv_len is None else kv_len
  if head_dim < 8:
    raise ValueError(f"head_dim must be >= 8 for this pattern, got {head_dim}.")
  n_freq = max(2, (head_dim * 3) // 8)        # 2 * n_freq dims carry position
  n_noise = head_dim - 2 * n_freq - 1          # one dim carries the sink
  k_freq, k_qn, k_kn, k_v = jax.random.split(key, 4)

  beta = _per_head(sharpness, q_heads)                       # [hq]
  sink_h = 0.75 * beta if sink is None else _per_head(sink, q_heads)
  omega = jax.random.uniform(k_freq, (n_freq,), minval=0.0,
                             maxval=math.pi / window)        # [f]
  k_pos = jnp.arange(kv_len, dtype=jnp.float32)
  q_pos = q_start + jnp.arange(seq_len, dtype=jnp.float32)

  def features(pos):                                         # [t, 2f]
    ang = pos[:, None] * omega[None, :]
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)

  # Noise dims: n·n' summed over n_noise dims has std noise when each side
  # has std sqrt(noise / sqrt(n_noise)).
  sigma = math.sqrt(noise / math.sqrt(max(n_noise, 1)))
  q_noise = sigma * jax.random.normal(k_qn, (batch, seq_len, q_heads, n_noise))
  k_noise = sigma * jax.random.normal(k_kn, (batch, kv_len, kv_heads, n_noise))

  fq = features(q_pos)[None, :, None, :] * (beta / n_freq)[None, None, :, None]
  fq = jnp.broadcast_to(fq, (batch, seq_len, q_heads, 2 * n_freq))
  q_sink = jnp.broadcast_to(sink_h[None, None, :, None],
                            (batch, seq_len, q_heads, 1))
  fk = jnp.broadcast_to(features(k_pos)[None, :, None, :],
                        (batch, kv_len, kv_heads, 2 * n_freq))
  k_sink = (k_pos < sink_tokens).astype(jnp.float32)
  k_sink = jnp.broadcast_to(k_sink[None, :, None, None],
                            (batch, kv_len, kv_heads, 1))

  # Undo the default sm_scale = 1/sqrt(head_dim) on the q side.
  q = jnp.concatenate([fq, q_sink, q_noise], axis=-1) * math.sqrt(head_dim)
  k = jnp.concatenate([fk, k_sink, k_noise], axis=-1)
  v = jax.random.normal(k_v, (batch, kv_len, kv_heads, head_dim))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_qkv(key: jax.Array, *, batch: int, seq_len: int, q_heads: int,
               kv_heads: int | None = None, head_dim: int = 64,
               kv_len: int | None = None, scale: float = 1.0,
               dtype=jnp.float32):
  """Plain Gaussian (q, k, v); `scale` sharpens the scores.

  Args:
    key: PRNG key.
    batch, seq_len, q_heads, kv_heads, head_dim, kv_len: shapes, as
      `sink_local_qkv` (kv_heads default q_heads, kv_len default seq_len).
    scale: multiplies q (score standard deviation ≈ scale, before
      sm_scale).
    dtype: dtype of the returned arrays.

  Returns:
    q [batch, seq_len, q_heads, head_dim], k and v [batch, kv_len, kv_heads,
    head_dim].
  """
  kv_heads = q_heads if kv_heads is None else kv_heads
  kv_len = seq_len if kv_len is None else kv_len
  kq, kk, kv = jax.random.split(key, 3)
  q = scale * jax.random.normal(kq, (batch, seq_len, q_heads, head_dim))
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def scattered_qkv(key: jax.Array, *, batch: int, seq_len: int,
                  q_heads: int, kv_heads: int | None = None,
                  head_dim: int = 64, block: int = 128, density: float = 0.3,
                  hit_score: float | Sequence[float] = (12.0, 16.0, 20.0),
                  sharpness: float | Sequence[float] = (10.0, 14.0, 18.0,
                                                        22.0),
                  sink_tokens: int = 4, window: int = 64, noise: float = 1.0,
                  dtype=jnp.float32):
  """`sink_local_qkv` plus relevant keys scattered over the whole context.

  Each KV block of `block` keys holds, with probability `density`, one
  "hit": a key whose score against every query is `hit_score[h] * u` with u
  uniform in (0, 1], so the blocks a threshold keeps far from the window
  are isolated or in short random runs (the retrieval pattern of long-context
  decoding), not one long run, and raising λ keeps fewer of them. One of the
  noise dimensions carries the hit.

  Args:
    key: PRNG key.
    batch, seq_len, q_heads, kv_heads, head_dim: shapes, as `sink_local_qkv`.
    block: KV block size over which hits are placed (the kernel's block_kv).
    density: probability that a block holds a hit.
    hit_score: the largest hit score per head (cycled), in units of
      sm_scale·q·kᵀ.
    sharpness, sink_tokens, window, noise: as `sink_local_qkv`.
    dtype: dtype of the returned arrays.

  Returns:
    q [batch, seq_len, q_heads, head_dim], k and v [batch, seq_len, kv_heads,
    head_dim].
  """
  if head_dim < 16:
    raise ValueError(f"head_dim must be >= 16 for this pattern, got "
                     f"{head_dim}.")
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density must be in [0, 1], got {density}.")
  kv_heads = q_heads if kv_heads is None else kv_heads
  k_base, k_hit, k_at, k_u = jax.random.split(key, 4)
  q, k, v = sink_local_qkv(k_base, batch=batch, seq_len=seq_len,
                           q_heads=q_heads, kv_heads=kv_heads,
                           head_dim=head_dim, sharpness=sharpness,
                           sink_tokens=sink_tokens, window=window, noise=noise,
                           dtype=jnp.float32)
  n_blocks = -(-seq_len // block)
  shape = (batch, n_blocks, kv_heads)
  has_hit = jax.random.bernoulli(k_hit, density, shape)
  offset = jax.random.randint(k_at, shape, 0, block)
  strength = jax.random.uniform(k_u, shape, minval=1e-3, maxval=1.0)
  pos = jnp.arange(n_blocks)[None, :, None] * block + offset    # [b, n, hkv]
  value = jnp.where(has_hit & (pos < seq_len), strength, 0.0)
  hit_dim = jnp.zeros((batch, n_blocks * block, kv_heads), jnp.float32)
  bi, ni, hi = jnp.meshgrid(jnp.arange(batch), jnp.arange(n_blocks),
                            jnp.arange(kv_heads), indexing="ij")
  hit_dim = hit_dim.at[bi, jnp.minimum(pos, n_blocks * block - 1), hi].set(
      value)[:, :seq_len]
  k = k.at[..., -1].set(hit_dim)
  # Undo the default sm_scale = 1/sqrt(head_dim) on the q side.
  score = _per_head(hit_score, q_heads) * math.sqrt(head_dim)   # [hq]
  q = q.at[..., -1].set(jnp.broadcast_to(score, q.shape[:-1]))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)
