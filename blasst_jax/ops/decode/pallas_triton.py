"""The split-K decode kernel (Triton lowering) as an op: any GPU (the
default there), or CPU in interpret mode."""

from __future__ import annotations

import jax.numpy as jnp

from blasst_jax.kernels import decode_triton
from blasst_jax.ops import base
from blasst_jax.ops.decode import base as decode_base


def kernel_head_dim(head_dim: int) -> bool:
  """Head dims the kernel takes (Triton tiles: powers of two >= 16)."""
  return head_dim >= 16 and not head_dim & (head_dim - 1)


class PallasTritonDecode(decode_base.DecodeOp):
  """`implementation="pallas_triton"`: every max_mode, `initial_max` and
  `max_axis_name`."""

  name = "pallas_triton"
  config_class = decode_triton.DecodeConfig

  def supports(self, *, backend=None, head_dim=None, **problem) -> bool:
    del problem
    return base.on_gpu(backend) and (head_dim is None
                                     or kernel_head_dim(head_dim))

  def prepare(self, *, dtype, head_dim, group, block_kv, max_mode,
              initial_max, max_axis_name, kernel_config,
              interpret) -> decode_base.DecodePlan:
    del dtype, group, block_kv, max_mode, initial_max, max_axis_name
    if not kernel_head_dim(head_dim):
      raise ValueError(f"The decode kernel needs head_dim a power of two >= "
                       f"16, got {head_dim}; use implementation='reference'.")
    return decode_base.DecodePlan(
        config=self.kernel_config(kernel_config),
        interpret=(not base.on_gpu()) if interpret is None else interpret)

  def __call__(self, q, k_pages, v_pages, page_table, kv_lengths, plan, *,
               log_threshold, skip_enabled, sm_scale, num_splits, max_mode,
               initial_max=None, max_axis_name=None, k_scale=None,
               v_scale=None, kv_layout="NHD") -> base.AttentionResult:
    self.check_kv_layout(kv_layout)
    # FP8 pages are widened to q's dtype first (the kernel reads those).
    k_pages = decode_base.dequantize(k_pages, k_scale, q.dtype)
    v_pages = decode_base.dequantize(v_pages, v_scale, q.dtype)
    b, hq, d = q.shape
    block_kv, hkv = k_pages.shape[1], k_pages.shape[2]
    group = hq // hkv
    rows = decode_triton.padded_rows(group)
    qg = jnp.pad(q.reshape(b, hkv, group, d),
                 ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    if initial_max is not None:   # log2 units, padding rows at -inf
      initial_max = jnp.pad(
          initial_max.astype(jnp.float32).reshape(b, hkv, group)
          * decode_triton.LOG2E, ((0, 0), (0, 0), (0, rows - group)),
          constant_values=-jnp.inf)
    acc, m, l, skipped, visited = decode_triton.decode_partials(
        qg, k_pages, v_pages, decode_base.page_table_array(page_table),
        kv_lengths, log_threshold,
        initial_max, group=group, sm_scale=sm_scale, num_splits=num_splits,
        max_mode=max_mode, config=plan.config,
        interpret=bool(plan.interpret), skip_enabled=skip_enabled,
        max_axis_name=max_axis_name)
    return decode_base.result_from_partials(
        q, acc, m, l, skipped, visited, group=group, block_kv=block_kv,
        max_mode=max_mode)


OP = PallasTritonDecode()
