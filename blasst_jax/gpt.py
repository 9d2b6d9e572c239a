"""A small decoder-only GPT whose attention is causal skip-softmax.

    model = GPT(vocab_size=256, max_len=512, num_layers=2, d_model=128,
                num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0))
    logits = model(tokens)                             # [batch, seq, vocab]
    logits, stats = model(tokens, threshold=1e-2, return_stats=True)
    [s.total_sparsity for s in stats]                  # one per layer

Token + learned position embeddings, pre-LayerNorm blocks (causal
`blasst_jax.nn.SkipSelfAttention`, MHA/GQA/MQA, then a GELU MLP), a final
LayerNorm and a tied (embedding transpose) or untied output head. Logits are
f32 whatever the compute dtype, so the loss is computed in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blasst_jax import nn as bjnn
from blasst_jax.config import SkipStats


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


class MLP(nnx.Module):
  """x [batch, seq, d_model] -> GELU(x W1) W2, same shape."""

  def __init__(self, d_model: int, hidden: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, d_model, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then + MLP(LN(x))."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               mlp_hidden: int, *, threshold, implementation, block_q,
               block_kv, dtype, param_dtype, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.attn = bjnn.SkipSelfAttention(
        num_heads, d_model, num_kv_heads=num_kv_heads, threshold=threshold,
        causal=True, implementation=implementation, block_q=block_q,
        block_kv=block_kv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.mlp = MLP(d_model, mlp_hidden, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)

  def __call__(self, x, *, threshold=None):
    """x [batch, seq, d_model] -> (same shape, SkipStats [batch, heads])."""
    h, stats = self.attn(self.ln1(x), threshold=threshold, return_stats=True)
    x = x + h
    return x + self.mlp(self.ln2(x)), stats


class GPT(nnx.Module):
  """Decoder-only language model; see the module docstring.

  Attributes:
    token_embed: `nnx.Embed` [vocab_size, d_model].
    pos_embed: `nnx.Embed` [max_len, d_model].
    blocks: the `Block`s.
    ln_f: final LayerNorm.
    head: `nnx.Linear` d_model -> vocab_size, or None when tied.
  """

  def __init__(self, vocab_size: int, max_len: int, *, num_layers: int = 2,
               d_model: int = 128, num_heads: int = 4,
               num_kv_heads: int | None = None, mlp_ratio: int = 4,
               tie_embeddings: bool = True, threshold=0.0,
               implementation: str | None = None, block_q: int | None = None,
               block_kv: int | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      vocab_size: number of token ids.
      max_len: longest sequence (size of the position table).
      num_layers: transformer blocks.
      d_model: residual width; a multiple of num_heads (head_dim =
        d_model // num_heads).
      num_heads: query heads per layer.
      num_kv_heads: key/value heads, a divisor of num_heads (None: MHA).
      mlp_ratio: MLP hidden width = mlp_ratio * d_model.
      tie_embeddings: reuse the token embedding as the output projection.
      threshold: default λ or `SkipSoftmaxConfig` of every layer (0: dense);
        a call may override it.
      implementation, block_q, block_kv: passed to `blasst_jax.attention`.
      dtype: compute dtype (e.g. jnp.bfloat16); None follows the params.
      param_dtype: parameter dtype.
      rngs: initialisation randomness.
    """
    for name, value in (("vocab_size", vocab_size), ("max_len", max_len),
                        ("num_layers", num_layers), ("d_model", d_model),
                        ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
      _check_positive_int(name, value)
    if d_model % num_heads:
      raise ValueError(f"`d_model` ({d_model}) must be a multiple of "
                       f"num_heads ({num_heads}).")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.vocab_size = int(vocab_size)
    self.max_len = int(max_len)
    self.tie_embeddings = bool(tie_embeddings)
    self.dtype = dtype
    self.token_embed = nnx.Embed(vocab_size, d_model, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.pos_embed = nnx.Embed(max_len, d_model, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([
        Block(d_model, num_heads, num_kv_heads, mlp_ratio * d_model,
              threshold=threshold, implementation=implementation,
              block_q=block_q, block_kv=block_kv, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    self.head = None if tie_embeddings else nnx.Linear(
        d_model, vocab_size, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens, *, threshold=None, return_stats: bool = False):
    """Next-token logits.

    Args:
      tokens: int [batch, seq_len], seq_len <= max_len.
      threshold: overrides every layer's λ for this call (float, traced
        scalar or `SkipSoftmaxConfig`).
      return_stats: also return the per-layer `SkipStats`.

    Returns:
      f32 logits [batch, seq_len, vocab_size], or (logits, [SkipStats
      ([batch, num_heads] counts)] * num_layers).
    """
    if tokens.ndim != 2:
      raise ValueError(f"`tokens` must have shape [batch, seq_len], got "
                       f"{tokens.shape}.")
    t = tokens.shape[1]
    if t > self.max_len:
      raise ValueError(f"seq_len {t} exceeds the model's max_len "
                       f"{self.max_len}.")
    x = self.token_embed(tokens) + self.pos_embed(jnp.arange(t))[None]
    stats: list[SkipStats] = []
    for block in self.blocks:
      x, s = block(x, threshold=threshold)                 # [b, t, d_model]
      stats.append(s)
    x = self.ln_f(x)
    if self.tie_embeddings:
      logits = self.token_embed.attend(x)                  # [b, t, vocab]
    else:
      logits = self.head(x)
    logits = logits.astype(jnp.float32)
    return (logits, stats) if return_stats else logits
