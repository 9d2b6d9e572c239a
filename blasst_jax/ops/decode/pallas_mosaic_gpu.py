"""The Hopper decode kernel (Pallas Mosaic GPU) as an op: the default on
sm_90 wherever it runs the problem (`supports`), else the Triton kernel.
On the H200 it reads dense caches as fast as the Triton kernel or faster
(from 2 % behind at batch 1, 512k to 9 % ahead at batch 1, 128k), and its
speedups over its own dense build beat the Triton kernel's in 30 of 36
cells, one a tie (`benchmarks/results/decode_h200*.json`)."""

from __future__ import annotations

import jax.numpy as jnp

from blasst_jax.kernels import decode_mosaic
from blasst_jax.ops import base
from blasst_jax.ops.decode import base as decode_base


class PallasMosaicGpuDecode(decode_base.DecodeOp):
  """`implementation="pallas_mosaic"`: bf16/f16, head_dim 64/128/256, pages
  of a multiple of 64 keys, "split" or "anchored" (so no `max_axis_name`,
  which is "global"'s), `initial_max`. The kernel merges its splits itself
  (`decode_merged`) unless its config's `merge_in_kernel` is False."""

  name = "pallas_mosaic"
  config_class = decode_mosaic.MosaicDecodeConfig
  # Three warpgroups take the register file (or, at head_dim 128, the K
  # ring takes shared memory): one program per SM. At B1 128k on the H200,
  # 16 splits instead of 33: dense 181 -> 173 us, 94 % skipped 133 -> 122
  # us (`benchmarks/results/decode_splits_h200.log`).
  programs_per_sm = 1
  # HND pages too: each head's page one run of memory for TMA.
  kv_layouts = decode_mosaic.KV_LAYOUTS

  def supports(self, *, backend=None, dtype=None, head_dim=None, group=None,
               block_kv=None, pages_per_seq=None, cache_dtype=None,
               max_mode=None, max_axis_name=None, interpret=None,
               kernel_config=None, contiguous=False, **problem) -> bool:
    del problem
    if interpret or not (base.on_gpu(backend) and base.is_hopper()):
      return False
    if any(x is None for x in (dtype, head_dim, group, block_kv,
                               pages_per_seq)):
      return False
    if kernel_config is not None and not isinstance(kernel_config,
                                                    self.config_class):
      return False   # e.g. the Triton kernel's DecodeConfig
    cache_dtype = jnp.dtype(dtype if cache_dtype is None else cache_dtype)
    fp8 = cache_dtype in decode_mosaic.FP8_DTYPES
    return (decode_mosaic.supports(group, head_dim, block_kv, dtype)
            and (fp8 or cache_dtype == jnp.dtype(dtype))
            and max_mode in decode_mosaic.MAX_MODES
            and max_axis_name is None
            and decode_mosaic.fits(self.kernel_config(kernel_config),
                                   head_dim, block_kv,
                                   0 if contiguous else pages_per_seq, fp8,
                                   group))

  def prepare(self, *, dtype, head_dim, group, block_kv, max_mode,
              initial_max, max_axis_name, kernel_config,
              interpret) -> decode_base.DecodePlan:
    if not decode_mosaic.supports(group, head_dim, block_kv, dtype):
      raise ValueError(
          "implementation='pallas_mosaic' decode needs a bf16/f16 query, "
          "head_dim 64/128/256, pages (block_kv) of a multiple of 64 keys "
          f"and at most {decode_mosaic.ROWS} query heads per KV head; got "
          f"{dtype}, head_dim {head_dim}, block_kv {block_kv}, group "
          f"{group}. Use implementation='pallas_triton'.")
    if max_mode not in decode_mosaic.MAX_MODES:
      raise ValueError(f"implementation='pallas_mosaic' decode runs max_mode "
                       f"{decode_mosaic.MAX_MODES}, got {max_mode!r}; use "
                       "implementation='pallas_triton'.")
    del initial_max
    if max_axis_name is not None:
      raise ValueError("implementation='pallas_mosaic' decode does not take "
                       "`max_axis_name` (a \"global\" mode option); use "
                       "implementation='pallas_triton'.")
    config = self.kernel_config(kernel_config)
    if interpret is None:
      interpret = not base.on_gpu()
    return decode_base.DecodePlan(
        config=config,
        interpret=base.gpu_interpret_params(interpret))

  def __call__(self, q, k_pages, v_pages, page_table, kv_lengths, plan, *,
               log_threshold, skip_enabled, sm_scale, num_splits, max_mode,
               initial_max=None, max_axis_name=None, k_scale=None,
               v_scale=None, kv_layout="NHD") -> base.AttentionResult:
    del max_axis_name   # refused by `prepare`
    self.check_kv_layout(kv_layout)
    b, hq, d = q.shape
    _, block_kv, hkv, _ = decode_base.nhd_shape(k_pages.shape, kv_layout)
    group = hq // hkv
    if initial_max is not None:   # natural log -> log2 units, per KV group
      initial_max = (initial_max.astype(jnp.float32).reshape(b, hkv, group)
                     * decode_mosaic.LOG2E)
    kernel = (decode_mosaic.decode_merged if plan.config.merge_in_kernel
              else decode_mosaic.decode_partials)
    if isinstance(page_table, decode_base.ContiguousPages):
      page_table = None   # the kernel computes the pages
    outs = kernel(
        q.reshape(b, hkv, group, d), k_pages, v_pages, page_table,
        kv_lengths, log_threshold, k_scale, v_scale, initial_max,
        group=group,
        sm_scale=sm_scale,
        num_splits=num_splits, max_mode=max_mode, config=plan.config,
        interpret=plan.interpret, skip_enabled=skip_enabled,
        kv_layout=kv_layout)
    if plan.config.merge_in_kernel:
      return decode_base.result_from_merged(
          *outs, group=group, block_kv=block_kv, max_mode=max_mode,
          cache_dtype=k_pages.dtype)
    acc, m, l, skipped, visited = outs
    return decode_base.result_from_partials(
        q, acc, m, l, skipped, visited, group=group, block_kv=block_kv,
        max_mode=max_mode, cache_dtype=k_pages.dtype)


OP = PallasMosaicGpuDecode()
