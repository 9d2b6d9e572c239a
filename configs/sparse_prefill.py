"""Sparse prefill: dense, skip-softmax (BLASST), XAttention block selection,
and both combined, on one input.

    python -m experiments.sparse_prefill --config=configs/sparse_prefill.py:combined
    python -m experiments.sparse_prefill --config=configs/sparse_prefill.py:all
    python -m experiments.sparse_prefill --config=configs/sparse_prefill.py:all,small

    python -m experiments.sparse_prefill --config=configs/sparse_prefill.py:frontier

Variant: dense | blasst | xattention | combined | all | frontier (sweeps of
λ, τ and (τ, λ) pairs for the error/speed frontier), then optionally ",small"
(CPU-sized).
"""

import ml_collections

from configs import common

METHODS = {
    # name: (XAttention τ or None, skip-softmax λ)
    "dense": (None, 0.0),
    "blasst": (None, 1e-3),
    "xattention": (0.9, 0.0),
    "combined": (0.999, 0.1),
}
FRONTIER = (
    [("dense", None, 0.0)]
    + [(f"blasst λ={lam:g}", None, lam) for lam in (3e-4, 1e-3, 1e-2, 1e-1)]
    + [(f"xattention τ={tau:g}", tau, 0.0) for tau in (0.9, 0.95, 0.99, 0.999)]
    + [(f"combined τ={tau:g} λ={lam:g}", tau, lam)
       for tau in (0.95, 0.99, 0.999) for lam in (1e-3, 1e-2, 1e-1)])


def get_config(variant: str = "all"):
  names, *size = variant.split(",")
  size = size[0] if size else "h100"
  if names == "all":
    chosen = [(n, *METHODS[n]) for n in METHODS]
  elif names == "frontier":
    chosen = FRONTIER
  elif names in METHODS:
    chosen = [(names, *METHODS[names])]
  else:
    raise ValueError(f"Unknown method {names!r}: use one of {list(METHODS)}, "
                     "'all' or 'frontier'.")
  if size not in ("h100", "small"):
    raise ValueError(f"Unknown size {size!r}: use 'h100' or 'small'.")
  c = ml_collections.ConfigDict()
  c.methods = [ml_collections.ConfigDict(dict(
      name=n, xattention_threshold=tau, skip_threshold=lam))
               for n, tau, lam in chosen]
  # (batch, seq_len, q_heads, kv_heads, head_dim); q_len = kv_len.
  c.shape = (1, 32768, 32, 8, 128)
  c.dtype = "bfloat16"
  c.causal = True
  c.block_size = 128          # XAttention blocks
  # Attention kernel: None = bj.attention's default (Hopper: "pallas_mosaic",
  # mask blocks cut into 64 x 128 tiles), or "pallas_triton" (128 x 128).
  c.implementation = None
  c.stride = 16
  c.keep_sink = True
  c.keep_diagonal = True
  # Score pattern (blasst_jax.patterns.sink_local_qkv): one sharpness per
  # head group, from diffuse to peaked.
  c.pattern = ml_collections.ConfigDict(dict(
      sharpness=(2.0, 6.0, 10.0, 14.0, 18.0, 22.0, 26.0, 30.0),
      sink_tokens=4, window=256, noise=1.0))
  # GPU: the mask estimate timed alone per stride, XLA and the fused kernel
  # with each (block_rows, block_cols, num_warps, num_stages).
  c.estimate = ml_collections.ConfigDict(dict(
      strides=(8, 16),
      kernel_configs=((64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3),
                      (32, 128, 4, 3), (64, 64, 4, 3))))
  c.warmup = 2
  c.iters = 10
  c.seed = 0
  common.result_files(
      c, "xattention_frontier" if names == "frontier" else "xattention",
      "sparse_prefill_output")
  if size == "small":
    c.shape = (1, 1024, 8, 2, 64)
    c.dtype = "float32"
    c.block_size = 64
    c.stride = 8
    c.pattern.window = 32
    c.warmup, c.iters = 0, 1
    c.output_dir = "/tmp/blasst_sparse_prefill"
    c.output_name = c.stem
  return c
