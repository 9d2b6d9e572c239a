"""A Llama-family decoder (Llama 2/3, SmolLM, TinyLlama...) in Flax NNX.

Every attention layer is a `blasst_jax.nn.SkipSelfAttention`: prefill runs
`blasst_jax.attention`, one-token steps run `blasst_jax.decode_attention`
(or `paged_decode_attention` over a paged cache), so a λ set on the model
skips blocks in every layer of a real pretrained network.

    from blasst_jax import models
    model, tokenizer = models.load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    logits = model(tokens)                       # [batch, seq, vocab] f32
    out = models.generate(model, prompts, max_new_tokens=32, threshold=0.1)

Architecture (Hugging Face `LlamaForCausalLM`): token embedding; per layer
x + Attn(RMSNorm(x)) with RoPE on q and k and grouped-query heads, then
x + SwiGLU(RMSNorm(x)) = down(silu(gate(x)) * up(x)); a final RMSNorm; an
output head, or the embedding's transpose when tied.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import nn as bjnn

__all__ = ["Llama", "LlamaConfig", "RMSNorm"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The shape of a Llama-family model.

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
      num_kv_heads: sizes (num_heads a multiple of num_kv_heads).
    head_dim: per-head width, default hidden_size // num_heads.
    rms_norm_eps: RMSNorm epsilon.
    rope_base: RoPE frequency base ("rope_theta").
    rope_pairing: "half" (Hugging Face weights) or "interleaved" (GGUF
      weights as stored), see `blasst_jax.nn.apply_rope`.
    tie_embeddings: the output head is the embedding's transpose.
    max_position: the context the model was trained for (informational:
      RoPE has no table; longer inputs run, with degraded quality).
    bos_id, eos_id: special token ids, or None.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_base: float = 10000.0
  rope_pairing: str = "half"
  tie_embeddings: bool = False
  max_position: int = 2048
  bos_id: int | None = None
  eos_id: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads", "max_position"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got "
                         f"{value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
          f"num_kv_heads ({self.num_kv_heads}).")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"LlamaConfig.hidden_size ({self.hidden_size}) must be a multiple "
            f"of num_heads ({self.num_heads}) when head_dim is not given.")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim % 2 or self.head_dim <= 0:
      raise ValueError(f"LlamaConfig.head_dim must be a positive even int "
                       f"(RoPE), got {self.head_dim!r}.")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got "
                       f"{self.rms_norm_eps!r}.")
    if not self.rope_base > 1:
      raise ValueError(f"LlamaConfig.rope_base must be > 1, got "
                       f"{self.rope_base!r}.")
    if self.rope_pairing not in bjnn.ROPE_PAIRINGS:
      raise ValueError(f"LlamaConfig.rope_pairing must be one of "
                       f"{bjnn.ROPE_PAIRINGS}, got {self.rope_pairing!r}.")

  @classmethod
  def from_hf(cls, hf: dict) -> "LlamaConfig":
    """From a Hugging Face `config.json` dict (LlamaForCausalLM)."""
    required = ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"config.json lacks {missing} (a Llama config needs "
                       f"{list(required)}).")
    if hf.get("rope_scaling"):
      raise ValueError(f"config.json has rope_scaling={hf['rope_scaling']!r}"
                       ", which this model does not implement (plain RoPE "
                       "only).")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ValueError("config.json asks for attention_bias / mlp_bias: this "
                       "Llama model has no projection biases.")
    eos = hf.get("eos_token_id")
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads",
                            hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=float(hf.get("rope_theta", 10000.0)),
        rope_pairing="half",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
        bos_id=hf.get("bos_token_id"),
        eos_id=eos[0] if isinstance(eos, list) else eos)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight over the last axis, computed in f32."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = float(eps)

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True)
                            + self.eps)
    return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """x [..., hidden] -> down(silu(gate(x)) * up(x)), same shape."""

  def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(  # pylint: disable=g-long-lambda
        i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = linear(hidden, intermediate)
    self.up = linear(hidden, intermediate)
    self.down = linear(intermediate, hidden)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nnx.Module):
  """x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

  def __init__(self, cfg: LlamaConfig, *, threshold, implementation, block_q,
               block_kv, dtype, param_dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                             param_dtype=param_dtype)
    self.attn = bjnn.SkipSelfAttention(
        cfg.num_heads, cfg.hidden_size, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, threshold=threshold, causal=True,
        implementation=implementation, block_q=block_q, block_kv=block_kv,
        dtype=dtype, param_dtype=param_dtype, rope=True,
        rope_base=cfg.rope_base, rope_pairing=cfg.rope_pairing, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                            param_dtype=param_dtype)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, *, mode: str, return_stats: bool, **attn_kwargs):
    """x [batch, seq, hidden] -> (same shape, the attention's stats or None).

    mode: "forward" (`SkipSelfAttention.__call__`), "prefill" (fills the
    cache) or "decode" (one token against the cache).
    """
    attend = {"forward": self.attn.__call__, "prefill": self.attn.prefill,
              "decode": self.attn.decode}[mode]
    result = attend(self.attn_norm(x), return_stats=return_stats,
                    **attn_kwargs)
    h, stats = result if return_stats else (result, None)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), stats


class Llama(nnx.Module):
  """Llama-family causal LM with skip-softmax attention in every layer.

  Attributes:
    config: the `LlamaConfig`.
    embed: `nnx.Embed` [vocab_size, hidden_size].
    blocks: the `LlamaBlock`s (`blocks[i].attn` is a `SkipSelfAttention`).
    norm: the final `RMSNorm`.
    lm_head: `nnx.Linear` hidden -> vocab, or None when tied.
    position: "rope" (the interface `experiments.lm.lm_eval` reads).
  """

  def __init__(self, config: LlamaConfig, *, threshold=0.0,
               implementation: str | None = None, block_q: int | None = None,
               block_kv: int | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    """Builds a randomly initialised model (see `models.load_gguf` /
    `models.load_hf` for pretrained weights).

    Args:
      config: the model's shape.
      threshold: default λ of every layer (0: dense) or a
        `SkipSoftmaxConfig`; calls may override it.
      implementation, block_q, block_kv: passed to every
        `SkipSelfAttention` (None: the backend's best, its default tiles).
      dtype: computation dtype (bf16 for speed on GPU; logits are f32).
      param_dtype: parameter dtype.
      rngs: initialisation randomness (default `nnx.Rngs(0)`).
    """
    if not isinstance(config, LlamaConfig):
      raise ValueError(f"`config` must be a LlamaConfig, got "
                       f"{type(config).__name__}.")
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.config = config
    self.dtype = dtype
    self.position = "rope"
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([
        LlamaBlock(config, threshold=threshold, implementation=implementation,
                   block_q=block_q, block_kv=block_kv, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                        param_dtype=param_dtype)
    self.lm_head = None if config.tie_embeddings else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  # ------------------------------------------------------------- helpers
  def _logits(self, x):
    """Final norm and head: [..., hidden] -> f32 [..., vocab]."""
    x = self.norm(x)
    logits = (self.embed.attend(x) if self.lm_head is None
              else self.lm_head(x))
    return logits.astype(jnp.float32)

  def _run(self, x, mode: str, return_stats: bool, **attn_kwargs):
    """x through every block: (x, [per-layer stats] or None)."""
    stats = []
    for block in self.blocks:
      x, s = block(x, mode=mode, return_stats=return_stats, **attn_kwargs)
      stats.append(s)
    return x, stats

  @staticmethod
  def _check_tokens(tokens, ndim: int, shape: str):
    if not hasattr(tokens, "ndim") or tokens.ndim != ndim or not jnp.issubdtype(
        tokens.dtype, jnp.integer):
      raise ValueError(f"`tokens` must be int {shape}, got "
                       f"{getattr(tokens, 'dtype', type(tokens))}"
                       f"{list(getattr(tokens, 'shape', []))}.")

  # ------------------------------------------------------------ forwards
  def __call__(self, tokens, *, threshold=None, return_stats: bool = False,
               block_selector=None, kv_lengths=None):
    """Next-token logits of every position (no cache).

    Args:
      tokens: int [batch, seq_len].
      threshold: overrides every layer's λ (float, traced scalar, f32
        [batch] or `SkipSoftmaxConfig`).
      return_stats: also return the per-layer `SkipStats`.
      block_selector: optional `fn(q, k) -> bool block_mask` for every layer
        (see `SkipSelfAttention.__call__`), e.g. XAttention.
      kv_lengths: optional int [batch]: right padding past it is ignored.

    Returns:
      f32 logits [batch, seq_len, vocab_size], or (logits,
      [SkipStats ([batch, num_heads] counts)] * num_layers).
    """
    self._check_tokens(tokens, 2, "[batch, seq_len]")
    x, stats = self._run(self.embed(tokens), "forward", return_stats,
                         threshold=threshold,
                         kv_lengths=kv_lengths, block_selector=block_selector)
    logits = self._logits(x)
    return (logits, stats) if return_stats else logits

  def set_rope_scale(self, scale: float) -> None:
    """Sets every layer's RoPE position interpolation (positions / scale)."""
    if not scale > 0:
      raise ValueError(f"`scale` must be > 0, got {scale!r}.")
    for block in self.blocks:
      block.attn.rope_scale = float(scale)

  # ------------------------------------------------------------- caching
  def init_cache(self, batch: int, max_len: int, *, dtype=None,
                 page_size: int | None = None) -> None:
    """Allocates every layer's KV cache (see `SkipSelfAttention.init_cache`).

    Args:
      batch: sequences generated together.
      max_len: the longest prompt plus generated tokens.
      dtype: the cache dtype, default the model's computation dtype.
      page_size: None (contiguous) or tokens per page (paged cache).
    """
    dtype = self.dtype if dtype is None else dtype
    for block in self.blocks:
      block.attn.init_cache(batch, max_len, dtype, page_size=page_size)

  def prefill(self, tokens, *, lengths=None, threshold=None,
              return_stats: bool = False):
    """Runs the prompt, fills the caches, returns the next token's logits.

    Args:
      tokens: int [batch, seq_len], right-padded prompts.
      lengths: optional int [batch] real prompt lengths (default seq_len).
      threshold: overrides every layer's λ.
      return_stats: also return the per-layer `SkipStats`.

    Returns:
      f32 [batch, vocab_size]: the logits after each prompt's last real
      token, or (that, [SkipStats] * num_layers).
    """
    self._check_tokens(tokens, 2, "[batch, seq_len]")
    b, t = tokens.shape
    x, stats = self._run(self.embed(tokens), "prefill", return_stats,
                         threshold=threshold,
                         kv_lengths=lengths)               # [b, t, hidden]
    last = (jnp.full((b,), t - 1) if lengths is None
            else jnp.asarray(lengths) - 1)
    x = jnp.take_along_axis(x, last[:, None, None].astype(jnp.int32),
                            axis=1)[:, 0]                  # [b, hidden]
    logits = self._logits(x)
    return (logits, stats) if return_stats else logits

  def decode_step(self, tokens, *, threshold=None, num_splits=None,
                  max_mode=None, return_stats: bool = False):
    """Appends one token per sequence and returns the next token's logits.

    Args:
      tokens: int [batch], the newest token of every sequence.
      threshold: overrides every layer's λ (a `SkipSoftmaxConfig` uses its
        decode scale factor).
      num_splits, max_mode: passed to `blasst_jax.decode_attention`
        (None: its defaults).
      return_stats: also return the per-layer `DecodeStats`.

    Returns:
      f32 [batch, vocab_size], or (that, [DecodeStats] * num_layers).
    """
    self._check_tokens(tokens, 1, "[batch]")
    options = dict(threshold=threshold, num_splits=num_splits)
    if max_mode is not None:
      options["max_mode"] = max_mode
    x, stats = self._run(self.embed(tokens[:, None]), "decode",
                         return_stats, **options)
    logits = self._logits(x[:, 0])
    return (logits, stats) if return_stats else logits

