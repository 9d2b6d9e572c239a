"""The portable Pallas kernel (Triton lowering) as an op: any GPU, or CPU in
interpret mode; backward `kernels/pallas_triton_bwd.py`."""

from __future__ import annotations

from blasst_jax import config as config_lib
from blasst_jax.kernels import pallas_triton
from blasst_jax.kernels import pallas_triton_bwd
from blasst_jax.ops import base
from blasst_jax.ops.attention import base as attention_base

# The kernel keeps a [block_q, head_dim] accumulator in registers.
MAX_HEAD_DIM = 256


def backward(q, k, v, out, lse, d_out, kv_lengths, keep, options):
  """The Triton backward over the kept blocks (any head_dim the forward
  takes); `options` are the forward's static keywords."""
  return pallas_triton_bwd.attention_backward(
      q, k, v, out, lse, d_out, kv_lengths, keep, causal=options["causal"],
      sm_scale=options["sm_scale"], block_q=options["block_q"],
      block_kv=options["block_kv"],
      interpret=bool(options.get("interpret")))


class PallasTritonAttention(attention_base.PallasAttentionOp):
  """`implementation="pallas_triton"`: tiles default to 128 x 64
  (`config.DEFAULT_BLOCK_Q`, `config.DEFAULT_BLOCK_KV`), as the oracle's."""

  name = "pallas_triton"
  config_class = pallas_triton.TritonConfig

  def supports(self, *, backend=None, **problem) -> bool:
    del problem
    return base.on_gpu(backend)

  def prepare(self, *, q_len, kv_len, head_dim, dtype, block_q, block_kv,
              block_mask=None, mask_inferred=False, kernel_config=None,
              interpret=None) -> attention_base.Plan:
    del dtype, mask_inferred
    if head_dim > MAX_HEAD_DIM:
      raise ValueError(
          f"head_dim {head_dim} is too large for implementation="
          f"'pallas_triton' (max {MAX_HEAD_DIM}); use "
          "implementation='reference'.")
    block_q, block_kv = config_lib.effective_block_sizes(q_len, kv_len,
                                                         block_q, block_kv)
    return attention_base.Plan(
        block_q=block_q, block_kv=block_kv,
        config=self.kernel_config(kernel_config),
        interpret=(not base.on_gpu()) if interpret is None else interpret,
        block_mask=block_mask)

  def kernel_forward(self, *args, **kwargs):
    return pallas_triton.attention_forward(*args, **kwargs)

  def kernel_options(self, plan):
    return dict(config=plan.config, interpret=bool(plan.interpret))

  def backward(self, q, k, v, out, lse, d_out, kv_lengths, keep, options):
    return backward(q, k, v, out, lse, d_out, kv_lengths, keep, options)


OP = PallasTritonAttention()
