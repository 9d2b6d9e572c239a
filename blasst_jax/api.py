"""Public entry point: validation and dispatch to an implementation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax import validation
from blasst_jax.config import SkipStats

IMPLEMENTATIONS = validation.IMPLEMENTATIONS
SUPPORTED_DTYPES = validation.SUPPORTED_DTYPES
# The Triton kernel keeps a [block_q, head_dim] accumulator in registers.
MAX_TRITON_HEAD_DIM = 256


MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)
MOSAIC_HEAD_DIMS = (64, 128, 256)


GPU_BACKENDS = ("gpu", "cuda", "rocm")


def on_gpu(backend: str | None = None) -> bool:
  """Whether `backend` (default `jax.default_backend()`) is a GPU: where the
  Pallas kernels compile (elsewhere they run in interpret mode)."""
  return (backend or jax.default_backend()) in GPU_BACKENDS


def is_hopper(device=None) -> bool:
  """True for an NVIDIA Hopper GPU (H100, H200, H800, GH200: sm_90).

  Args:
    device: a `jax.Device`, default the first device.
  """
  device = device or jax.devices()[0]
  if not on_gpu(device.platform):
    return False
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return str(capability).split(".")[0] == "9"
  return any(name in device.device_kind for name in ("H100", "H200", "H800"))


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
  if not on_gpu(backend):
    return "reference"
  mosaic_fits = (
      (dtype is None or jnp.dtype(dtype) in map(jnp.dtype, MOSAIC_DTYPES))
      and (head_dim is None or head_dim in MOSAIC_HEAD_DIMS))
  if mosaic_fits and is_hopper():
    return "pallas_mosaic"
  return "pallas_triton"


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
      skip granularity. Default 128/64; for "pallas_mosaic" 64/128 (64/64
      at head_dim 256), block_q being the rows of one compute warpgroup.
    interpret: run Pallas kernels in interpret mode; default True when no GPU
      is present for "pallas_triton". For "pallas_mosaic", True runs Pallas'
      GPU interpret mode (barriers and TMA simulated on CPU; slow).
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
    out [batch, q_len, q_heads, head_dim] in q's dtype, or (out, SkipStats);
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
  tiles_from_mask = (block_mask is not None and block_q is None
                     and block_kv is None)
  if tiles_from_mask:
    mask_shape = validation.shape_of("block_mask", block_mask)
    if len(mask_shape) == 4:
      block_q = validation.mask_block_size(lq, mask_shape[2], "q_len")
      block_kv = validation.mask_block_size(lk, mask_shape[3], "kv_len")
  block_q_arg, block_kv_arg = block_q, block_kv
  block_q, block_kv = config_lib.effective_block_sizes(lq, lk, block_q,
                                                       block_kv)
  validation.check_block_mask(block_mask, (b, hq, -(-lq // block_q), -(-lk // block_kv)))
  validation.check_implementation(implementation)
  validation.check_initial_max(initial_max, (b, hq, lq), return_lse)
  # Mask blocks that are whole multiples of the Hopper kernel's tiles.
  split = _mosaic_split(block_q, block_kv, d) if tiles_from_mask else None
  if implementation is None:
    implementation = default_implementation(dtype=q.dtype, head_dim=d)
    if implementation == "pallas_mosaic" and (interpret or (
        block_mask is not None and not split
        and not _mosaic_tiles_fit(lq, lk, block_q, block_kv, d))):
      implementation = "pallas_triton"
  if implementation == "pallas_mosaic" and split:
    # Repeat each mask block per kernel tile (tiles wholly past the
    # sequence end are dropped).
    block_q, block_kv = block_q // split[0], block_kv // split[1]
    block_mask = jnp.repeat(jnp.repeat(block_mask, split[0], axis=2),
                            split[1], axis=3)[:, :, :-(-lq // block_q),
                                              :-(-lk // block_kv)]
  sm_scale = reference.default_sm_scale(d) if sm_scale is None else float(
      sm_scale)

  if implementation == "reference":
    if kernel_config is not None:
      raise ValueError(
          "`kernel_config` tunes a Pallas kernel; implementation='reference' "
          "takes none (pass kernel_config=None).")
    result = reference.blockwise_attention(
        q, k, v, block_q=block_q, block_kv=block_kv, threshold=threshold,
        causal=causal, sm_scale=sm_scale, kv_lengths=kv_lengths,
        block_mask=block_mask, initial_max=initial_max)
    out = (result.out, result.lse) if return_lse else result.out
    if initial_max is not None:
      out += (result.row_max,)
    if not return_stats:
      return out
    return out, _with_masked_count(
        result.stats, block_mask, lq, lk, block_q, block_kv, kv_lengths,
        causal)

  if implementation == "pallas_triton":
    kernel_config, interpret = _triton_options(d, kernel_config, interpret)
  else:
    if block_mask is not None:  # The mask's tiles, not the kernel defaults.
      block_q_arg, block_kv_arg = block_q, block_kv
    block_q, block_kv, kernel_config = _mosaic_options(
        q, lq, lk, block_q_arg, block_kv_arg, kernel_config, interpret,
        block_mask)
  kv_lengths = reference.kv_lengths_or_full(kv_lengths, b, lk)
  log_thr = config_lib.log_threshold(
      config_lib.resolve_threshold(threshold, kv_lengths, lk, b))
  static = dict(kernel=implementation, causal=causal, sm_scale=sm_scale,
                block_q=block_q, block_kv=block_kv, config=kernel_config,
                skip_enabled=not validation.is_static_zero(threshold))
  if implementation == "pallas_triton":
    static["interpret"] = bool(interpret)
  elif interpret:
    static["interpret"] = _mosaic_interpret_params()
  static = tuple(sorted(static.items()))
  if return_lse:
    (out, skipped, visited), lse, _, *row_max = _run_forward(
        q, k, v, kv_lengths, log_thr, block_mask, static, skip_mask=False,
        initial_max=initial_max)
    out = (out, lse, *row_max)
  else:
    out, skipped, visited = _kernel_with_vjp(q, k, v, kv_lengths, log_thr,
                                             block_mask, static)
  if not return_stats:
    return out
  stats = SkipStats(skipped_blocks=jnp.sum(skipped, axis=-1),
                    visited_blocks=jnp.sum(visited, axis=-1))
  return out, _with_masked_count(stats, block_mask, lq, lk, block_q, block_kv,
                                 kv_lengths, causal)


def _with_masked_count(stats, block_mask, q_len, kv_len, block_q, block_kv,
                       kv_lengths, causal):
  """`stats` with `masked_blocks`: pairs the causal/length masks allow, less
  those visited (None without a block mask)."""
  if block_mask is None:
    return stats
  b = block_mask.shape[0]
  allowed = reference.visited_blocks_mask(
      q_len, kv_len, block_q, block_kv,
      reference.kv_lengths_or_full(kv_lengths, b, kv_len), causal)
  allowed = jnp.sum(allowed, axis=(2, 3), dtype=jnp.int32)       # [b, 1]
  return dataclasses.replace(
      stats, masked_blocks=allowed - stats.visited_blocks)


def _triton_options(head_dim, kernel_config, interpret):
  from blasst_jax.kernels import pallas_triton  # pylint: disable=g-import-not-at-top
  if head_dim > MAX_TRITON_HEAD_DIM:
    raise ValueError(
        f"head_dim {head_dim} is too large for implementation='pallas_triton'"
        f" (max {MAX_TRITON_HEAD_DIM}); use implementation='reference'.")
  kernel_config = validation.kernel_config_or_default(
      kernel_config, pallas_triton.TritonConfig, repr("pallas_triton"))
  if interpret is None:
    interpret = not on_gpu()
  return kernel_config, interpret


def _mosaic_options(q, q_len, kv_len, block_q, block_kv, kernel_config,
                    interpret, block_mask=None):
  """Checks what the Hopper kernel supports; returns its block sizes.

  `block_q`, `block_kv` are the caller's (None: the kernel's defaults).
  """
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  if not interpret and not is_hopper():
    raise ValueError(
        "implementation='pallas_mosaic' needs an NVIDIA Hopper GPU (sm_90), "
        f"this is {jax.devices()[0].device_kind!r}; use 'pallas_triton', "
        "'reference', or interpret=True (a slow simulation, for debugging).")
  if jnp.dtype(q.dtype) not in map(jnp.dtype, MOSAIC_DTYPES):
    raise ValueError(
        f"implementation='pallas_mosaic' takes bfloat16 or float16, got "
        f"{q.dtype}; cast q, k, v or use 'pallas_triton'.")
  d = q.shape[-1]
  if d not in MOSAIC_HEAD_DIMS:
    raise ValueError(
        f"implementation='pallas_mosaic' supports head_dim 64, 128 or 256, "
        f"got {d}; use 'pallas_triton'.")
  if block_q is None:
    block_q = pallas_mosaic.DEFAULT_BLOCK_Q
  if block_kv is None:
    block_kv = pallas_mosaic.default_block_kv(d)
  block_q, block_kv = config_lib.effective_block_sizes(q_len, kv_len, block_q,
                                                       block_kv)
  n_listed = 0
  if block_mask is not None:
    if _widened_tiles(q_len, kv_len, block_q, block_kv) != _tiles(
        q_len, kv_len, block_q, block_kv):
      raise ValueError(
          f"`block_mask` tiles of {block_q}x{block_kv} are smaller than the "
          "64x64 wgmma tiles of implementation='pallas_mosaic'; build the "
          "mask with block size >= 64 or use 'pallas_triton'.")
    n_listed = _tiles(q_len, kv_len, block_q, block_kv)[1]
  # Tiles smaller than 64 only arise for short sequences, where widening
  # them to one wgmma tile changes no decision (one tile either way).
  block_q, block_kv = max(block_q, 64), max(block_kv, 64)
  kernel_config = validation.kernel_config_or_default(
      kernel_config, pallas_mosaic.MosaicConfig, repr("pallas_mosaic"))
  # The differentiated forward also records its skips.
  n_recorded = _tiles(q_len, kv_len, block_q, block_kv)[1]
  smem = pallas_mosaic.shared_memory_bytes(
      block_q, block_kv, d, kernel_config.num_stages, n_listed, n_recorded,
      k_stages=pallas_mosaic.k_ring_depth(kernel_config, block_q, block_kv, d,
                                          n_listed, n_recorded))
  if smem > pallas_mosaic.MAX_SHARED_MEMORY:
    raise ValueError(
        f"block_q={block_q}, block_kv={block_kv}, head_dim={d}, "
        f"num_stages={kernel_config.num_stages}, "
        f"extra_k_stages={kernel_config.extra_k_stages}"
        + (f", a block list of {n_listed} KV blocks" if n_listed else "")
        + f" need {smem} bytes of shared memory (max "
        f"{pallas_mosaic.MAX_SHARED_MEMORY}); lower `block_kv` or num_stages"
        + (", or use larger mask blocks" if n_listed else "") + ".")
  return block_q, block_kv, kernel_config


def _tiles(q_len, kv_len, block_q, block_kv):
  return -(-q_len // block_q), -(-kv_len // block_kv)


def _widened_tiles(q_len, kv_len, block_q, block_kv):
  return _tiles(q_len, kv_len, max(block_q, 64), max(block_kv, 64))


def _mosaic_split(block_q, block_kv, head_dim):
  """(q, kv) factors that cut mask blocks of block_q x block_kv into the
  Hopper kernel's default tiles (e.g. XAttention's 128 x 128 blocks -> 2 x 1
  tiles of 64 x 128), or None when they are those tiles or do not divide
  evenly."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  tq, tk = pallas_mosaic.DEFAULT_BLOCK_Q, pallas_mosaic.default_block_kv(
      head_dim)
  if block_q % tq or block_kv % tk or (block_q, block_kv) == (tq, tk):
    return None
  return block_q // tq, block_kv // tk


def _mosaic_tiles_fit(q_len, kv_len, block_q, block_kv, head_dim) -> bool:
  """Whether a block mask's tiles are ones the Hopper kernel is built and
  measured for (64-row q tiles, KV blocks up to its default), so that
  implementation=None may pick it."""
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  return (_widened_tiles(q_len, kv_len, block_q, block_kv)
          == _tiles(q_len, kv_len, block_q, block_kv)
          and max(block_q, 64) == pallas_mosaic.DEFAULT_BLOCK_Q
          and max(block_kv, 64) <= pallas_mosaic.default_block_kv(head_dim))


def _mosaic_interpret_params():
  """GPU interpret mode for the Mosaic kernel (CPU simulation)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu.InterpretGPUParams()


def _forward_kernel(name):
  if name == "pallas_triton":
    from blasst_jax.kernels import pallas_triton  # pylint: disable=g-import-not-at-top
    return pallas_triton.attention_forward
  from blasst_jax.kernels import pallas_mosaic  # pylint: disable=g-import-not-at-top
  return pallas_mosaic.attention_forward


def _run_forward(q, k, v, kv_lengths, log_thr, block_mask, static, *,
                 skip_mask: bool, initial_max=None):
  """The Pallas forward: ((out, skipped, visited), lse, skip mask). With
  skip_mask the kernel also records which blocks it skipped (else None);
  with initial_max the final row max follows."""
  opts = dict(static)
  forward = _forward_kernel(opts.pop("kernel"))
  if initial_max is not None:
    opts["initial_max"] = initial_max
  out, lse, skipped, visited, *extra = forward(
      q, k, v, kv_lengths, log_thr, block_mask, return_skip_mask=skip_mask,
      **opts)
  skips = extra.pop(0) if skip_mask else None
  return ((out, skipped, visited), lse, skips) + tuple(extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _kernel_with_vjp(q, k, v, kv_lengths, log_thr, block_mask, static):
  """A Pallas forward, differentiable: the gradient of the sparse forward
  (skipped blocks carry zero probability). The forward records the blocks
  it skipped; the Pallas backward of the same family
  (`pallas_mosaic_bwd` on Hopper for head_dim 64/128, else
  `pallas_triton_bwd`) walks exactly the blocks it kept."""
  return _run_forward(q, k, v, kv_lengths, log_thr, block_mask, static,
                      skip_mask=False)[0]


def _kernel_fwd(q, k, v, kv_lengths, log_thr, block_mask, static):
  outputs, lse, skip_mask = _run_forward(
      q, k, v, kv_lengths, log_thr, block_mask, static, skip_mask=True)
  return outputs, (q, k, v, kv_lengths, log_thr, block_mask, outputs[0], lse,
                   skip_mask)


def _kernel_bwd(static, residuals, cotangents):
  q, k, v, kv_lengths, log_thr, block_mask, out, lse, skip_mask = residuals
  opts = dict(static)
  # Kept blocks: selected and not skipped.
  keep = ~skip_mask if block_mask is None else block_mask & ~skip_mask
  common = dict(causal=opts["causal"], sm_scale=opts["sm_scale"],
                block_q=opts["block_q"], block_kv=opts["block_kv"])
  args = (q, k, v, out, lse, cotangents[0], kv_lengths, keep)
  hopper = opts["kernel"] == "pallas_mosaic"
  if hopper:
    from blasst_jax.kernels import pallas_mosaic_bwd  # pylint: disable=g-import-not-at-top
    hopper = pallas_mosaic_bwd.supports(q.shape[-1], q.dtype)
  if hopper:
    grads = pallas_mosaic_bwd.attention_backward(
        *args, interpret=opts.get("interpret"), **common)
  else:
    from blasst_jax.kernels import pallas_triton_bwd  # pylint: disable=g-import-not-at-top
    # (The Hopper forward at head_dim 256 falls back here.)
    grads = pallas_triton_bwd.attention_backward(
        *args, interpret=bool(opts.get("interpret")), **common)
  return grads + (None, jnp.zeros_like(log_thr), None)


_kernel_with_vjp.defvjp(_kernel_fwd, _kernel_bwd)
