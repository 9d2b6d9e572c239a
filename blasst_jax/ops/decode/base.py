"""The decode op interface, and what the split-K decode kernels share:
merging their partials and counting the cache bytes read.

`blasst_jax.decode` validates its arguments, views a contiguous cache as
pages, picks an op and calls

    plan = op.prepare(dtype=..., head_dim=..., group=..., block_kv=...,
                      max_mode=..., initial_max=..., max_axis_name=...,
                      kernel_config=..., interpret=...)
    result = op(q, k_pages, v_pages, page_table, kv_lengths, plan, ...)

with q [batch, q_heads, head_dim] and page_table int32 [batch,
pages_per_seq] or `ContiguousPages`; the result is an `AttentionResult` with
out [batch, q_heads, head_dim], lse [batch, q_heads] and `DecodeStats`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from blasst_jax.config import DecodeStats
from blasst_jax.ops import base


# Page pool layouts (`paged_decode_attention`'s `kv_layout`): "NHD"
# [num_pages, page_size, kv_heads, head_dim], each token's KV heads side by
# side (vLLM's), or "HND" [num_pages, kv_heads, page_size, head_dim], each
# head's page one run of memory (FlashInfer's HND, TensorRT-LLM's).
KV_LAYOUTS = ("NHD", "HND")


def nhd_shape(shape, kv_layout: str) -> tuple[int, ...]:
  """(num_pages, page_size, kv_heads, head_dim) of a pool of `shape`."""
  n, a, b, d = shape
  return (n, a, b, d) if kv_layout == "NHD" else (n, b, a, d)


def as_nhd(pages, kv_layout: str):
  """pages [num_pages, page_size, kv_heads, head_dim] from a pool in
  `kv_layout` (a transposed copy for "HND")."""
  return pages if kv_layout == "NHD" else jnp.swapaxes(pages, 1, 2)


@dataclasses.dataclass(frozen=True)
class ContiguousPages:
  """The page table of a contiguous cache [batch, max_len, kv_heads, d]
  viewed as pages: block j of sequence b is page b * pages_per_seq + j.
  An op that reads a table builds it (`page_table_array`); the Hopper
  kernel computes the pages instead (no table to build, copy or hold)."""

  batch: int
  pages_per_seq: int

  @property
  def shape(self) -> tuple[int, int]:
    return (self.batch, self.pages_per_seq)


def page_table_array(page_table):
  """int32 [batch, pages_per_seq]: `page_table`, or the table of
  `ContiguousPages`."""
  if not isinstance(page_table, ContiguousPages):
    return page_table
  b, n = page_table.shape
  return (jnp.arange(b, dtype=jnp.int32)[:, None] * n
          + jnp.arange(n, dtype=jnp.int32)[None, :])


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """What `prepare` resolved: the kernel config and interpret setting."""

  config: Any = None
  interpret: Any = None


class DecodeOp(base.Op):
  """A decode backend."""

  family = "decode"
  # Programs resident on one SM at a time: the split-K default fills one
  # wave of them (`decode.default_num_splits`). The Triton kernel holds 2
  # (registers; Nsight Compute): a few programs more than 2 * SMs would add
  # a second, nearly empty wave (+15% time at B8 32k, 5 vs 4 splits).
  programs_per_sm: ClassVar[int] = 2
  # The pool layouts the op reads (`KV_LAYOUTS`); `decode._decode` hands
  # it others as an "NHD" copy.
  kv_layouts: ClassVar[tuple[str, ...]] = ("NHD",)

  def supports(self, **problem) -> bool:
    """Whether `implementation=None` may pick this op for `problem`:
    dtype, head_dim, group, block_kv, pages_per_seq, contiguous (a
    `ContiguousPages` table), cache_dtype,
    max_mode, max_axis_name, interpret, kernel_config (`decode._decode`
    passes them; an op reads those it depends on), and optionally
    backend."""
    raise NotImplementedError

  def prepare(self, *, dtype, head_dim, group, block_kv, max_mode,
              initial_max, max_axis_name, kernel_config,
              interpret) -> DecodePlan:
    """Checks that this op runs the problem; resolves config and interpret.

    Raises:
      ValueError: naming what this op cannot run and what to use instead.
    """
    raise NotImplementedError

  def __call__(self, q, k_pages, v_pages, page_table, kv_lengths,
               plan: DecodePlan, *, log_threshold, skip_enabled: bool,
               sm_scale: float, num_splits: int, max_mode: str,
               initial_max=None, max_axis_name=None, k_scale=None,
               v_scale=None, kv_layout: str = "NHD") -> base.AttentionResult:
    """k_scale, v_scale: f32 [kv_heads] with FP8 pages, else None;
    kv_layout: one of `kv_layouts`, the pages' layout."""
    raise NotImplementedError

  def check_kv_layout(self, kv_layout: str) -> None:
    """ValueError unless the op reads pages in `kv_layout`."""
    if kv_layout not in self.kv_layouts:
      raise ValueError(f"The {self.name!r} decode op reads pages in "
                       f"{self.kv_layouts}, got {kv_layout!r}; pass "
                       "`as_nhd(pages, kv_layout)`.")


def dequantize(pages, scale, dtype):
  """FP8 pages [..., kv_heads, head_dim] times their per-head scale, as
  `dtype`; other pages (scale None) unchanged."""
  if scale is None:
    return pages
  return (pages.astype(jnp.float32) * scale[:, None]).astype(dtype)


def merge_partials(acc, m, l, *, return_lse: bool = False):
  """Combines split-K partials.

  Args:
    acc: f32 [..., splits, rows, d] unnormalized accumulators.
    m: f32 [..., splits, rows] row max (log2 units), -inf for a split that
      kept no key.
    l: f32 [..., splits, rows] row sums.
    return_lse: also return the natural-log log-sum-exp of the kept scores.

  Returns:
    f32 [..., rows, d]; rows with no kept key give 0. With return_lse also
    f32 [..., rows] (-inf for those rows).
  """
  m_all = jnp.max(m, axis=-2, keepdims=True)
  m_all = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  w = jnp.where(m == -jnp.inf, 0.0, jnp.exp2(m - m_all))         # [..., s, r]
  l_all = jnp.sum(w * l, axis=-2)
  acc_all = jnp.sum(w[..., None] * acc, axis=-3)
  out = acc_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]
  if not return_lse:
    return out
  return out, lse_from_stats(m_all[..., 0, :], l_all)


def decode_stats(skipped, visited, *, group: int, block_kv: int,
                 head_dim: int, dtype, max_mode: str) -> DecodeStats:
  """`DecodeStats` from block counts per (batch, KV head) [batch, kv_heads]:
  every head of a group reports its group's counts; bytes_read counts K of
  every visited block, V of every kept one and, in "global" mode, the
  scores written and read back."""
  block_bytes = block_kv * head_dim * jnp.dtype(dtype).itemsize
  bytes_read = (visited * block_bytes + (visited - skipped) * block_bytes)
  if max_mode == "global":  # Real rows' scores, written once and read once.
    bytes_read = bytes_read + visited * (2 * block_kv * group * 4)
  per_head = lambda x: jnp.repeat(x, group, axis=1)  # pylint: disable=g-long-lambda
  return DecodeStats(
      skipped_blocks=per_head(skipped), visited_blocks=per_head(visited),
      block_kv=block_kv,
      bytes_read=jnp.sum(bytes_read.astype(jnp.float32), axis=1))


def lse_from_stats(m, l):
  """Natural-log log-sum-exp of rows with row max `m` (log2 units) and row
  sums `l`; -inf where nothing was kept (l = 0)."""
  kept = l > 0
  return jnp.where(kept, (m + jnp.log2(jnp.where(kept, l, 1.0)))
                   * jnp.log(2.0), -jnp.inf)


def result_from_merged(out, m, l, skipped, visited, *, group: int,
                       block_kv: int, max_mode: str,
                       cache_dtype) -> base.AttentionResult:
  """A kernel's merged output out [batch, q_heads, head_dim] with its row
  statistics m, l [batch, kv_heads, R] (rows of each KV head's group
  first) and block counts [batch, kv_heads] as the result."""
  b, hq, d = out.shape
  lse = lse_from_stats(m, l)[:, :, :group].reshape(b, hq)
  stats = decode_stats(skipped, visited, group=group, block_kv=block_kv,
                       head_dim=d, dtype=cache_dtype, max_mode=max_mode)
  return base.AttentionResult(out=out, lse=lse, stats=stats)


def result_from_partials(q, acc, m, l, skipped, visited, *, group: int,
                         block_kv: int, max_mode: str,
                         cache_dtype=None) -> base.AttentionResult:
  """A split-K kernel's partials (rows of each KV head's group first, any
  padding rows after) as the result for q [batch, q_heads, head_dim];
  bytes counted in `cache_dtype` (default q's)."""
  b, hq, d = q.shape
  out, lse = merge_partials(acc, m, l, return_lse=True)
  out = out[:, :, :group].reshape(b, hq, d).astype(q.dtype)
  lse = lse[:, :, :group].reshape(b, hq)
  stats = decode_stats(skipped.sum(axis=2), visited.sum(axis=2),  # [b, hkv]
                       group=group, block_kv=block_kv, head_dim=d,
                       dtype=q.dtype if cache_dtype is None else cache_dtype,
                       max_mode=max_mode)
  return base.AttentionResult(out=out, lse=lse, stats=stats)
