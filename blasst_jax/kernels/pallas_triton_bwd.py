"""Backward of skip-softmax attention (Pallas, Triton lowering).

The sparse forward is exact softmax attention over the blocks it kept, so
its gradient is the flash-attention backward restricted to those blocks:
with the forward's log-sum-exp `lse` and `delta = rowsum(dO * O)`,

    P  = exp(s - lse)            dV = Pᵀ dO
    dP = dO Vᵀ                   dS = P * (dP - delta)
    dQ = dS K * scale            dK = dSᵀ Q * scale

Two kernels walk lists built from the keep mask (visited, selected by the
block mask, not skipped): one program per (kv block, batch, q-head)
accumulates dK and dV over the q tiles that kept the block; one program per
(q tile, batch, q-head) accumulates dQ over the kept kv blocks. Skipped
blocks cost nothing. GQA: dK/dV are computed per q head and summed over the
group in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from blasst_jax.kernels import block_lists as lists_lib
from blasst_jax.kernels import tiles


# Backward tiles: keep-mask tiles larger than these are cut into them (H100,
# 8k causal: 64 x 64 with 4 warps and 2 stages runs the backward in 9.7 ms,
# 128 x 64 in 17.5 ms with 4 warps, 11.1 ms with 8).
BWD_BLOCK_Q = 64
BWD_BLOCK_KV = 64


def _probs_and_dscores(q, k, v, do, lse, delta, rows, keys, *, q_len, kv_len,
                       causal, scale):
  """P and dS of one (q tile, kv block): [block_q, block_kv] f32 each."""
  s = plgpu.dot(q, k, trans_b=True) * scale
  visible = (keys[None, :] < kv_len) & (rows[:, None] < q_len)
  if causal:
    visible = visible & (keys[None, :] <= rows[:, None])
  # Rows that saw no key have lse = -inf: their P is 0, not exp(+inf).
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
  dp = plgpu.dot(do, v, trans_b=True)
  # V past the length may hold NaN: 0 · NaN must not reach dS.
  return p, jnp.where(visible, p * (dp - delta[:, None]), 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_len_ref,
                 list_ref, n_ref, dk_ref, dv_ref, *, scale, causal, block_q,
                 block_kv, q_len):
  # q_ref, do_ref [q_len_padded, d]; k_ref, v_ref [block_kv, d]; lse_ref,
  # delta_ref [q_len_padded]; list_ref [nq_pow2]: q tiles that kept this
  # block, n_ref [] how many. Outputs dk_ref, dv_ref [block_kv, d].
  j = pl.program_id(0)
  kv_len = kv_len_ref[...]
  k, v = k_ref[...], v_ref[...]
  keys = j * block_kv + jnp.arange(block_kv)
  ids = list_ref[...]

  def step(t, carry):
    dk, dv = carry
    i = tiles.list_entry(ids, t)
    rows_at = pl.ds(i * block_q, block_q)
    q, do = q_ref[rows_at, :], do_ref[rows_at, :]
    p, ds = _probs_and_dscores(
        q, k, v, do, lse_ref[rows_at], delta_ref[rows_at],
        i * block_q + jnp.arange(block_q), keys, q_len=q_len, kv_len=kv_len,
        causal=causal, scale=scale)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, n_ref[...], step, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_len_ref,
               list_ref, n_ref, dq_ref, *, scale, causal, block_q, block_kv,
               q_len):
  # q_ref, do_ref [block_q, d]; k_ref, v_ref [kv_len_padded, d]; lse_ref,
  # delta_ref [block_q]; list_ref [nk_pow2]: kept kv blocks, n_ref [].
  i = pl.program_id(0)
  kv_len = kv_len_ref[...]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  rows = i * block_q + jnp.arange(block_q)
  ids = list_ref[...]

  def step(t, dq):
    j = tiles.list_entry(ids, t)
    keys_at = pl.ds(j * block_kv, block_kv)
    keys = j * block_kv + jnp.arange(block_kv)
    # Keys past the length may hold NaN: zeroed for dS · K.
    k = jnp.where((keys < kv_len)[:, None], k_ref[keys_at, :], 0)
    _, ds = _probs_and_dscores(
        q, k, v_ref[keys_at, :], do, lse, delta, rows, keys, q_len=q_len,
        kv_len=kv_len, causal=causal, scale=scale)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, n_ref[...], step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("causal", "sm_scale", "block_q", "block_kv",
                              "num_warps", "num_stages", "interpret"))
def attention_backward(q, k, v, out, lse, d_out, kv_lengths, keep, *,
                       causal: bool, sm_scale: float, block_q: int,
                       block_kv: int, num_warps: int = 4,
                       num_stages: int = 2, interpret: bool = False):
  """Gradients of attention restricted to the kept blocks.

  Args:
    q, d_out, out: [batch, q_len, q_heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim].
    lse: f32 [batch, q_heads, q_len], the forward's natural-log lse.
    kv_lengths: int32 [batch].
    keep: bool [batch, q_heads, n_q_tiles, n_kv_blocks]: blocks the forward
      kept (visited, selected, not skipped), on the forward's tiles; tiles
      that are multiples of BWD_BLOCK_Q x BWD_BLOCK_KV are cut into them.

  Returns:
    dq, dk, dv in the dtypes and shapes of q, k, v.
  """
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  group = hq // hkv
  keep, block_q, block_kv = lists_lib.cut_tiles(keep, lq, lk, block_q,
                                               block_kv, BWD_BLOCK_Q,
                                               BWD_BLOCK_KV)
  nq, nk = tiles.cdiv(lq, block_q), tiles.cdiv(lk, block_kv)
  dp = tiles.padded_head_dim(d)
  kv_lengths = kv_lengths.astype(jnp.int32)
  delta = tiles.output_grad_dot(d_out, out)                # [b, hq, lq]
  qp = tiles.pad_to(q, nq * block_q, dp)
  dop = tiles.pad_to(d_out.astype(q.dtype), nq * block_q, dp)
  kp, vp = tiles.pad_to(k, nk * block_kv, dp), tiles.pad_to(v, nk * block_kv, dp)
  rows_pad = ((0, 0), (0, 0), (0, nq * block_q - lq))
  lse_p = jnp.pad(lse, rows_pad, constant_values=-jnp.inf)
  delta_p = jnp.pad(delta, rows_pad)
  kept = lists_lib.walked_blocks(keep, kv_lengths, q_len=lq, block_q=block_q,
                                 block_kv=block_kv, causal=causal)
  q_lists, n_q = lists_lib.kernel_list(jnp.swapaxes(kept, 2, 3))  # [b,hq,nk,·]
  kv_lists, n_kv = lists_lib.kernel_list(kept)                    # [b,hq,nq,·]
  common = dict(scale=sm_scale, causal=causal, block_q=block_q,
                block_kv=block_kv, q_len=lq)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)

  per_batch = pl.BlockSpec((None,), lambda t, bi, h: (bi,))
  per_program = pl.BlockSpec((None, None, None), lambda t, bi, h: (bi, h, t))
  whole_q = pl.BlockSpec((None, nq * block_q, None, dp),
                         lambda t, bi, h: (bi, 0, h, 0))
  whole_rows = pl.BlockSpec((None, None, nq * block_q),
                            lambda t, bi, h: (bi, h, 0))
  kv_block = pl.BlockSpec((None, block_kv, None, dp),
                          lambda t, bi, h: (bi, t, h // group, 0))
  dkv_block = pl.BlockSpec((None, block_kv, None, dp),
                           lambda t, bi, h: (bi, t, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **common),
      grid=(nk, b, hq),
      in_specs=[whole_q, kv_block, kv_block, whole_q, whole_rows, whole_rows,
                per_batch,
                pl.BlockSpec((None, None, None, q_lists.shape[-1]),
                             lambda t, bi, h: (bi, h, t, 0)),
                per_program],
      out_specs=[dkv_block, dkv_block],
      out_shape=[jax.ShapeDtypeStruct((b, nk * block_kv, hq, dp), jnp.float32)
                 ] * 2,
      compiler_params=params, interpret=interpret,
      name="blasst_backward_dkdv_triton",
  )(qp, kp, vp, dop, lse_p, delta_p, kv_lengths, q_lists, n_q)

  q_tile = pl.BlockSpec((None, block_q, None, dp),
                        lambda t, bi, h: (bi, t, h, 0))
  tile_rows = pl.BlockSpec((None, None, block_q), lambda t, bi, h: (bi, h, t))
  whole_kv = pl.BlockSpec((None, nk * block_kv, None, dp),
                          lambda t, bi, h: (bi, 0, h // group, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      grid=(nq, b, hq),
      in_specs=[q_tile, whole_kv, whole_kv, q_tile, tile_rows, tile_rows,
                per_batch,
                pl.BlockSpec((None, None, None, kv_lists.shape[-1]),
                             lambda t, bi, h: (bi, h, t, 0)),
                per_program],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      compiler_params=params, interpret=interpret,
      name="blasst_backward_dq_triton",
  )(qp, kp, vp, dop, lse_p, delta_p, kv_lengths, kv_lists, n_kv)

  # Per q head -> per KV head (GQA: sum over the group).
  def per_kv_head(x):
    x = x[:, :lk, :, :d].reshape(b, lk, hkv, group, d)
    return jnp.sum(x, axis=3).astype(k.dtype)
  return dq[:, :lq, :, :d], per_kv_head(dk), per_kv_head(dv)
