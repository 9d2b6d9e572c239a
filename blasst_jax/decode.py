"""Decode attention: one new token per sequence against a KV cache.

    out = bj.decode_attention(q, k_cache, v_cache, kv_lengths, threshold=1e-3)
    out = bj.paged_decode_attention(q, k_pages, v_pages, page_table,
                                    kv_lengths, threshold=1e-3)

Skipping is decided per (sequence, KV head, KV block) over the query heads
of the group (semantics: `reference.blockwise_decode_attention`); a skipped
block's V is not read from memory, which is where decode gains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax import validation
from blasst_jax.ops import base as ops_base
from blasst_jax.ops.decode import base as decode_base

# Public names kept here: the stats class and the split-K merge.
DecodeStats = config_lib.DecodeStats
merge_partials = decode_base.merge_partials

IMPLEMENTATIONS = validation.IMPLEMENTATIONS
MAX_MODES = validation.DECODE_MAX_MODES
# One pass with the running max started at the sink and recent blocks:
# skips nearly what the two-pass global max does, at one-pass speed.
DEFAULT_MAX_MODE = "anchored"
# 128-key blocks read the cache fastest (tuning in decode_h100.json).
DEFAULT_BLOCK_KV = 128
# Programs per SM that the split-K default fills one wave of, unless an op
# says its own (`DecodeOp.programs_per_sm`).
PROGRAMS_PER_SM = decode_base.DecodeOp.programs_per_sm
H100_SMS = 132
MIN_BLOCKS_PER_SPLIT = 4


def _num_sms() -> int:
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or H100_SMS)


def default_num_splits(batch: int, kv_heads: int, max_len: int,
                       block_kv: int, num_sms: int | None = None, *,
                       implementation: str | None = None) -> int:
  """The split-K factor `decode_attention` uses when none is given.

  The most splits whose (batch, kv-head, split) programs still run in one
  wave (the implementation's programs per SM), with at least
  MIN_BLOCKS_PER_SPLIT blocks per split; 1 when batch * kv_heads alone
  fills the GPU.

  Args:
    batch, kv_heads: the cache's batch size and key/value heads.
    max_len: cache length in tokens.
    block_kv: keys per block.
    num_sms: streaming multiprocessors; default the current device's (132
      off GPU: an H100).
    implementation: the decode implementation whose programs fill the SMs
      (`DecodeOp.programs_per_sm`); None: `PROGRAMS_PER_SM`.

  Returns:
    The split count, an int >= 1.
  """
  if num_sms is None:
    num_sms = _num_sms() if ops_base.on_gpu() else H100_SMS
  per_sm = (PROGRAMS_PER_SM if implementation is None else
            ops_base.get_op("decode", implementation).programs_per_sm)
  blocks = -(-max_len // block_kv)
  want = per_sm * num_sms // (batch * kv_heads)
  return int(max(1, min(want, blocks // MIN_BLOCKS_PER_SPLIT)))


def default_implementation(*, dtype, head_dim: int, group: int,
                           block_kv: int, pages_per_seq: int,
                           cache_dtype=None,
                           max_mode: str = DEFAULT_MAX_MODE,
                           max_axis_name=None, interpret=None,
                           kernel_config=None, contiguous=False) -> str:
  """The implementation `decode_attention(implementation=None)` runs for
  a problem on the current backend: on a Hopper GPU "pallas_mosaic" where
  that kernel runs it, else "pallas_triton" on a GPU, "reference"
  elsewhere. (Its split count, `default_num_splits(...,
  implementation=...)`, depends on it, and "split" mode's decisions on the
  split count.)

  Args:
    dtype: the query's dtype; head_dim; group: query heads per KV head.
    block_kv, pages_per_seq: keys per page (block) and pages per sequence.
    cache_dtype: the cache's dtype (default `dtype`; float8_e4m3fn: FP8).
    max_mode, max_axis_name, interpret, kernel_config: as
      `decode_attention`.
    contiguous: a contiguous cache (`decode_attention`), whose pages need
      no table.

  Returns:
    "pallas_mosaic", "pallas_triton" or "reference".
  """
  return ops_base.default_op(
      "decode", dtype=dtype, head_dim=head_dim, group=group,
      block_kv=block_kv, pages_per_seq=pages_per_seq,
      cache_dtype=cache_dtype, max_mode=max_mode,
      max_axis_name=max_axis_name, interpret=interpret,
      kernel_config=kernel_config, contiguous=contiguous).name


def decode_attention(q, k_cache, v_cache, kv_lengths, *, threshold=0.0,
                     sm_scale: float | None = None,
                     block_kv: int = DEFAULT_BLOCK_KV,
                     num_splits: int | None = None,
                     max_mode: str = DEFAULT_MAX_MODE,
                     implementation: str | None = None,
                     return_stats: bool = False, interpret: bool | None = None,
                     kernel_config=None, return_lse: bool = False,
                     initial_max=None, max_axis_name=None, k_scale=None,
                     v_scale=None):
  """Skip-softmax attention of one new token against a contiguous KV cache.

  Args:
    q: [batch, q_heads, head_dim] or [batch, 1, q_heads, head_dim].
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim], same dtype as q
      (f32, bf16, f16) or FP8 (float8_e4m3fn, with `k_scale`/`v_scale`);
      q_heads % kv_heads == 0 (GQA: the heads of a group are processed
      together; MQA: kv_heads = 1).
    kv_lengths: int [batch], valid tokens per sequence (0..max_len: checked
      when concrete, clamped into that range when traced); the
      new token's key and value are expected to be in the cache already.
    threshold: λ in [0, 1), f32 [batch], or a `SkipSoftmaxConfig` (its
      "decode" scale factor gives λ = c / kv_length per sequence).
    sm_scale: default 1/sqrt(head_dim).
    block_kv: keys per block: the skip granularity (power of two >= 16).
    num_splits: split-K factor; default fills the GPU
      (`default_num_splits`).
    max_mode: the row max each block is compared with (exact rules in
      `reference.blockwise_decode_attention`): "split" (each split's own
      running max: more splits skip less), "anchored" (the running max
      starts at the max over the sequence's first and last block; one pass,
      the default) or "global" (two passes: K is read once to find the
      global max and the scores are kept; the split count does not matter).
    implementation: "pallas_triton" (GPU, or CPU in interpret mode),
      "pallas_mosaic" (Hopper: bf16/f16, head_dim 64/128/256, pages of a
      multiple of 64 keys, "split" or "anchored"; CPU in
      Pallas' GPU interpret mode), "reference", or None (on a Hopper GPU
      the Mosaic kernel where it runs the problem, else the Triton kernel;
      the oracle off GPU).
    return_stats: also return a `DecodeStats`.
    interpret: run the Pallas kernel in interpret mode (default: off GPU);
      for "pallas_mosaic" also a `plgpu.InterpretGPUParams` (e.g.
      `detect_races=True`).
    kernel_config: the kernel's knobs: a `kernels.decode_triton.DecodeConfig`
      or a `kernels.decode_mosaic.MosaicDecodeConfig` (with
      implementation=None, a Triton config keeps the Triton kernel).
    return_lse: return (out, lse) in place of out: lse f32 [batch, q_heads],
      the natural-log log-sum-exp of the kept scores (-inf where none),
      for merging results over parts of a cache
      (`blasst_jax.sharding.decode_attention` with a context axis).
    initial_max: optional f32 [batch, q_heads], a known lower bound of each
      row's max score in units of sm_scale·q·kᵀ (-inf: none): every split's
      running max starts at least there ("global": the reference max is at
      least it), e.g. the anchors of a cache cut over devices.
    max_axis_name: inside `shard_map` with the cache positions cut over this
      mesh axis: "global" mode takes the global max over every device's
      part, so each part decides as one device would.
    k_scale, v_scale: FP8 caches only: f32 [kv_heads] (or a scalar), the
      cache holding values / scale (`quantize_cache` makes both). The
      "pallas_mosaic" kernel reads the FP8 pages (half the bytes of bf16)
      and widens them in shared memory; "pallas_triton" and "reference"
      dequantize the cache to q's dtype (f32 for the oracle) first.

  Returns:
    out with q's shape and dtype, or (out, DecodeStats); out is (out, lse)
    with return_lse.

  Raises:
    ValueError: on bad shapes, dtypes, lengths, thresholds or options.
  """
  validation.check_decode_inputs(q, k_cache, v_cache, kv_lengths,
                                 cache_name="cache", k_scale=k_scale,
                                 v_scale=v_scale)
  validation.check_decode_block_kv(block_kv)
  b, max_len, hkv, d = k_cache.shape
  if q.shape[0] != b:
    raise ValueError(f"`q` has batch {q.shape[0]} but the cache has {b}.")
  validation.check_lengths_range(kv_lengths, max_len)
  # Traced lengths: clamped to the cache before it is padded to whole blocks.
  kv_lengths = jnp.clip(jnp.asarray(kv_lengths), 0, max_len)
  pad = -max_len % block_kv
  if pad:  # A copy of the cache: allocate max_len as a multiple of block_kv.
    k_cache = jnp.pad(k_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v_cache = jnp.pad(v_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
  pages_per_seq = (max_len + pad) // block_kv
  # [batch * pages, block_kv, kv_heads, d]: a free reshape of the cache.
  to_pages = lambda x: x.reshape(b * pages_per_seq, block_kv, hkv, d)  # pylint: disable=g-long-lambda
  page_table = decode_base.ContiguousPages(b, pages_per_seq)
  return _decode(q, to_pages(k_cache), to_pages(v_cache), page_table,
                 kv_lengths, threshold=threshold, sm_scale=sm_scale,
                 num_splits=num_splits, max_mode=max_mode,
                 implementation=implementation, return_stats=return_stats,
                 interpret=interpret, kernel_config=kernel_config,
                 return_lse=return_lse, initial_max=initial_max,
                 max_axis_name=max_axis_name, k_scale=k_scale,
                 v_scale=v_scale)


def paged_decode_attention(q, k_pages, v_pages, page_table, kv_lengths, *,
                           threshold=0.0, sm_scale: float | None = None,
                           num_splits: int | None = None,
                           max_mode: str = DEFAULT_MAX_MODE,
                           implementation: str | None = None,
                           return_stats: bool = False,
                           interpret: bool | None = None, kernel_config=None,
                           k_scale=None, v_scale=None,
                           kv_layout: str = "NHD"):
  """`decode_attention` over a paged KV cache, as serving engines keep it.

  Args:
    q: [batch, q_heads, head_dim] or [batch, 1, q_heads, head_dim].
    k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim] (or, with
      kv_layout="HND", [num_pages, kv_heads, page_size, head_dim]): the
      page pool; page_size (a power of two >= 16) is the skip block.
    page_table: int32 [batch, pages_per_seq]: the pool page holding each
      sequence's logical block; entries past a sequence's length are never
      read.
    kv_lengths: int [batch] <= pages_per_seq * page_size.
    threshold, sm_scale, num_splits, max_mode, implementation, return_stats,
      interpret, kernel_config, k_scale, v_scale: as `decode_attention`
      (FP8 pools: float8_e4m3fn pages with their scales).
    kv_layout: "NHD" (each token's KV heads side by side in a page, as
      vLLM keeps them) or "HND" (each head's page rows one run of memory,
      as FlashInfer's HND and TensorRT-LLM's pools). "pallas_mosaic" reads
      either; the other implementations read an NHD copy of an HND pool.

  Returns:
    out with q's shape and dtype, or (out, DecodeStats).

  Raises:
    ValueError: on bad shapes, dtypes, lengths, page tables, thresholds or
      options.
  """
  validation.check_kv_layout(kv_layout, k_pages, v_pages,
                             decode_base.KV_LAYOUTS)
  # The checks below read NHD shapes.
  pools = [jax.ShapeDtypeStruct(decode_base.nhd_shape(x.shape, kv_layout),
                                x.dtype) for x in (k_pages, v_pages)]
  validation.check_decode_inputs(q, *pools, kv_lengths, cache_name="pages",
                                 k_scale=k_scale, v_scale=v_scale)
  validation.check_page_table(page_table, kv_lengths, pools[0].shape[0],
                              pools[0].shape[1])
  return _decode(q, k_pages, v_pages, page_table.astype(jnp.int32),
                 kv_lengths, threshold=threshold, sm_scale=sm_scale,
                 num_splits=num_splits, max_mode=max_mode,
                 implementation=implementation, return_stats=return_stats,
                 interpret=interpret, kernel_config=kernel_config,
                 k_scale=k_scale, v_scale=v_scale, kv_layout=kv_layout)


def quantize_cache(cache, *, axis=(0, 1, 3)):
  """An FP8 (float8_e4m3fn) copy of a KV cache and its per-head scales.

  Args:
    cache: [batch, max_len, kv_heads, head_dim] (or a page pool [pages,
      page_size, kv_heads, head_dim]), any float dtype.
    axis: the axes one scale covers (default: all but the KV head).

  Returns:
    (fp8 cache of the same shape, f32 [kv_heads] scales) with
    cache ≈ fp8.astype(f32) * scale: each head's largest magnitude maps to
    e4m3's largest finite value, 448.
  """
  x = jnp.asarray(cache, jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=axis) / 448.0
  scale = jnp.where(scale > 0, scale, 1.0)            # all-zero heads
  return (x / scale[None, None, :, None]).astype(jnp.float8_e4m3fn), scale


def _decode(q, k_pages, v_pages, page_table, kv_lengths, *, threshold,
            sm_scale, num_splits, max_mode, implementation, return_stats,
            interpret, kernel_config, return_lse: bool = False,
            initial_max=None, max_axis_name=None, k_scale=None,
            v_scale=None, kv_layout: str = "NHD"):
  """Canonicalises a paged decode call, dispatches it to an op and unwraps
  the result."""
  q_shape = q.shape
  q = q.reshape(q.shape[0], q.shape[-2], q.shape[-1])       # [b, hq, d]
  b, hq, d = q.shape
  _, block_kv, hkv, _ = decode_base.nhd_shape(k_pages.shape, kv_layout)
  max_len = page_table.shape[1] * block_kv
  validation.check_decode_options(implementation, num_splits, block_kv,
                                  max_mode)
  validation.check_shared_max(initial_max, max_axis_name, (b, hq), max_mode)
  validation.check_sm_scale(sm_scale)
  if implementation is None:
    implementation = default_implementation(
        dtype=q.dtype, head_dim=d, group=hq // hkv, block_kv=block_kv,
        pages_per_seq=page_table.shape[1], cache_dtype=k_pages.dtype,
        max_mode=max_mode, max_axis_name=max_axis_name, interpret=interpret,
        kernel_config=kernel_config,
        contiguous=isinstance(page_table, decode_base.ContiguousPages))
  op = ops_base.get_op("decode", implementation)
  if kv_layout not in op.kv_layouts:   # e.g. an HND pool: an NHD copy
    k_pages, v_pages = (decode_base.as_nhd(x, kv_layout)
                        for x in (k_pages, v_pages))
    kv_layout = "NHD"
  plan = op.prepare(dtype=q.dtype, head_dim=d, group=hq // hkv,
                    block_kv=block_kv, max_mode=max_mode,
                    initial_max=initial_max, max_axis_name=max_axis_name,
                    kernel_config=kernel_config, interpret=interpret)
  if num_splits is None:
    num_splits = default_num_splits(b, hkv, max_len, block_kv,
                                    implementation=op.name)
  sm_scale = reference.default_sm_scale(d) if sm_scale is None else float(
      sm_scale)
  # Traced lengths cannot be checked: clamp them to the cache (concrete
  # ones were checked to lie in [0, max_len]).
  kv_lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, max_len)
  log_thr = config_lib.log_threshold(config_lib.resolve_threshold(
      threshold, kv_lengths, max_len, b, phase="decode"))
  if k_scale is not None:   # [kv_heads] f32 from a scalar or per-head
    k_scale, v_scale = (jnp.broadcast_to(
        jnp.asarray(x, jnp.float32).reshape(-1), (hkv,))
                        for x in (k_scale, v_scale))
  result = op(q, k_pages, v_pages, page_table, kv_lengths, plan,
              k_scale=k_scale, v_scale=v_scale,
              log_threshold=log_thr,
              skip_enabled=not validation.is_static_zero(threshold),
              sm_scale=sm_scale, num_splits=num_splits, max_mode=max_mode,
              initial_max=initial_max, max_axis_name=max_axis_name,
              kv_layout=kv_layout)

  out = result.out.reshape(q_shape)
  if return_lse:   # context parallelism merges shards by it
    out = (out, result.lse)
  return (out, result.stats) if return_stats else out
