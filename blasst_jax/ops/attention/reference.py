"""The prefill oracle as an op: `reference.blockwise_attention` in pure JAX,
on any backend; gradients by JAX autodiff."""

from __future__ import annotations

from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax.ops import base
from blasst_jax.ops.attention import base as attention_base


class ReferenceAttention(attention_base.AttentionOp):
  """`implementation="reference"`: runs anywhere; the default off GPU."""

  name = "reference"

  def supports(self, **problem) -> bool:
    del problem
    return True

  def prepare(self, *, q_len, kv_len, head_dim, dtype, block_q, block_kv,
              block_mask=None, mask_inferred=False, kernel_config=None,
              interpret=None) -> attention_base.Plan:
    del head_dim, dtype, mask_inferred, interpret   # any; no kernel to run
    self.kernel_config(kernel_config)
    block_q, block_kv = config_lib.effective_block_sizes(q_len, kv_len,
                                                         block_q, block_kv)
    return attention_base.Plan(block_q=block_q, block_kv=block_kv,
                               block_mask=block_mask)

  def __call__(self, q, k, v, plan, *, kv_lengths, threshold, causal,
               sm_scale, initial_max=None, return_lse=False,
               record_skips=False) -> base.AttentionResult:
    del return_lse, record_skips   # the oracle always has both
    r = reference.blockwise_attention(
        q, k, v, block_q=plan.block_q, block_kv=plan.block_kv,
        threshold=threshold, causal=causal, sm_scale=sm_scale,
        kv_lengths=kv_lengths, block_mask=plan.block_mask,
        initial_max=initial_max)
    stats = self.complete_stats(r.stats, plan, q_len=q.shape[1],
                                kv_len=k.shape[1], kv_lengths=kv_lengths,
                                causal=causal)
    return base.AttentionResult(out=r.out, lse=r.lse, stats=stats,
                                skip_mask=r.skip_mask, row_max=r.row_max)


OP = ReferenceAttention()
