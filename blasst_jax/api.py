"""Public entry point of prefill attention: canonicalise, resolve tiles once,
dispatch to an op, unwrap its result.

The argument checks live in `blasst_jax.validation`; everything one backend
can or cannot run, its kernel config, tiles and gradient live in its op
(`blasst_jax.ops.attention.*`), picked from the one registry of
implementations (`blasst_jax.ops.base`).
"""

from __future__ import annotations

from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax import validation
from blasst_jax.ops import base as ops_base

IMPLEMENTATIONS = validation.IMPLEMENTATIONS
SUPPORTED_DTYPES = validation.SUPPORTED_DTYPES
on_gpu = ops_base.on_gpu
is_hopper = ops_base.is_hopper


def default_implementation(backend: str | None = None, *, dtype=None,
                           head_dim: int | None = None) -> str:
  """The best implementation for a backend and problem.

  "pallas_mosaic" on a Hopper GPU for bf16/f16 and head_dim 64/128/256,
  "pallas_triton" on other GPUs (and other dtypes or head dims), and
  "reference" off GPU.

  Args:
    backend: a JAX backend name ("cpu", "gpu", "cuda", "rocm", "tpu"),
      default `jax.default_backend()`.
    dtype: the dtype of q/k/v, if known (None: any).
    head_dim: the head dimension, if known (None: any).

  Returns:
    "reference", "pallas_triton" or "pallas_mosaic": a valid
    `implementation` for `attention`.
  """
  return ops_base.default_op("attention", backend=backend, dtype=dtype,
                             head_dim=head_dim).name


def default_tiles(implementation: str | None = None, *, head_dim: int,
                  dtype=None) -> tuple[int, int]:
  """(block_q, block_kv) `attention` uses when none are given.

  128 x 64 for "reference" and "pallas_triton", 64 x 128 for
  "pallas_mosaic" (64 x 64 at head_dim 256). Tiles longer than a sequence
  are shrunk to cover it, which changes no decision.

  Args:
    implementation: an implementation name, or None for the one
      `default_implementation` picks for `dtype` and `head_dim` here.
    head_dim: the head dimension.
    dtype: the dtype of q/k/v, if known (None: any).
  """
  if implementation is None:
    implementation = default_implementation(dtype=dtype, head_dim=head_dim)
  return ops_base.get_op("attention", implementation).default_tiles(head_dim)


def attention(q, k, v, *, threshold=0.0, causal: bool = False,
              sm_scale: float | None = None, kv_lengths=None, block_mask=None,
              implementation: str | None = None, return_stats: bool = False,
              block_q: int | None = None, block_kv: int | None = None,
              interpret: bool | None = None, kernel_config=None,
              return_lse: bool = False, initial_max=None):
  """Skip-softmax attention (prefill).

  Args:
    q: [batch, q_len, q_heads, head_dim], float32/bfloat16/float16.
    k, v: [batch, kv_len, kv_heads, head_dim], same dtype;
      q_heads % kv_heads == 0 (MHA, GQA, MQA).
    threshold: λ in [0, 1) (0 = dense), an f32 array [batch], or a
      `SkipSoftmaxConfig`. May be a traced value under `jax.jit` (one
      compile serves a whole λ sweep; a traced λ is not range-checked). A λ
      known to be 0 at trace time runs the kernel built without the skip
      check.
    causal: top-left aligned causal mask (query i sees keys j <= i), as
      `jax.nn.dot_product_attention(is_causal=True)`.
    sm_scale: score scale, default 1/sqrt(head_dim).
    kv_lengths: optional int [batch]: keys at positions >= kv_lengths[b] are
      padding. Rows that see no key return 0.
    block_mask: optional bool [batch, q_heads, n_q_tiles, n_kv_blocks]
      (e.g. `bj.xattention.select_blocks`): only selected blocks are
      visited (the kernels walk lists of them: unselected blocks cost no
      K/V reads; "pallas_mosaic" reads those selected for either of the two
      q tiles a program holds) and skipping applies on top. Its blocks are
      the tiles; with block_q and block_kv None they are inferred from its
      shape, and for "pallas_mosaic" blocks that are whole multiples of its
      default tiles are cut into them (XAttention's 128 x 128 blocks run as
      64 x 128 tiles, skip decisions per 64-row tile). "pallas_mosaic" needs tiles of at least 64 x 64 (unless one
      tile covers the sequence); None picks it on Hopper for 64-row tiles
      and KV blocks up to its default size, "pallas_triton" otherwise.
    implementation: "reference", "pallas_triton", "pallas_mosaic" (Hopper,
      bf16/f16, head_dim 64/128/256) or None for the best one for the
      current backend and problem (`default_implementation`).
    return_stats: also return a `SkipStats`.
    block_q, block_kv: tile sizes (powers of two >= 16). They define the
      skip granularity, so the same λ skips differently at other tiles.
      None: the implementation's default (`default_tiles`): 128/64 for
      "reference" and "pallas_triton", 64/128 (64/64 at head_dim 256) for
      "pallas_mosaic", block_q being the rows of one compute warpgroup.
      Pass both to take the same decisions on every backend; the returned
      `SkipStats` name the tiles that decided (`stats.tiles`).
    interpret: run Pallas kernels in interpret mode; default True when no GPU
      is present for "pallas_triton". For "pallas_mosaic", True runs Pallas'
      GPU interpret mode (barriers and TMA simulated on CPU; slow), and a
      `jax.experimental.pallas.mosaic_gpu.InterpretGPUParams` runs it with
      those settings (e.g. `detect_races=True`).
    kernel_config: implementation-specific speed knobs, e.g.
      `blasst_jax.kernels.pallas_triton.TritonConfig`.
    return_lse: return (out, lse) in place of out: lse f32 [batch, q_heads,
      q_len], the natural-log log-sum-exp of each row's kept scores (-inf
      for rows that kept none), to merge results over parts of the keys
      (`blasst_jax.sharding`). The Pallas kernels give no gradient with it.
    initial_max: optional f32 [batch, q_heads, q_len] (needs return_lse):
      the running max each row starts from, in units of sm_scale·q·kᵀ
      (-inf: none), e.g. the row max over keys that precede these ones; a
      tile that starts finite may skip its first block. Chaining calls over
      consecutive key parts this way takes the skip decisions of one call
      over all of them. Every implementation takes it.

  Returns:
    out [batch, q_len, q_heads, head_dim] in q's dtype, or (out, SkipStats)
    (with the tiles that decided: `stats.block_q`, `stats.block_kv`);
    out is (out, lse) with return_lse, and (out, lse, row_max) with
    initial_max: the running max at the end, f32 [batch, q_heads, q_len].

  Raises:
    ValueError: on bad shapes, dtypes, thresholds, block sizes or
      implementation names, before any kernel is traced.
  """
  validation.check_attention_args(q, k, v, kv_lengths=kv_lengths,
                                  causal=causal, sm_scale=sm_scale,
                                  threshold=threshold)
  b, lq, hq, d = q.shape
  lk = k.shape[1]
  block_q, block_kv, mask_inferred = _caller_tiles(q, k, block_mask, block_q,
                                                   block_kv)
  validation.check_implementation(implementation)
  validation.check_initial_max(initial_max, (b, hq, lq), return_lse)
  if implementation is None:
    op = ops_base.default_op(
        "attention", dtype=q.dtype, head_dim=d, interpret=interpret,
        q_len=lq, kv_len=lk, mask_inferred=mask_inferred,
        mask_tiles=None if block_mask is None else (block_q, block_kv))
  else:
    op = ops_base.get_op("attention", implementation)
  plan = op.prepare(q_len=lq, kv_len=lk, head_dim=d, dtype=q.dtype,
                    block_q=block_q, block_kv=block_kv, block_mask=block_mask,
                    mask_inferred=mask_inferred, kernel_config=kernel_config,
                    interpret=interpret)
  sm_scale = reference.default_sm_scale(d) if sm_scale is None else float(
      sm_scale)
  result = op(q, k, v, plan, kv_lengths=kv_lengths, threshold=threshold,
              causal=causal, sm_scale=sm_scale, initial_max=initial_max,
              return_lse=return_lse)
  out = result.out
  if return_lse:
    out = (out, result.lse) + (() if initial_max is None
                               else (result.row_max,))
  return (out, result.stats) if return_stats else out


def _caller_tiles(q, k, block_mask, block_q, block_kv):
  """The caller's tiles, checked: (block_q, block_kv, mask_inferred).

  Without a block mask they are passed on as given (None: the op's
  defaults). With one they are its tiles: given, or inferred from its shape
  (mask_inferred), None ones at 128 x 64, shrunk to the sequence; the mask
  must have their shape.
  """
  b, lq, hq, _ = q.shape
  lk = k.shape[1]
  mask_inferred = (block_mask is not None and block_q is None
                   and block_kv is None)
  if mask_inferred:
    mask_shape = validation.shape_of("block_mask", block_mask)
    if len(mask_shape) == 4:
      block_q = validation.mask_block_size(lq, mask_shape[2], "q_len")
      block_kv = validation.mask_block_size(lk, mask_shape[3], "kv_len")
  # Checks the sizes (powers of two >= 16) whether or not a mask is given.
  mask_tiles = config_lib.effective_block_sizes(lq, lk, block_q, block_kv)
  if block_mask is None:
    return block_q, block_kv, False
  validation.check_block_mask(
      block_mask, (b, hq, -(-lq // mask_tiles[0]), -(-lk // mask_tiles[1])))
  return (*mask_tiles, mask_inferred)
