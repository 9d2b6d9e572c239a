"""Argument checks of the public calls, in one place.

Every check raises a `ValueError` that names the argument and the fix, before
any kernel is traced. `attention`, `decode_attention`,
`paged_decode_attention`, `xattention.select_blocks`, the Flax layers,
`analysis` and `calibration` share them. What only one backend can or cannot
run is checked by its op (`blasst_jax.ops`), not here.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax.config import SkipSoftmaxConfig

# The implementation names `attention` and `decode_attention` accept (the
# ops registry, `blasst_jax.ops.base`, maps each to an op).
IMPLEMENTATIONS = ("reference", "pallas_triton", "pallas_mosaic")
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DECODE_MAX_MODES = reference.DECODE_MAX_MODES


def shape_of(name: str, x: Any) -> tuple[int, ...]:
  """x's shape; ValueError naming `name` when x is not an array."""
  shape = getattr(x, "shape", None)
  if shape is None:
    raise ValueError(f"`{name}` must be an array, got {type(x).__name__}.")
  return tuple(shape)


def is_concrete(x) -> bool:
  """Whether x's values are known now (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_supported_dtype(dtype) -> None:
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise ValueError(
        f"dtype {dtype} is not supported; use float32, bfloat16 or float16.")


def check_qkv(q, k, v) -> None:
  """Prefill q/k/v: rank 4, matching batch / head_dim, GQA heads, one
  supported dtype."""
  qs, ks, vs = shape_of("q", q), shape_of("k", k), shape_of("v", v)
  for name, s in (("q", qs), ("k", ks), ("v", vs)):
    if len(s) != 4:
      raise ValueError(
          f"`{name}` must have rank 4 [batch, seq_len, heads, head_dim], got "
          f"shape {s}. For a single sequence add a batch axis with x[None]; "
          "for decoding with q [batch, heads, head_dim] use "
          "bj.decode_attention.")
  if ks != vs:
    raise ValueError(f"`k` and `v` must have the same shape, got {ks} and {vs}.")
  if qs[0] != ks[0]:
    raise ValueError(
        f"`q` and `k` must have the same batch size, got {qs[0]} and {ks[0]}.")
  if qs[3] != ks[3]:
    raise ValueError(
        f"`q` and `k` must have the same head_dim, got {qs[3]} and {ks[3]}.")
  if ks[2] == 0 or qs[2] % ks[2]:
    raise ValueError(
        f"num_q_heads ({qs[2]}) must be a multiple of num_kv_heads ({ks[2]}) "
        "(MHA: equal, GQA: a divisor, MQA: 1).")
  if min(qs[1], ks[1], qs[3]) == 0:
    raise ValueError(f"Empty input: q {qs}, k {ks}.")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1:
    raise ValueError(
        "`q`, `k` and `v` must share one dtype, got "
        f"{q.dtype}, {k.dtype}, {v.dtype}; cast them with .astype().")
  check_supported_dtype(dtypes.pop())


def check_kv_lengths(kv_lengths, batch: int) -> None:
  """None, or an integer array [batch]."""
  if kv_lengths is None:
    return
  shape = shape_of("kv_lengths", kv_lengths)
  if shape != (batch,):
    raise ValueError(
        f"`kv_lengths` must have shape [batch]=({batch},), got {shape}.")
  if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
    raise ValueError(
        f"`kv_lengths` must be an integer array, got {kv_lengths.dtype}.")


def check_lengths_range(kv_lengths, max_len: int, name: str = "kv_lengths"
                        ) -> None:
  """Concrete lengths must lie in [0, max_len]; traced ones are left to the
  caller to clamp."""
  if kv_lengths is None or not is_concrete(kv_lengths):
    return
  values = np.asarray(kv_lengths)
  if values.size and (values.min() < 0 or values.max() > max_len):
    raise ValueError(
        f"`{name}` must lie in [0, {max_len}] (the cache holds {max_len} "
        f"tokens per sequence), got min {values.min()}, max {values.max()}.")


def check_block_mask(block_mask, expected: tuple[int, ...]) -> None:
  """None, or bool of shape `expected` [batch, q_heads, n_q_tiles,
  n_kv_blocks]."""
  if block_mask is None:
    return
  shape = shape_of("block_mask", block_mask)
  if shape != expected:
    raise ValueError(
        f"`block_mask` must have shape [batch, q_heads, n_q_tiles, "
        f"n_kv_blocks]={expected} for these block sizes, got {shape}; its "
        "blocks are the kernel tiles (pass block_q/block_kv equal to the "
        "mask's block size, or leave both None to infer them).")
  if block_mask.dtype != jnp.bool_:
    raise ValueError(f"`block_mask` must be bool, got {block_mask.dtype}; "
                     "use mask.astype(bool).")


def mask_block_size(length: int, n_blocks: int, name: str) -> int:
  """The smallest power-of-two tile >= 16 that cuts `length` into
  `n_blocks` tiles (a block mask's block size)."""
  size = config_lib.MIN_BLOCK
  while size < 2 * max(length, 1):
    if -(-length // size) == n_blocks:
      return size
    size *= 2
  raise ValueError(
      f"`block_mask` has {n_blocks} blocks along {name} of length {length}: "
      "no power-of-two block size gives that; build it with the kernel's "
      "block sizes (e.g. bj.xattention.select_blocks(block_size=128)).")


def check_initial_max_array(initial_max, expected: tuple[int, ...],
                            dims: str) -> None:
  """ValueError unless `initial_max` is a float array of shape `expected`
  (`dims` names its dimensions in the message)."""
  shape = shape_of("initial_max", initial_max)
  if shape != expected:
    raise ValueError(f"`initial_max` must have shape {dims}={expected}, "
                     f"got {shape}.")
  if not jnp.issubdtype(jnp.result_type(initial_max), jnp.floating):
    raise ValueError(f"`initial_max` must be a float array, got "
                     f"{jnp.result_type(initial_max)}.")


def check_initial_max(initial_max, expected: tuple[int, ...],
                      return_lse: bool) -> None:
  """Prefill `initial_max`: None, or f32 [batch, q_heads, q_len] with
  return_lse."""
  if initial_max is None:
    return
  if not return_lse:
    raise ValueError("`initial_max` gives a partial result to merge: pass "
                     "return_lse=True (the call then returns out, lse and "
                     "the final row max).")
  check_initial_max_array(initial_max, expected, "[batch, q_heads, q_len]")


def check_causal(causal) -> None:
  """Raises ValueError unless `causal` is a Python or NumPy bool (a string
  such as "False" would otherwise be truthy)."""
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"`causal` must be True or False, got {causal!r} "
                     f"({type(causal).__name__}).")


def check_sm_scale(sm_scale) -> None:
  """Raises ValueError unless `sm_scale` is None or a positive finite float."""
  if sm_scale is None:
    return
  if isinstance(sm_scale, bool) or not isinstance(
      sm_scale, (int, float, np.floating)) or not (
      math.isfinite(sm_scale) and sm_scale > 0):
    raise ValueError(
        f"`sm_scale` must be a positive finite Python float, got {sm_scale!r}.")


def check_threshold(threshold, batch: int) -> None:
  """λ in [0, 1) (when concrete) of shape [] / [1] / [batch], or a
  `SkipSoftmaxConfig` (checked when it was built)."""
  if isinstance(threshold, SkipSoftmaxConfig):
    return
  config_lib.check_threshold(threshold)
  shape = np.shape(threshold)
  if shape not in ((), (1,), (batch,)):
    raise ValueError(
        f"`threshold` must be a scalar or have shape [batch]=({batch},), got "
        f"shape {shape}.")


def is_static_zero(threshold) -> bool:
  """λ known at trace time to be 0: the dense kernel build can be used."""
  if isinstance(threshold, SkipSoftmaxConfig):
    return (threshold.threshold == 0.0 or (
        threshold.threshold is None
        and not any(threshold.scale_factors.values())))
  if isinstance(threshold, jax.core.Tracer):
    return False
  try:
    return bool(np.all(np.asarray(threshold) == 0))
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return False


def check_implementation(implementation) -> None:
  """Raises ValueError unless `implementation` is a known name or None."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"`implementation` must be one of {IMPLEMENTATIONS} or None, got "
        f"{implementation!r}.")


def kernel_config_or_default(kernel_config, config_class, what: str):
  """`kernel_config`, or `config_class()` for None; ValueError for another
  type (`what` names the implementation in the message)."""
  if kernel_config is None:
    return config_class()
  if not isinstance(kernel_config, config_class):
    raise ValueError(
        f"`kernel_config` for {what} must be a {config_class.__name__}, got "
        f"{type(kernel_config).__name__}.")
  return kernel_config


def check_attention_args(q, k, v, *, kv_lengths, causal, sm_scale,
                         threshold) -> None:
  """The checks of `attention` that do not depend on the tiles."""
  check_qkv(q, k, v)
  check_kv_lengths(kv_lengths, q.shape[0])
  check_causal(causal)
  check_sm_scale(sm_scale)
  check_threshold(threshold, q.shape[0])


# Decode.


FP8_CACHE_DTYPES = (jnp.dtype(jnp.float8_e4m3fn),)


def check_decode_inputs(q, k, v, kv_lengths, *, cache_name: str,
                        k_scale=None, v_scale=None) -> None:
  """q [batch, (1,) q_heads, head_dim] against a rank-4 cache or page pool
  (`cache_name`: "cache" or "pages"), one dtype (or an FP8 cache with its
  scales), lengths [batch]."""
  q_shape = shape_of("q", q)
  if len(q_shape) == 4 and q_shape[1] != 1:
    raise ValueError(
        f"`q` [batch, 1, q_heads, head_dim] must hold one token, got shape "
        f"{q_shape}; for several query tokens use bj.attention.")
  if len(q_shape) not in (3, 4):
    raise ValueError(
        f"`q` must be [batch, q_heads, head_dim] (or [batch, 1, q_heads, "
        f"head_dim]), got shape {q_shape}.")
  ks = shape_of(f"k_{cache_name}", k)
  vs = shape_of(f"v_{cache_name}", v)
  if ks != vs or len(ks) != 4:
    raise ValueError(
        f"`k_{cache_name}` and `v_{cache_name}` must have the same rank-4 "
        f"shape, got {ks} and {vs}.")
  hq, d = q_shape[-2], q_shape[-1]
  if ks[3] != d:
    raise ValueError(f"head_dim of q ({d}) and of the cache ({ks[3]}) differ.")
  if ks[2] == 0 or hq % ks[2]:
    raise ValueError(
        f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({ks[2]}).")
  fp8 = jnp.dtype(k.dtype) in FP8_CACHE_DTYPES
  if fp8 or jnp.dtype(v.dtype) in FP8_CACHE_DTYPES:
    check_fp8_cache(k, v, k_scale, v_scale, ks[2], cache_name)
  elif k_scale is not None or v_scale is not None:
    raise ValueError(
        f"`k_scale` and `v_scale` dequantize an FP8 (float8_e4m3fn) cache; "
        f"this one is {k.dtype}: drop them, or store the cache as "
        f"(cache / scale).astype(jnp.float8_e4m3fn).")
  if not fp8 and len({jnp.dtype(x.dtype) for x in (q, k, v)}) != 1:
    raise ValueError(
        f"`q` and the caches must share one dtype, got {q.dtype}, {k.dtype}, "
        f"{v.dtype}; cast q with .astype(cache.dtype).")
  check_supported_dtype(q.dtype)
  if kv_lengths is None:
    raise ValueError("`kv_lengths` int [batch] is required for decoding: the "
                     "number of valid tokens in each sequence's cache.")
  check_kv_lengths(kv_lengths, q_shape[0])


def check_fp8_cache(k, v, k_scale, v_scale, kv_heads: int,
                    cache_name: str) -> None:
  """Both caches float8_e4m3fn, with k_scale and v_scale: a scalar or
  [kv_heads] of positive finite floats (the cache holds values / scale)."""
  if jnp.dtype(k.dtype) != jnp.dtype(v.dtype):
    raise ValueError(
        f"`k_{cache_name}` and `v_{cache_name}` must both be float8_e4m3fn, "
        f"got {k.dtype} and {v.dtype}.")
  for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
    if scale is None:
      raise ValueError(
          f"An FP8 cache needs `k_scale` and `v_scale` (f32 [kv_heads] or a "
          f"scalar, the cache holding values / scale); `{name}` is missing.")
    shape = (() if isinstance(scale, (int, float, np.number))
             else shape_of(name, scale))
    if shape not in ((), (1,), (kv_heads,)):
      raise ValueError(f"`{name}` must be a scalar or [kv_heads] = "
                       f"[{kv_heads}], got shape {shape}.")
    if not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
      raise ValueError(f"`{name}` must be floating point, got "
                       f"{jnp.result_type(scale)}.")
    if is_concrete(scale):
      values = np.asarray(scale, np.float64)
      if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"`{name}` must be positive and finite, got "
                         f"{values}.")


def check_kv_layout(kv_layout, k_pages, v_pages, layouts) -> None:
  """`kv_layout` one of `layouts`; both pools rank 4 and of one shape."""
  if kv_layout not in layouts:
    raise ValueError(
        f"`kv_layout` must be one of {layouts} (NHD: pages [num_pages, "
        f"page_size, kv_heads, head_dim]; HND: [num_pages, kv_heads, "
        f"page_size, head_dim]), got {kv_layout!r}.")
  ks, vs = shape_of("k_pages", k_pages), shape_of("v_pages", v_pages)
  if ks != vs or len(ks) != 4:
    order = ("num_pages, page_size, kv_heads" if kv_layout == "NHD"
             else "num_pages, kv_heads, page_size")
    raise ValueError(
        f"`k_pages` and `v_pages` must have the same shape [{order}, "
        f"head_dim] (kv_layout={kv_layout!r}), got {ks} and {vs}.")


def check_decode_block_kv(block_kv) -> None:
  """A decode block (the page size of a paged cache): a power of two >= 16."""
  if (not isinstance(block_kv, (int, np.integer)) or block_kv < 16
      or block_kv & (block_kv - 1)):
    raise ValueError(f"`block_kv` (the page size for paged caches) must be a "
                     f"power of two >= 16, got {block_kv!r}.")


def check_page_table(page_table, kv_lengths, num_pages: int,
                     page_size: int) -> None:
  """int [batch, pages_per_seq]; concrete tables and lengths: lengths fit
  the table, and every page a sequence reads lies in the pool (entries past
  the length are free)."""
  batch = kv_lengths.shape[0]
  table_shape = shape_of("page_table", page_table)
  if (len(table_shape) != 2 or table_shape[0] != batch
      or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(f"`page_table` must be int [batch, pages_per_seq] with "
                     f"batch={batch}, got {page_table.dtype}"
                     f"{list(table_shape)}.")
  check_decode_block_kv(page_size)
  if not (is_concrete(page_table) and is_concrete(kv_lengths)):
    return
  table = np.asarray(page_table)
  lengths = np.asarray(kv_lengths)
  check_lengths_range(lengths, table.shape[1] * page_size)
  used = np.arange(table.shape[1])[None, :] < -(-lengths[:, None] // page_size)
  bad = used & ((table < 0) | (table >= num_pages))
  if bad.any():
    row, col = map(int, np.argwhere(bad)[0])
    raise ValueError(
        f"`page_table`[{row}, {col}] = {int(table[row, col])} is outside the "
        f"pool of {num_pages} pages but sequence {row} reads it "
        f"(kv_lengths[{row}] = {int(lengths[row])}).")


def check_decode_options(implementation, num_splits, block_kv,
                         max_mode) -> None:
  """The decode knobs every implementation shares."""
  check_implementation(implementation)
  if max_mode not in DECODE_MAX_MODES:
    raise ValueError(f"`max_mode` must be one of {DECODE_MAX_MODES}, got "
                     f"{max_mode!r}.")
  if num_splits is not None and (not isinstance(num_splits, (int, np.integer))
                                 or num_splits < 1):
    raise ValueError(f"`num_splits` must be a positive int, got {num_splits!r}.")
  check_decode_block_kv(block_kv)


def check_shared_max(initial_max, max_axis_name, expected, max_mode) -> None:
  """Decode `initial_max` f32 [batch, q_heads], and `max_axis_name` only
  with max_mode='global'."""
  if initial_max is not None:
    check_initial_max_array(initial_max, expected, "[batch, q_heads]")
  if max_axis_name is not None and max_mode != "global":
    raise ValueError(f"`max_axis_name` shares the global max of "
                     f"max_mode='global', got max_mode={max_mode!r}; pass "
                     "max_mode='global' (or share the anchors with "
                     "`initial_max`).")


# XAttention block selection.


def check_select_blocks_args(q, k, block_size, stride, threshold,
                             q_chunk) -> None:
  """q/k, block size, stride, score threshold and q chunk of
  `xattention.select_blocks` / `block_scores`."""
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"`q` [batch, q_len, q_heads, head_dim] and `k` [batch, "
                     f"kv_len, kv_heads, head_dim] must be rank 4, got "
                     f"{q.shape} and {k.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"`q` {q.shape} and `k` {k.shape} must share batch and "
                     "head_dim.")
  for name, x in (("q", q), ("k", k)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"`{name}` must be a float array, got {x.dtype}.")
  if q.dtype != k.dtype:
    raise ValueError(f"`q` and `k` must share one dtype, got {q.dtype} and "
                     f"{k.dtype}; cast one with .astype.")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(f"num_q_heads ({q.shape[2]}) must be a multiple of "
                     f"num_kv_heads ({k.shape[2]}).")
  if not isinstance(stride, (int, np.integer)) or stride < 1:
    raise ValueError(f"`stride` must be a positive int, got {stride!r}.")
  if (not isinstance(block_size, (int, np.integer)) or block_size < stride
      or block_size % stride):
    raise ValueError(f"`block_size` must be a positive multiple of `stride` "
                     f"({stride}), got {block_size!r}.")
  if not isinstance(q_chunk, (int, np.integer)) or q_chunk < 1:
    raise ValueError(f"`q_chunk_blocks` must be a positive int, got "
                     f"{q_chunk!r}.")
  thr = np.asarray(threshold) if not isinstance(threshold, jax.core.Tracer) \
      else None
  if thr is not None:
    if thr.ndim > 2 or (thr.ndim >= 1 and thr.shape[-1] not in (1, q.shape[2])):
      raise ValueError(f"`threshold` must be a float, [q_heads] or [batch, "
                       f"q_heads], got shape {thr.shape}.")
    try:
      thr = thr.astype(np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"`threshold` τ must be a number in (0, 1], got "
                       f"{threshold!r}.") from None
    if np.any(~np.isfinite(thr)) or np.any(thr <= 0) or np.any(thr > 1):
      raise ValueError(f"`threshold` τ must be in (0, 1], got {threshold!r}.")
