"""The prefill op interface, and the forward/backward wiring the Pallas ops
share.

`blasst_jax.attention` validates its arguments, resolves the caller's tiles
(given, or inferred from a block mask), picks an op and calls

    plan = op.prepare(q_len=..., kv_len=..., head_dim=..., dtype=...,
                      block_q=..., block_kv=..., block_mask=...,
                      kernel_config=..., interpret=...)
    result = op(q, k, v, plan, kv_lengths=..., threshold=..., ...)

`prepare` raises a `ValueError` for what the op cannot run and fixes the
tiles and the kernel config once; the call returns an `AttentionResult`
whose stats carry those tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax import validation
from blasst_jax.config import SkipStats
from blasst_jax.ops import base


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `prepare` resolved for one call.

  Attributes:
    block_q, block_kv: the tiles that take the skip decisions.
    config: the kernel config (None for the reference).
    interpret: the op's interpret setting (a bool for Triton, None or
      `plgpu.InterpretGPUParams` for Mosaic GPU).
    block_mask: the caller's block mask in these tiles (a coarser mask cut
      into them), or None.
  """

  block_q: int
  block_kv: int
  config: Any = None
  interpret: Any = None
  block_mask: jax.Array | None = None


class AttentionOp(base.Op):
  """A prefill backend."""

  family = "attention"

  def default_tiles(self, head_dim: int) -> tuple[int, int]:
    """(block_q, block_kv) this op takes when the caller gives none."""
    del head_dim
    return config_lib.DEFAULT_BLOCK_Q, config_lib.DEFAULT_BLOCK_KV

  def supports(self, *, backend=None, dtype=None, head_dim=None,
               interpret=None, q_len=None, kv_len=None, mask_tiles=None,
               mask_inferred=False) -> bool:
    """Whether `implementation=None` may pick this op.

    Args:
      backend: a JAX backend name, default the current one.
      dtype, head_dim: of q/k/v, None when not known.
      interpret: the caller's `interpret`.
      q_len, kv_len, mask_tiles: with a block mask, the sequence lengths
        and its (block_q, block_kv); mask_inferred: its tiles were inferred
        from its shape (not given).
    """
    raise NotImplementedError

  def prepare(self, *, q_len: int, kv_len: int, head_dim: int, dtype,
              block_q: int | None, block_kv: int | None, block_mask=None,
              mask_inferred: bool = False, kernel_config=None,
              interpret=None) -> Plan:
    """Checks that this op runs the problem; resolves tiles and config.

    Args:
      q_len, kv_len, head_dim, dtype: the problem.
      block_q, block_kv: the caller's tiles (None: this op's defaults);
        with a block mask, the mask's tiles.
      block_mask: the caller's block mask, or None.
      mask_inferred: the mask's tiles were inferred from its shape.
      kernel_config: the caller's `kernel_config`.
      interpret: the caller's `interpret`.

    Raises:
      ValueError: naming what this op cannot run and what to use instead.
    """
    raise NotImplementedError

  def __call__(self, q, k, v, plan: Plan, *, kv_lengths, threshold, causal,
               sm_scale: float, initial_max=None, return_lse: bool = False,
               record_skips: bool = False) -> base.AttentionResult:
    """The op's `AttentionResult`. return_lse: with lse (for merging
    partial results); record_skips: with the skip record `skip_mask`. Either
    gives no gradient in the Pallas ops."""
    raise NotImplementedError

  def complete_stats(self, stats: SkipStats, plan: Plan, *, q_len, kv_len,
                     kv_lengths, causal) -> SkipStats:
    """`stats` with the tiles that decided and, with a block mask,
    `masked_blocks`: pairs the causal/length masks allow, less those
    visited."""
    stats = dataclasses.replace(stats, block_q=plan.block_q,
                                block_kv=plan.block_kv)
    if plan.block_mask is None:
      return stats
    b = plan.block_mask.shape[0]
    allowed = reference.visited_blocks_mask(
        q_len, kv_len, plan.block_q, plan.block_kv,
        reference.kv_lengths_or_full(kv_lengths, b, kv_len), causal)
    allowed = jnp.sum(allowed, axis=(2, 3), dtype=jnp.int32)     # [b, 1]
    return dataclasses.replace(
        stats, masked_blocks=allowed - stats.visited_blocks)


class PallasAttentionOp(AttentionOp):
  """A Pallas kernel forward with a Pallas backward of the same family.

  Subclasses give `kernel_forward` (the kernel's `attention_forward`),
  `kernel_options` and `backward`.
  """

  def kernel_forward(self, *args, **kwargs):
    raise NotImplementedError

  def kernel_options(self, plan: Plan) -> dict[str, Any]:
    """Static kernel keywords beyond the tiles: config, interpret."""
    raise NotImplementedError

  def backward(self, q, k, v, out, lse, d_out, kv_lengths, keep,
               options: dict[str, Any]):
    """(dq, dk, dv) over the kept blocks `keep` (bool [batch, q_heads,
    n_q_tiles, n_kv_blocks])."""
    raise NotImplementedError

  def __call__(self, q, k, v, plan: Plan, *, kv_lengths, threshold, causal,
               sm_scale: float, initial_max=None, return_lse: bool = False,
               record_skips: bool = False) -> base.AttentionResult:
    b, lq, _, _ = q.shape
    lk = k.shape[1]
    kv_lengths = reference.kv_lengths_or_full(kv_lengths, b, lk)
    log_thr = config_lib.log_threshold(
        config_lib.resolve_threshold(threshold, kv_lengths, lk, b))
    static = dict(causal=causal, sm_scale=sm_scale, block_q=plan.block_q,
                  block_kv=plan.block_kv,
                  skip_enabled=not validation.is_static_zero(threshold),
                  **self.kernel_options(plan))
    static = tuple(sorted(static.items()))
    if return_lse or record_skips:   # no gradient
      result = self.forward(q, k, v, kv_lengths, log_thr, plan.block_mask,
                            static, initial_max=initial_max,
                            record_skips=record_skips)
    else:
      result = _differentiable(self, q, k, v, kv_lengths, log_thr,
                               plan.block_mask, static)
    return dataclasses.replace(result, stats=self.complete_stats(
        result.stats, plan, q_len=lq, kv_len=lk, kv_lengths=kv_lengths,
        causal=causal))

  def forward(self, q, k, v, kv_lengths, log_thr, block_mask, static, *,
              record_skips: bool = False,
              initial_max=None) -> base.AttentionResult:
    """The kernel's forward as an `AttentionResult`: skip_mask when
    `record_skips`, row_max with `initial_max`."""
    opts = dict(static)
    if initial_max is not None:
      opts["initial_max"] = initial_max
    out, lse, skipped, visited, *extra = self.kernel_forward(
        q, k, v, kv_lengths, log_thr, block_mask,
        return_skip_mask=record_skips, **opts)
    skip_mask = extra.pop(0) if record_skips else None
    row_max = extra.pop(0) if initial_max is not None else None
    stats = SkipStats(skipped_blocks=jnp.sum(skipped, axis=-1),
                      visited_blocks=jnp.sum(visited, axis=-1))
    return base.AttentionResult(out=out, lse=lse, stats=stats,
                                skip_mask=skip_mask, row_max=row_max)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7))
def _differentiable(op, q, k, v, kv_lengths, log_thr, block_mask, static):
  """`op`'s forward, differentiable: the gradient of the sparse forward
  (skipped blocks carry zero probability). Under differentiation the
  forward records the blocks it skipped and `op.backward` walks exactly
  the blocks it kept."""
  result = op.forward(q, k, v, kv_lengths, log_thr, block_mask, static)
  return dataclasses.replace(result, lse=None)


def _differentiable_fwd(op, q, k, v, kv_lengths, log_thr, block_mask, static):
  result = op.forward(q, k, v, kv_lengths, log_thr, block_mask, static,
                      record_skips=True)
  residuals = (q, k, v, kv_lengths, log_thr, block_mask, result.out,
               result.lse, result.skip_mask)
  return dataclasses.replace(result, lse=None, skip_mask=None), residuals


def _differentiable_bwd(op, static, residuals, cotangent):
  q, k, v, kv_lengths, log_thr, block_mask, out, lse, skip_mask = residuals
  # Kept blocks: selected and not skipped.
  keep = ~skip_mask if block_mask is None else block_mask & ~skip_mask
  grads = op.backward(q, k, v, out, lse, cotangent.out, kv_lengths, keep,
                      dict(static))
  return tuple(grads) + (None, jnp.zeros_like(log_thr), None)


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)
