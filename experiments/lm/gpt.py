"""A small decoder-only GPT whose attention is causal skip-softmax.

    model = GPT(vocab_size=256, max_len=512, num_layers=2, d_model=128,
                num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0))
    logits = model(tokens)                             # [batch, seq, vocab]
    logits, stats = model(tokens, threshold=1e-2, return_stats=True)
    [s.total_sparsity for s in stats]                  # one per layer

Token embeddings plus learned position embeddings (`position="learned"`,
the default) or rotary embeddings of q and k in every layer
(`position="rope"`), pre-norm blocks (LayerNorm or RMSNorm, causal
`blasst_jax.nn.SkipSelfAttention`, MHA/GQA/MQA, then a GELU MLP), a final
norm and a tied (embedding transpose) or untied output head. Logits are f32
whatever the compute dtype, so the loss is computed in f32.

    model = GPT(8192, 4096, position="rope", norm="rmsnorm", num_heads=8,
                num_kv_heads=2, rngs=nnx.Rngs(0))
    model.set_rope_scale(2.0)   # position interpolation: read 8192 tokens
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blasst_jax import nn as bjnn
from blasst_jax.config import SkipStats


POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _norm(kind: str, d_model: int, *, dtype, param_dtype, rngs: nnx.Rngs):
  cls = nnx.LayerNorm if kind == "layernorm" else nnx.RMSNorm
  return cls(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


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
  """Pre-norm transformer block: x + Attn(LN(x)), then + MLP(LN(x))."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               mlp_hidden: int, *, threshold, implementation, block_q,
               block_kv, dtype, param_dtype, rope: bool = False,
               rope_base: float = 10000.0, rope_scale: float = 1.0,
               norm: str = "layernorm", mesh=None, batch_axis=None,
               head_axis=None, rngs: nnx.Rngs):
    self.ln1 = _norm(norm, d_model, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.attn = bjnn.SkipSelfAttention(
        num_heads, d_model, num_kv_heads=num_kv_heads, threshold=threshold,
        causal=True, implementation=implementation, block_q=block_q,
        block_kv=block_kv, dtype=dtype, param_dtype=param_dtype, rope=rope,
        rope_base=rope_base, rope_scale=rope_scale, mesh=mesh,
        batch_axis=batch_axis, head_axis=head_axis, rngs=rngs)
    self.ln2 = _norm(norm, d_model, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.mlp = MLP(d_model, mlp_hidden, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)

  def __call__(self, x, *, threshold=None, block_selector=None):
    """x [batch, seq, d_model] -> (same shape, SkipStats [batch, heads]).

    `block_selector`: see `blasst_jax.nn.SkipSelfAttention.__call__`.
    """
    h, stats = self.attn(self.ln1(x), threshold=threshold, return_stats=True,
                         block_selector=block_selector)
    x = x + h
    return x + self.mlp(self.ln2(x)), stats


class GPT(nnx.Module):
  """Decoder-only language model; see the module docstring.

  Attributes:
    token_embed: `nnx.Embed` [vocab_size, d_model].
    pos_embed: `nnx.Embed` [max_len, d_model], or None with RoPE.
    blocks: the `Block`s.
    ln_f: final norm.
    head: `nnx.Linear` d_model -> vocab_size, or None when tied.
  """

  def __init__(self, vocab_size: int, max_len: int, *, num_layers: int = 2,
               d_model: int = 128, num_heads: int = 4,
               num_kv_heads: int | None = None, mlp_ratio: int = 4,
               tie_embeddings: bool = True, threshold=0.0,
               implementation: str | None = None, block_q: int | None = None,
               block_kv: int | None = None, dtype=None,
               param_dtype=jnp.float32, position: str = "learned",
               rope_base: float = 10000.0, rope_scale: float = 1.0,
               norm: str = "layernorm", mesh=None, batch_axis=None,
               head_axis=None, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      vocab_size: number of token ids.
      max_len: longest sequence: the size of the learned position table;
        with RoPE only recorded (the training length), longer inputs run.
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
      position: "learned" (a position table added to the token embeddings)
        or "rope" (q and k rotated in every layer, no table).
      rope_base, rope_scale: RoPE frequency base and position interpolation
        (positions / rope_scale); see `set_rope_scale`.
      norm: "layernorm" or "rmsnorm", in the blocks and at the end.
      mesh, batch_axis, head_axis: shard every attention layer's batch and
        heads over these mesh axes (`blasst_jax.sharding`; see
        `nn.SkipSelfAttention`). None: one device.
      rngs: initialisation randomness.

    Raises:
      ValueError: for an unknown `position` or `norm`, a size that is not a
        positive int, a d_model that num_heads does not divide, or (from the
        layers) bad head counts, λ, implementation or block sizes.
    """
    if position not in POSITIONS:
      raise ValueError(f"`position` must be one of {POSITIONS}, got "
                       f"{position!r}.")
    if norm not in NORMS:
      raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
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
    self.position = position
    self.token_embed = nnx.Embed(vocab_size, d_model, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.pos_embed = None if position == "rope" else nnx.Embed(
        max_len, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([
        Block(d_model, num_heads, num_kv_heads, mlp_ratio * d_model,
              threshold=threshold, implementation=implementation,
              block_q=block_q, block_kv=block_kv, dtype=dtype,
              param_dtype=param_dtype, rope=position == "rope",
              rope_base=rope_base, rope_scale=rope_scale, norm=norm,
              mesh=mesh, batch_axis=batch_axis, head_axis=head_axis,
              rngs=rngs)
        for _ in range(num_layers)])
    self.ln_f = _norm(norm, d_model, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
    self.head = None if tie_embeddings else nnx.Linear(
        d_model, vocab_size, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens, *, threshold=None, return_stats: bool = False,
               block_selector=None):
    """Next-token logits.

    Args:
      tokens: int [batch, seq_len]; seq_len <= max_len with learned
        positions.
      threshold: overrides every layer's λ for this call (float, traced
        scalar or `SkipSoftmaxConfig`).
      return_stats: also return the per-layer `SkipStats`.
      block_selector: optional `fn(q, k) -> bool block_mask` applied in
        every layer (q [batch, seq_len, num_heads, head_dim], k [batch,
        seq_len, num_kv_heads, head_dim] after RoPE; the mask [batch,
        num_heads, n_q_tiles, n_kv_blocks] in the layers' block_q x block_kv
        tiles), e.g. XAttention selection (`experiments.lm.lm_eval.
        xattention_selector`); skipping applies inside the selected blocks.

    Returns:
      f32 logits [batch, seq_len, vocab_size], or (logits, [SkipStats
      ([batch, num_heads] counts)] * num_layers).
    """
    if tokens.ndim != 2:
      raise ValueError(f"`tokens` must have shape [batch, seq_len], got "
                       f"{tokens.shape}.")
    t = tokens.shape[1]
    x = self.token_embed(tokens)
    if self.pos_embed is not None:
      if t > self.max_len:
        raise ValueError(f"seq_len {t} exceeds the model's max_len "
                         f"{self.max_len} (the learned position table; "
                         f"position='rope' has none).")
      x = x + self.pos_embed(jnp.arange(t))[None]
    stats: list[SkipStats] = []
    for block in self.blocks:
      x, s = block(x, threshold=threshold,
                   block_selector=block_selector)          # [b, t, d_model]
      stats.append(s)
    x = self.ln_f(x)
    if self.tie_embeddings:
      logits = self.token_embed.attend(x)                  # [b, t, vocab]
    else:
      logits = self.head(x)
    logits = logits.astype(jnp.float32)
    return (logits, stats) if return_stats else logits

  def set_rope_scale(self, scale: float) -> None:
    """Sets every layer's RoPE position interpolation (positions / scale).

    E.g. 2.0 lets a model trained on max_len tokens read 2 * max_len with
    the angles it was trained on.

    Raises:
      ValueError: without RoPE (position="learned") or for scale <= 0.
    """
    if self.position != "rope":
      raise ValueError("`set_rope_scale` needs a model built with "
                       "position='rope'.")
    if not scale > 0:
      raise ValueError(f"`scale` must be > 0, got {scale!r}.")
    for block in self.blocks:
      block.attn.rope_scale = float(scale)
