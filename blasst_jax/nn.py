"""Flax integration: a drop-in `attention_fn` and a self-attention layer.

    from flax import nnx
    import blasst_jax.nn as bjnn

    mha = nnx.MultiHeadAttention(
        num_heads=8, in_features=512, decode=False, rngs=nnx.Rngs(0),
        attention_fn=bjnn.make_attention_fn(threshold=1e-3))
    y = mha(x, is_causal=True)

    layer = bjnn.SkipSelfAttention(8, 512, num_kv_heads=2, threshold=1e-3,
                                   rngs=nnx.Rngs(0))
    y, stats = layer(x, kv_lengths=lengths, return_stats=True)

Flax's attention functions take arbitrary boolean masks and additive biases;
the skip-softmax kernels only know a causal mask and per-sequence key
lengths, which is what lets them skip whole blocks. `make_attention_fn`
therefore rejects `mask` and `bias` rather than silently dropping them.

Training: every implementation is differentiable. The gradient is that of
the sparse forward (skipped blocks carry zero probability); for the Pallas
kernels the backward recomputes the forward in pure JAX (correct, not yet
fast).
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from flax import nnx

from blasst_jax import api
from blasst_jax import decode as decode_lib
from blasst_jax import config as config_lib
from blasst_jax import sharding as sharding_lib
from blasst_jax import validation
from blasst_jax.config import SkipSoftmaxConfig, SkipStats

__all__ = ["SkipSelfAttention", "apply_rope", "make_attention_fn"]

# Set by `blasst_jax.analysis.capture_attention_inputs` while it runs a model:
# every attention call of this module reports its inputs to it (one
# contextvar lookup per call otherwise, no state on the modules).
attention_input_recorder: contextvars.ContextVar[Callable[..., None] | None] = (
    contextvars.ContextVar("blasst_jax_attention_input_recorder",
                           default=None))


def _report_inputs(module, q, k, v, **options) -> None:
  """Hands q/k/v ([batch, len, heads, head_dim]) to an active recorder."""
  recorder = attention_input_recorder.get()
  if recorder is not None:
    recorder(module, q, k, v, **options)


def _check_threshold(threshold: Any) -> None:
  """λ in [0, 1) or a SkipSoftmaxConfig (validated at construction)."""
  if not isinstance(threshold, SkipSoftmaxConfig):
    config_lib.check_threshold(threshold)


def _check_options(threshold, implementation, block_q, block_kv,
                   sm_scale) -> None:
  """Validates factory/constructor arguments before any call is traced."""
  _check_threshold(threshold)
  validation.check_implementation(implementation)
  # Shape-independent part of the block size check (power of two >= 16).
  config_lib.effective_block_sizes(1, 1, block_q, block_kv)
  validation.check_sm_scale(sm_scale)


ROPE_PAIRINGS = ("half", "interleaved")


def _check_rope_pairing(pairing) -> None:
  if pairing not in ROPE_PAIRINGS:
    raise ValueError(f"`rope_pairing` must be one of {ROPE_PAIRINGS} "
                     "('half': Hugging Face / GPT-NeoX layout, 'interleaved': "
                     f"GGUF / llama.cpp layout), got {pairing!r}.")


def apply_rope(x, positions, *, base: float = 10000.0, scale: float = 1.0,
               pairing: str = "half"):
  """Rotary position embedding (RoPE) of queries or keys.

  Dimension pairs of every head are rotated by the angle
  `positions / scale * base ** (-2 i / head_dim)`, so that the score of a
  rotated query at position p and a rotated key at position p' depends on
  p - p' only. `pairing="half"` rotates pairs (i, i + head_dim / 2) (the
  "rotate half" layout of GPT-NeoX and Hugging Face Llama);
  `pairing="interleaved"` rotates pairs (2 i, 2 i + 1) (Meta's original
  Llama and llama.cpp / GGUF, whose Q/K projections are stored permuted
  for it: `blasst_jax.models.weights.unpermute_qk` converts).
  `scale` > 1 interpolates positions (a model trained at length L reads
  scale * L tokens with the angles it saw in training).

  Args:
    x: [batch, seq_len, heads, head_dim], head_dim even.
    positions: int or float [batch, seq_len] or [seq_len].
    base: the frequency base (> 1).
    scale: positions are divided by it (> 0).
    pairing: "half" or "interleaved", which dimensions form a pair.

  Returns:
    x's shape and dtype; the rotation is computed in f32.

  Raises:
    ValueError: for an odd head_dim, positions of another length or an
      unknown pairing.
  """
  _check_rope_pairing(pairing)
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {d}.")
  positions = jnp.asarray(positions, jnp.float32)
  if positions.ndim == 1:
    positions = positions[None]
  if positions.shape[-1] != x.shape[1]:
    raise ValueError(f"`positions` must have shape [batch, {x.shape[1]}] or "
                     f"[{x.shape[1]}], got {positions.shape}.")
  inv_freq = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
  angle = (positions / scale)[..., None, None] * inv_freq    # [b, t, 1, d/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  xf = x.astype(jnp.float32)
  if pairing == "half":
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    pairs = xf.reshape(x.shape[:-1] + (d // 2, 2))     # [..., d/2, 2]
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                    axis=-1).reshape(x.shape)
  return out.astype(x.dtype)


def _sow(module: Any, stats: SkipStats) -> None:
  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "skip_stats", stats)
  elif isinstance(module, linen.Module):
    module.sow("intermediates", "skip_stats", stats)
  else:
    raise TypeError(
        "sow_stats=True needs a flax.linen or flax.nnx Module as `module`, "
        f"got {type(module).__name__}.")


def make_attention_fn(threshold=0.0, *, causal: bool = False,
                      implementation: str | None = None,
                      block_q: int | None = None, block_kv: int | None = None,
                      sm_scale: float | None = None, sow_stats: bool = False,
                      interpret: bool | None = None,
                      kernel_config=None) -> Callable[..., Any]:
  """Skip-softmax attention with Flax's `attention_fn` signature.

  The result plugs into `flax.linen.MultiHeadDotProductAttention` and
  `flax.nnx.MultiHeadAttention` (`attention_fn=...`).

  Args:
    threshold: λ in [0, 1) (0 = dense) or a `SkipSoftmaxConfig`.
    causal: always apply a top-left aligned causal mask. linen never passes
      `is_causal`, so set this there; nnx's `is_causal=True` also works.
    implementation: "reference", "pallas_triton" or None (best for backend).
    block_q, block_kv: tile sizes (powers of two >= 16), see `attention`.
    sm_scale: score scale, default 1/sqrt(head_dim) as in Flax.
    sow_stats: record a `SkipStats` ([*batch, q_heads] counts) under the name
      'skip_stats' of the calling module: the 'intermediates' collection for
      linen, `nnx.Intermediate` for nnx. Flax hands `module` to the
      attention_fn only when the layer is called with `sow_weights=True`.
    interpret, kernel_config: passed to `blasst_jax.attention`.

  Returns:
    `fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
    dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
    precision=None, module=None, is_causal=False, **unused_kwargs)` with
    query [*batch, q_len, q_heads, head_dim], key/value
    [*batch, kv_len, kv_heads, head_dim], returning
    [*batch, q_len, q_heads, head_dim]. `precision` is ignored (scores and
    softmax are always f32); `broadcast_dropout`, `dropout_rng` are unused
    since attention dropout is not supported.

  Raises:
    ValueError: on an invalid threshold, implementation, block size or
      sm_scale (here), and at call time on `mask`, `bias` or active dropout.
  """
  _check_options(threshold, implementation, block_q, block_kv, sm_scale)
  validation.check_causal(causal)

  def skip_softmax_attention(query, key, value, bias=None, mask=None,
                             broadcast_dropout=True, dropout_rng=None,
                             dropout_rate=0.0, deterministic=False, dtype=None,
                             precision=None, module=None, is_causal=False,
                             **unused_kwargs):
    del broadcast_dropout, dropout_rng, precision, unused_kwargs
    if bias is not None or mask is not None:
      given = " and ".join(n for n, x in (("bias", bias), ("mask", mask))
                           if x is not None)
      raise ValueError(
          f"The skip-softmax attention_fn takes no bias/mask (got {given}): "
          "arbitrary masks would defeat block skipping. For causal attention "
          "use make_attention_fn(causal=True) (or is_causal=True when calling "
          "an nnx.MultiHeadAttention); for padding pass `kv_lengths` through "
          "blasst_jax.nn.SkipSelfAttention.")
    if dropout_rate > 0 and not deterministic:
      raise ValueError(
          "Attention dropout is not supported by the skip-softmax "
          f"attention_fn (dropout_rate={dropout_rate}); set dropout_rate=0 "
          "or deterministic=True.")
    # Flax promotes q/k/v to one dtype; the kernels require a shared dtype.
    if dtype is None:
      dtype = jnp.result_type(query.dtype, key.dtype, value.dtype)
    query, key, value = (x.astype(dtype) for x in (query, key, value))

    # Flax allows any number of leading batch dims (including none).
    for name, x in (("query", query), ("key", key), ("value", value)):
      if x.ndim < 3:
        raise ValueError(
            f"`{name}` must have shape [*batch, length, heads, head_dim], got "
            f"{x.shape}.")
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
      raise ValueError(
          "query, key and value must share their batch dims, got "
          f"{query.shape}, {key.shape}, {value.shape}.")
    n = math.prod(batch_shape)
    q, k, v = (x.reshape((n,) + x.shape[-3:]) for x in (query, key, value))

    _report_inputs(module, q, k, v, causal=causal or is_causal,
                   kv_lengths=None, sm_scale=sm_scale, block_q=block_q,
                   block_kv=block_kv, threshold=threshold)
    want_stats = sow_stats and module is not None
    result = api.attention(
        q, k, v, threshold=threshold, causal=causal or is_causal,
        sm_scale=sm_scale, implementation=implementation,
        return_stats=want_stats, block_q=block_q, block_kv=block_kv,
        interpret=interpret, kernel_config=kernel_config)
    out, stats = result if want_stats else (result, None)
    if stats is not None:
      heads = stats.skipped_blocks.shape[-1]
      _sow(module, SkipStats(
          skipped_blocks=stats.skipped_blocks.reshape(batch_shape + (heads,)),
          visited_blocks=stats.visited_blocks.reshape(batch_shape + (heads,))))
    return out.reshape(batch_shape + out.shape[1:])

  return skip_softmax_attention


class SkipSelfAttention(nnx.Module):
  """Multi-head self-attention (MHA/GQA/MQA) with skip-softmax.

  Projects x [batch, seq_len, in_features] to q [batch, seq_len, num_heads,
  head_dim] and k, v [batch, seq_len, num_kv_heads, head_dim], optionally
  rotates q and k by their positions (RoPE, `apply_rope`), runs
  `blasst_jax.attention`, and projects back to in_features. Unlike Flax's
  MultiHeadAttention it accepts per-sequence `kv_lengths` for padded batches.

  Attributes:
    q_proj, k_proj, v_proj, out_proj: the `nnx.Linear` projections.
  """

  def __init__(self, num_heads: int, in_features: int, *,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               threshold=0.0, causal: bool = True, use_bias: bool = False,
               implementation: str | None = None, block_q: int | None = None,
               block_kv: int | None = None, dtype=None,
               param_dtype=jnp.float32, interpret: bool | None = None,
               kernel_config=None, decode_implementation: str | None = None,
               rope: bool = False,
               rope_base: float = 10000.0, rope_scale: float = 1.0,
               rope_pairing: str = "half",
               mesh=None, batch_axis=None, head_axis=None,
               rngs: nnx.Rngs):
    """Builds the layer.

    Args:
      num_heads: query heads.
      in_features: width of x and of the output.
      num_kv_heads: key/value heads, a divisor of num_heads (default
        num_heads: MHA; 1: MQA; otherwise GQA).
      head_dim: per-head width, default in_features // num_heads.
      threshold: default λ in [0, 1) or a `SkipSoftmaxConfig`; a call may
        override it.
      causal: top-left aligned causal mask.
      use_bias: biases in the projections.
      implementation, block_q, block_kv, interpret, kernel_config: passed to
        `blasst_jax.attention`.
      decode_implementation: what `decode` passes to
        `blasst_jax.decode_attention`; None: `implementation`, except
        "pallas_mosaic", which decodes with the default (on a Hopper GPU
        the Mosaic decode kernel wherever it runs the problem, else the
        Triton one).
      dtype: computation dtype of the projections (and so of attention).
      param_dtype: dtype of the parameters.
      rope: rotate q and k by their positions (RoPE) before attention;
        needs an even head_dim.
      rope_base: RoPE frequency base.
      rope_scale: RoPE position interpolation, positions / rope_scale (1:
        none); an attribute that may be changed after training to read
        longer contexts.
      rope_pairing: "half" (Hugging Face layout) or "interleaved" (GGUF
        layout), see `apply_rope`.
      mesh, batch_axis, head_axis: with a `jax.sharding.Mesh`, attention
        and decode run sharded (`blasst_jax.sharding`): the batch over
        `batch_axis`, the heads over `head_axis` (None: not sharded); the
        projection kernels are annotated (`nnx.with_partitioning`) to shard
        their head dimension over `head_axis`.
      rngs: initialisation randomness.

    Raises:
      ValueError: for head counts that do not divide, a bad head_dim, λ,
        implementation, block size or RoPE setting.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads),
                        ("in_features", in_features)):
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if num_heads % num_kv_heads:
      raise ValueError(
          f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
          f"({num_kv_heads}) (MHA: equal, GQA: a divisor, MQA: 1).")
    if head_dim is None:
      if in_features % num_heads:
        raise ValueError(
            f"in_features ({in_features}) must be divisible by num_heads "
            f"({num_heads}) when head_dim is not given.")
      head_dim = in_features // num_heads
    elif not isinstance(head_dim, (int, np.integer)) or head_dim <= 0:
      raise ValueError(f"`head_dim` must be a positive int, got {head_dim!r}.")
    _check_options(threshold, implementation, block_q, block_kv, None)
    if decode_implementation is not None:
      validation.check_implementation(decode_implementation)
    validation.check_causal(causal)
    if rope and head_dim % 2:
      raise ValueError(f"`rope` needs an even head_dim, got {head_dim}.")
    if not rope_base > 1:
      raise ValueError(f"`rope_base` must be > 1, got {rope_base!r}.")
    if not rope_scale > 0:
      raise ValueError(f"`rope_scale` must be > 0, got {rope_scale!r}.")
    _check_rope_pairing(rope_pairing)

    self.num_heads = int(num_heads)
    self.num_kv_heads = int(num_kv_heads)
    self.head_dim = int(head_dim)
    self.in_features = int(in_features)
    self.threshold = threshold
    self.causal = causal
    self.implementation = implementation
    self.decode_implementation = decode_implementation
    self.block_q = block_q
    self.block_kv = block_kv
    self.interpret = interpret
    self.kernel_config = kernel_config
    self.rope = bool(rope)
    self.rope_base = float(rope_base)
    self.rope_scale = float(rope_scale)
    self.rope_pairing = rope_pairing
    if mesh is not None:
      sharding_lib.check_mesh(mesh, batch_axis=batch_axis,
                              head_axis=head_axis)
      sharding_lib.check_divides(num_kv_heads,
                                 sharding_lib.axis_size(mesh, head_axis),
                                 "num_kv_heads", "head_axis")
    self.mesh = mesh
    self.batch_axis = batch_axis
    self.head_axis = head_axis

    def linear(fin, fout, names):
      extra = {}
      if mesh is not None:   # [in, out] kernel: the head side on head_axis
        extra["kernel_init"] = nnx.with_partitioning(
            nnx.nn.linear.default_kernel_init, names,
            mesh=sharding_lib.auto_mesh(mesh))
      return nnx.Linear(fin, fout, use_bias=use_bias, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs, **extra)

    heads_out, heads_in = (None, head_axis), (head_axis, None)
    self.q_proj = linear(in_features, num_heads * head_dim, heads_out)
    self.k_proj = linear(in_features, num_kv_heads * head_dim, heads_out)
    self.v_proj = linear(in_features, num_kv_heads * head_dim, heads_out)
    self.out_proj = linear(num_heads * head_dim, in_features, heads_in)

  def _placed(self, one_device, sharded):
    """(the attention function to call, its mesh arguments): `sharded`
    with this layer's mesh and axes when it has a mesh."""
    if self.mesh is None:
      return one_device, {}
    return sharded, dict(mesh=self.mesh, batch_axis=self.batch_axis,
                         head_axis=self.head_axis)

  def project_qkv(self, x, positions=None):
    """x [batch, seq_len, in_features] -> q, k, v in the attention layout.

    q: [batch, seq_len, num_heads, head_dim]; k, v: [batch, seq_len,
    num_kv_heads, head_dim]. With `rope`, q and k are rotated by
    `positions` (int [batch, seq_len] or [seq_len]; default 0..seq_len-1).
    """
    b, t = x.shape[:2]
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.rope:
      positions = jnp.arange(t) if positions is None else positions
      rotate = functools.partial(apply_rope, positions=positions,
                                 base=self.rope_base, scale=self.rope_scale,
                                 pairing=self.rope_pairing)
      q, k = rotate(q), rotate(k)
    return q, k, v

  def __call__(self, x, *, kv_lengths=None, threshold=None,
               return_stats: bool = False, block_selector=None):
    """Self-attention over x.

    Args:
      x: [batch, seq_len, in_features].
      kv_lengths: optional int [batch]; tokens at positions >= kv_lengths[b]
        are padding and are never attended to. Outputs at padded positions
        are computed but meaningless.
      threshold: overrides the layer's λ for this call (float, f32 [batch],
        or `SkipSoftmaxConfig`; may be traced).
      return_stats: also return a `SkipStats` ([batch, num_heads] counts).
      block_selector: optional `fn(q, k) -> block_mask` called with this
        layer's q [batch, seq_len, num_heads, head_dim] and k [batch,
        seq_len, num_kv_heads, head_dim] (after RoPE); the bool mask
        [batch, num_heads, n_q_tiles, n_kv_blocks], in this layer's
        block_q x block_kv tiles, is passed to `blasst_jax.attention` as
        `block_mask` (e.g. XAttention selection, `blasst_jax.xattention`).
        None: no block mask.

    Returns:
      [batch, seq_len, in_features], or (that, SkipStats).
    """
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(
          f"`x` must have shape [batch, seq_len, {self.in_features}], got "
          f"{x.shape}.")
    q, k, v = self.project_qkv(x)
    return self._attend(x, q, k, v, kv_lengths=kv_lengths,
                        threshold=threshold, return_stats=return_stats,
                        block_selector=block_selector)

  def _attend(self, x, q, k, v, *, kv_lengths, threshold, return_stats,
              block_selector):
    """Attention of projected q [b, t, h, d], k, v [b, t, h_kv, d], then the
    output projection to [b, t, in_features] (and SkipStats)."""
    threshold = self.threshold if threshold is None else threshold
    _report_inputs(self, q, k, v, causal=self.causal, kv_lengths=kv_lengths,
                   sm_scale=None, block_q=self.block_q,
                   block_kv=self.block_kv, threshold=threshold)
    block_mask = None if block_selector is None else block_selector(q, k)
    attention, where = self._placed(api.attention, sharding_lib.attention)
    result = attention(
        q, k, v, threshold=threshold, causal=self.causal,
        kv_lengths=kv_lengths, block_mask=block_mask,
        implementation=self.implementation,
        return_stats=return_stats, block_q=self.block_q,
        block_kv=self.block_kv, interpret=self.interpret,
        kernel_config=self.kernel_config, **where)
    out, stats = result if return_stats else (result, None)
    b, t = x.shape[:2]
    y = self.out_proj(out.reshape(b, t, self.num_heads * self.head_dim)
                      .astype(x.dtype))
    return (y, stats) if return_stats else y

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, *,
                 page_size: int | None = None, page_table=None) -> None:
    """Allocates an empty KV cache in NNX state (`nnx.Cache` variables).

    Contiguous (page_size None): k_cache, v_cache [batch, max_len,
    num_kv_heads, head_dim] of `dtype`. Paged: k_cache, v_cache are a page
    pool [num_pages, page_size, num_kv_heads, head_dim] and page_table int32
    [batch, ceil(max_len / page_size)] names the pool page of each
    sequence's logical block (default: sequence b owns pages b * n ...
    (b + 1) * n - 1); decoding then runs `paged_decode_attention`, whose
    skip block is the page. cache_lengths: int32 [batch], tokens stored per
    sequence. Steps past max_len are not checked (under jit they cannot
    be): they overwrite the last entry, so allocate max_len for the longest
    generation.

    Args:
      batch: sequences.
      max_len: the longest prompt plus generation.
      dtype: the cache's dtype (the decode kernels need q's dtype: the
        layer's computation dtype).
      page_size: tokens per page, a power of two >= 16; None: contiguous.
      page_table: optional int [batch, ceil(max_len / page_size)] of
        distinct pages in [0, num_pages); the pool has batch * pages_per_seq
        pages.

    Raises:
      ValueError: for a bad batch, max_len, page_size or page_table.
    """
    for name, value in (("batch", batch), ("max_len", max_len)):
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    self.cache_lengths = nnx.Cache(jnp.zeros((batch,), jnp.int32))
    if page_size is None:
      if page_table is not None:
        raise ValueError("`page_table` needs a `page_size`.")
      shape = (batch, max_len, self.num_kv_heads, self.head_dim)
      self.page_table = None
    else:
      if (not isinstance(page_size, (int, np.integer)) or page_size < 16
          or page_size & (page_size - 1)):
        raise ValueError(f"`page_size` must be a power of two >= 16 (the "
                         f"decode kernels' skip block), got {page_size!r}.")
      per_seq = -(-max_len // page_size)
      num_pages = batch * per_seq
      if page_table is None:
        page_table = np.arange(num_pages).reshape(batch, per_seq)
      table = np.asarray(page_table)
      if (table.shape != (batch, per_seq)
          or not np.issubdtype(table.dtype, np.integer)
          or table.min() < 0 or table.max() >= num_pages
          or len(np.unique(table)) != table.size):
        raise ValueError(
            f"`page_table` must hold {batch} x {per_seq} distinct ints in "
            f"[0, {num_pages}), got {table.dtype}{list(table.shape)}.")
      shape = (num_pages, page_size, self.num_kv_heads, self.head_dim)
      self.page_table = nnx.Cache(jnp.asarray(table, jnp.int32))
    self.k_cache = nnx.Cache(jnp.zeros(shape, dtype))
    self.v_cache = nnx.Cache(jnp.zeros(shape, dtype))

  def _check_cache(self) -> None:
    if not hasattr(self, "k_cache"):
      raise ValueError("Call `init_cache(batch, max_len)` first.")

  def _cache_capacity(self) -> tuple[int, int]:
    """(batch, max tokens per sequence) of the allocated cache."""
    if self.page_table is None:
      return self.k_cache[...].shape[:2]
    table = self.page_table[...]
    return table.shape[0], table.shape[1] * self.k_cache[...].shape[1]

  def _write_cache(self, k, v, start) -> None:
    """Stores k, v [b, t, h_kv, d] at positions start[b] .. start[b] + t - 1
    (start int [b]) of every sequence."""
    if self.page_table is None:
      write = jax.vmap(lambda cache, new, p: jax.lax.dynamic_update_slice(
          cache, new.astype(cache.dtype), (p, 0, 0)))
      self.k_cache[...] = write(self.k_cache[...], k, start)
      self.v_cache[...] = write(self.v_cache[...], v, start)
      return
    table = self.page_table[...]                          # [b, pages_per_seq]
    page_size = self.k_cache[...].shape[1]
    b, t = k.shape[:2]
    pos = start[:, None] + jnp.arange(t)[None]            # [b, t]
    pos = jnp.minimum(pos, table.shape[1] * page_size - 1)
    page = jnp.take_along_axis(table, pos // page_size, axis=1)
    slot = pos % page_size
    for name, new in (("k_cache", k), ("v_cache", v)):
      pool = getattr(self, name)[...]
      getattr(self, name)[...] = pool.at[page, slot].set(new.astype(pool.dtype))

  def prefill(self, x, *, kv_lengths=None, threshold=None,
              return_stats: bool = False, block_selector=None):
    """Self-attention over a prompt that also fills the (empty) KV cache.

    The prompt's keys and values are stored from position 0 and
    `cache_lengths` becomes `kv_lengths` (the prompt's real lengths), so
    that `decode` continues every sequence after its last real token.

    Args:
      x: [batch, seq_len, in_features], seq_len <= the cache's max_len;
        sequences shorter than seq_len are right-padded.
      kv_lengths: optional int [batch] real prompt lengths (default seq_len).
      threshold, return_stats, block_selector: as `__call__`.

    Returns:
      As `__call__`: [batch, seq_len, in_features], or (that, SkipStats).

    Raises:
      ValueError: without `init_cache`, or for a prompt longer than the
        cache or of another batch size.
    """
    self._check_cache()
    b, max_len = self._cache_capacity()
    if x.ndim != 3 or x.shape[0] != b or x.shape[1] > max_len:
      raise ValueError(
          f"`x` must have shape [batch={b}, seq_len <= {max_len}, "
          f"{self.in_features}] (the cache's batch and max_len), got "
          f"{x.shape}.")
    t = x.shape[1]
    q, k, v = self.project_qkv(x)
    self._write_cache(k, v, jnp.zeros((b,), jnp.int32))
    lengths = (jnp.full((b,), t, jnp.int32) if kv_lengths is None
               else jnp.asarray(kv_lengths, jnp.int32))
    self.cache_lengths[...] = lengths
    return self._attend(x, q, k, v, kv_lengths=kv_lengths,
                        threshold=threshold, return_stats=return_stats,
                        block_selector=block_selector)

  def decode(self, x, *, threshold=None, num_splits: int | None = None,
             max_mode: str = decode_lib.DEFAULT_MAX_MODE,
             return_stats: bool = False):
    """One generation step: append x's token to the cache and attend.

    Args:
      x: [batch, 1, in_features], the new token of every sequence.
      threshold: overrides the layer's λ (a `SkipSoftmaxConfig` uses its
        "decode" scale factor).
      num_splits, max_mode: passed to `blasst_jax.decode_attention`.
      return_stats: also return its `DecodeStats`.

    Returns:
      [batch, 1, in_features], or (that, DecodeStats).
    """
    self._check_cache()
    b, max_len = self._cache_capacity()
    if x.shape != (b, 1, self.in_features):
      raise ValueError(f"`x` must have shape [batch, 1, in_features]="
                       f"{(b, 1, self.in_features)}, got {x.shape}.")
    pos = self.cache_lengths[...]           # [b]
    q, k, v = self.project_qkv(x, pos[:, None])  # [b, 1, h(kv), d]
    self._write_cache(k, v, pos)
    lengths = jnp.minimum(pos + 1, max_len)
    self.cache_lengths[...] = lengths
    threshold = self.threshold if threshold is None else threshold
    impl = self.decode_implementation
    if impl is None and self.implementation != "pallas_mosaic":
      impl = self.implementation
    options = dict(
        threshold=threshold, num_splits=num_splits, max_mode=max_mode,
        implementation=impl,
        return_stats=return_stats, interpret=self.interpret)
    q = q.astype(self.k_cache[...].dtype)
    if self.page_table is not None:
      if self.mesh is not None:
        raise ValueError("A paged cache is not supported with a `mesh`.")
      result = decode_lib.paged_decode_attention(
          q, self.k_cache[...], self.v_cache[...], self.page_table[...],
          lengths, **options)
    else:
      decode, where = self._placed(decode_lib.decode_attention,
                                   sharding_lib.decode_attention)
      result = decode(q, self.k_cache[...], self.v_cache[...], lengths,
                      **options, **where)
    out, stats = result if return_stats else (result, None)
    y = self.out_proj(out.reshape(b, 1, self.num_heads * self.head_dim)
                      .astype(x.dtype))
    return (y, stats) if return_stats else y
