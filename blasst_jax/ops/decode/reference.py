"""The decode oracle as an op: `reference.blockwise_decode_attention` over
the pages gathered into a contiguous cache; runs anywhere."""

from __future__ import annotations

import jax.numpy as jnp

from blasst_jax import reference
from blasst_jax.ops import base
from blasst_jax.ops.decode import base as decode_base


class ReferenceDecode(decode_base.DecodeOp):
  """`implementation="reference"`: the default off GPU (and for head dims
  the kernel does not take)."""

  name = "reference"

  def supports(self, **problem) -> bool:
    del problem
    return True

  def prepare(self, **problem) -> decode_base.DecodePlan:
    del problem   # takes any problem; kernel_config and interpret unused
    return decode_base.DecodePlan()

  def __call__(self, q, k_pages, v_pages, page_table, kv_lengths, plan, *,
               log_threshold, skip_enabled, sm_scale, num_splits, max_mode,
               initial_max=None, max_axis_name=None, k_scale=None,
               v_scale=None, kv_layout="NHD") -> base.AttentionResult:
    self.check_kv_layout(kv_layout)
    del plan, skip_enabled
    b, hq, d = q.shape
    _, block_kv, hkv, _ = k_pages.shape
    max_len = page_table.shape[1] * block_kv
    cache_dtype = k_pages.dtype
    if k_scale is not None:   # FP8: the oracle runs on the dequantized cache
      k_pages = decode_base.dequantize(k_pages, k_scale, jnp.float32)
      v_pages = decode_base.dequantize(v_pages, v_scale, jnp.float32)
    page_table = decode_base.page_table_array(page_table)
    gather = lambda pages: pages[page_table].reshape(b, max_len, hkv, d)  # pylint: disable=g-long-lambda
    r = reference.blockwise_decode_attention(
        q.astype(k_pages.dtype), gather(k_pages), gather(v_pages), kv_lengths,
        block_kv=block_kv,
        num_splits=num_splits, max_mode=max_mode, sm_scale=sm_scale,
        log_threshold=log_threshold, initial_max=initial_max,
        max_axis_name=max_axis_name)
    stats = decode_base.decode_stats(
        jnp.sum(r.skip_mask, axis=-1, dtype=jnp.int32),          # [b, hkv]
        jnp.sum(r.visited_mask, axis=-1, dtype=jnp.int32),
        group=hq // hkv, block_kv=block_kv, head_dim=d, dtype=cache_dtype,
        max_mode=max_mode)
    return base.AttentionResult(out=r.out.astype(q.dtype), lse=r.lse,
                                stats=stats)


OP = ReferenceDecode()
