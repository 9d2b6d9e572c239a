"""Skip-softmax knobs: the threshold configuration, block sizes and statistics.

The skip rule (see `blasst_jax.reference.blockwise_attention`): a KV block is
skipped for a q-tile when, for every row of the tile,
`exp(block_max - running_max) < threshold`. The threshold λ can be given
directly, or as a scale factor `c` with `λ = c / kv_len`, which is how
TensorRT-LLM's `SkipSoftmaxAttentionConfig` expresses it (λ shrinks as the
context grows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Phase = Literal["prefill", "decode"]

# Default tile sizes. The skip decision is made per (q-tile, kv-block), so the
# block sizes are part of the semantics: the oracle and every kernel take the
# same values.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 64
# Triton's dot needs every tile dimension to be at least 16.
MIN_BLOCK = 16
# λ derived from a scale factor is clipped here so that short contexts stay
# inside the valid range [0, 1).
MAX_DERIVED_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class SkipSoftmaxConfig:
  """How strongly to skip; accepted wherever `threshold` is.

  Exactly one of `threshold` and `threshold_scale_factor` is set (neither
  means λ = 0, i.e. dense attention).

  Attributes:
    threshold: λ in [0, 1), used as is for every phase and context length.
    threshold_scale_factor: `c` with `λ = c / kv_len`. A float applies to both
      phases; a mapping `{"prefill": c_p, "decode": c_d}` sets them apart.
      With per-sequence `kv_lengths`, each sequence gets its own λ. λ is
      clipped to `MAX_DERIVED_THRESHOLD` for very short contexts.

  Raises:
    ValueError: when both are set, `threshold` is outside [0, 1), a scale
      factor is negative or not a number, or a mapping has keys other than
      "prefill" and "decode".
  """

  threshold: float | None = None
  threshold_scale_factor: float | Mapping[str, float] | None = None

  def __post_init__(self):
    if self.threshold is not None and self.threshold_scale_factor is not None:
      raise ValueError(
          "SkipSoftmaxConfig: set either `threshold` or "
          "`threshold_scale_factor`, not both.")
    if self.threshold is not None:
      check_threshold(self.threshold)
    c = self.threshold_scale_factor
    if not (c is None or isinstance(c, Mapping) or (
        isinstance(c, (int, float, np.number)) and not isinstance(c, bool))):
      raise ValueError(
          "SkipSoftmaxConfig: `threshold_scale_factor` must be a non-negative "
          "number or a {'prefill': c, 'decode': c} mapping, got "
          f"{c!r} ({type(c).__name__}).")
    factors = self.scale_factors
    for phase, c in factors.items():
      if c is not None and not (isinstance(c, (int, float, np.number))
                                and not isinstance(c, bool)
                                and np.isfinite(c) and c >= 0):
        raise ValueError(
            f"SkipSoftmaxConfig: `threshold_scale_factor` for {phase} must be"
            f" a non-negative number, got {c!r}.")
    if isinstance(self.threshold_scale_factor, Mapping):
      unknown = set(self.threshold_scale_factor) - {"prefill", "decode"}
      if unknown:
        raise ValueError(
            "SkipSoftmaxConfig: `threshold_scale_factor` keys must be "
            f"'prefill' and/or 'decode', got {sorted(unknown)}.")
      # Frozen dataclasses must stay hashable (they are static jit args).
      object.__setattr__(self, "threshold_scale_factor",
                         tuple(sorted(self.threshold_scale_factor.items())))

  @property
  def scale_factors(self) -> dict[str, float | None]:
    """The scale factor `c` per phase (None where not set)."""
    c = self.threshold_scale_factor
    if c is None or isinstance(c, (int, float, np.number)):
      return {"prefill": c, "decode": c}
    items = dict(c.items()) if isinstance(c, Mapping) else dict(c)
    return {"prefill": items.get("prefill"), "decode": items.get("decode")}

  def threshold_for(self, kv_len, phase: Phase = "prefill"):
    """λ for a context of `kv_len` keys.

    Args:
      kv_len: context length, an int or an int array [batch].
      phase: "prefill" or "decode" (selects the scale factor).

    Returns:
      λ: a float for an int `kv_len` or a fixed `threshold`, else an f32
      array [batch].

    Raises:
      ValueError: for an unknown `phase`.
    """
    if phase not in ("prefill", "decode"):
      raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}.")
    if self.threshold is not None:
      return self.threshold
    c = self.scale_factors[phase]
    if c is None or c == 0:
      return 0.0
    if isinstance(kv_len, (int, np.integer)):
      return min(c / max(int(kv_len), 1), MAX_DERIVED_THRESHOLD)
    kv_len = jnp.maximum(jnp.asarray(kv_len, jnp.float32), 1.0)
    return jnp.minimum(c / kv_len, MAX_DERIVED_THRESHOLD)


def check_threshold(threshold: Any) -> None:
  """Checks a concrete λ (a number or array of any shape); traced λ passes.

  Raises:
    ValueError: unless every value is finite and lies in [0, 1).
  """
  if isinstance(threshold, jax.core.Tracer):
    return  # A traced λ: checked by the caller's own logic, not here.
  try:
    values = np.asarray(threshold, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(
        f"`threshold` (λ) must be a number in [0, 1), an array of them or a "
        f"SkipSoftmaxConfig, got {threshold!r} "
        f"({type(threshold).__name__}).") from None
  if values.size and (np.any(~np.isfinite(values)) or np.any(values < 0)
                      or np.any(values >= 1)):
    raise ValueError(
        f"`threshold` (λ) must lie in [0, 1), got {threshold!r}. "
        "λ = 0 means dense attention; typical values are 1e-4 to 1e-1.")


def log_threshold(threshold) -> jax.Array:
  """log λ as f32, same shape as `threshold` (-inf for λ = 0: never skips)."""
  t = jnp.asarray(threshold, jnp.float32)
  return jnp.where(t > 0, jnp.log(jnp.maximum(t, 1e-38)), -jnp.inf)


def resolve_threshold(threshold, kv_lengths, kv_len: int, batch: int,
                      phase: Phase = "prefill") -> jax.Array:
  """λ per batch element.

  Args:
    threshold: a float, an f32 array [] / [1] / [batch], or a
      `SkipSoftmaxConfig`.
    kv_lengths: optional int [batch]; a scale-factor config gives each
      sequence λ = c / kv_lengths[b].
    kv_len: padded key length, used without `kv_lengths`.
    batch: batch size.
    phase: "prefill" or "decode" (selects a config's scale factor).

  Returns:
    f32 [batch].

  Raises:
    ValueError: for λ outside [0, 1) or a threshold array of another shape.
  """
  if isinstance(threshold, SkipSoftmaxConfig):
    if threshold.threshold is None and kv_lengths is not None:
      threshold = threshold.threshold_for(kv_lengths, phase)
    else:
      threshold = threshold.threshold_for(kv_len, phase)
  else:
    check_threshold(threshold)
  t = jnp.asarray(threshold, jnp.float32)
  if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
    raise ValueError(
        f"`threshold` must be a scalar or have shape [batch]=[{batch}], got "
        f"shape {t.shape}.")
  return jnp.broadcast_to(t, (batch,))


def next_power_of_2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def effective_block_sizes(q_len: int, kv_len: int, block_q: int | None,
                          block_kv: int | None) -> tuple[int, int]:
  """Block sizes clamped to the sequence lengths.

  A block larger than the whole sequence is shrunk to the next power of two
  that covers it. This never changes skip decisions: there is one tile either
  way, and rows or keys past the end take no part in a decision.

  Args:
    q_len, kv_len: sequence lengths.
    block_q, block_kv: requested tile sizes, None for the defaults
      (`DEFAULT_BLOCK_Q`, `DEFAULT_BLOCK_KV`).

  Returns:
    (block_q, block_kv) as ints.

  Raises:
    ValueError: unless each size is a power of two >= `MIN_BLOCK`.
  """
  block_q = DEFAULT_BLOCK_Q if block_q is None else block_q
  block_kv = DEFAULT_BLOCK_KV if block_kv is None else block_kv
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(b, (int, np.integer)) or b < MIN_BLOCK or b & (b - 1):
      raise ValueError(
          f"`{name}` must be a power of two >= {MIN_BLOCK}, got {b!r}; "
          "try 64 or 128.")
  block_q = min(block_q, max(MIN_BLOCK, next_power_of_2(q_len)))
  block_kv = min(block_kv, max(MIN_BLOCK, next_power_of_2(kv_len)))
  return int(block_q), int(block_kv)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SkipStats:
  """Block counts per (batch, q-head).

  Attributes:
    skipped_blocks: int32 [batch, q_heads], (q-tile, kv-block) pairs skipped
      by the threshold rule.
    visited_blocks: int32 [batch, q_heads], pairs the kernel had to consider:
      those not removed by the causal mask, `kv_lengths` or a block mask.
    masked_blocks: int32 [batch, q_heads] or None: pairs the causal and
      length masks allow but a block mask removed (None without one).
    block_q, block_kv: the tiles that took the decisions (static ints, part
      of the pytree structure), or None where not known. The skip decision
      is per tile, so the same λ skips differently at other tiles; each
      implementation has its own default tiles (`blasst_jax.api.
      default_tiles`). Decode stats give block_kv (the page size) only.
  """

  skipped_blocks: jax.Array
  visited_blocks: jax.Array
  masked_blocks: jax.Array | None = None
  block_q: int | None = dataclasses.field(default=None,
                                          metadata=dict(static=True))
  block_kv: int | None = dataclasses.field(default=None,
                                           metadata=dict(static=True))

  @property
  def tiles(self) -> tuple[int | None, int | None]:
    """(block_q, block_kv): the tiles that took the decisions."""
    return self.block_q, self.block_kv

  @property
  def sparsity(self) -> jax.Array:
    """skipped / visited, f32 [batch, q_heads] (0 where nothing visited)."""
    visited = jnp.maximum(self.visited_blocks, 1).astype(jnp.float32)
    return self.skipped_blocks.astype(jnp.float32) / visited

  @property
  def total_sparsity(self) -> jax.Array:
    """skipped / visited over the whole call, an f32 scalar."""
    visited = jnp.maximum(jnp.sum(self.visited_blocks), 1)
    return jnp.sum(self.skipped_blocks) / visited.astype(jnp.float32)

  @property
  def mask_sparsity(self) -> jax.Array:
    """Block-mask-removed / (visited + removed) over the call, an f32
    scalar (0 without a block mask)."""
    masked = jnp.sum(self.masked_blocks) if self.masked_blocks is not None \
        else 0
    total = jnp.maximum(jnp.sum(self.visited_blocks) + masked, 1)
    return masked / total.astype(jnp.float32)

  @property
  def combined_sparsity(self) -> jax.Array:
    """(Block-mask-removed + skipped) / (visited + removed), an f32 scalar: the
    fraction of the causal/length-allowed blocks whose P·V was not done."""
    masked = jnp.sum(self.masked_blocks) if self.masked_blocks is not None \
        else 0
    total = jnp.maximum(jnp.sum(self.visited_blocks) + masked, 1)
    return (masked + jnp.sum(self.skipped_blocks)) / total.astype(jnp.float32)

  def __repr__(self):
    fields = (self.skipped_blocks, self.visited_blocks)
    if any(isinstance(f, jax.core.Tracer) for f in fields) or not all(
        hasattr(f, "dtype") for f in fields):
      return (f"SkipStats(skipped_blocks={self.skipped_blocks!r}, "
              f"visited_blocks={self.visited_blocks!r})")
    return (f"SkipStats(sparsity={float(self.total_sparsity):.3f}, "
            f"skipped={int(jnp.sum(self.skipped_blocks))}, "
            f"visited={int(jnp.sum(self.visited_blocks))}"
            + self._tiles_repr() + ")")

  def _tiles_repr(self) -> str:
    if self.block_q is None and self.block_kv is None:
      return ""
    if self.block_q is None:
      return f", block_kv={self.block_kv}"
    return f", tiles={self.block_q}x{self.block_kv}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeStats(SkipStats):
  """`SkipStats` per (batch, q-head) plus the cache bytes read.

  Attributes:
    bytes_read: f32 [batch]: K bytes of every visited block, V bytes of every
      kept block, and in "global" mode the scores written and read back
      (block granularity). The anchor blocks every split of "anchored" mode
      re-reads are part of the visited blocks and not counted again (their
      repeats are L2 hits).
  """

  bytes_read: jax.Array = None

  def __repr__(self):
    return (super().__repr__()[:-1].replace("SkipStats", "DecodeStats")
            + (f", bytes_read={float(jnp.sum(self.bytes_read)):.4g})"
               if not isinstance(self.bytes_read, jax.core.Tracer) else ")"))
