"""Forward + backward speed against cuDNN.

    python -m experiments.bench_backward --config=configs/bench_backward.py
    python -m experiments.bench_backward --config=configs/bench_backward.py:small
"""

import ml_collections

from configs import common


def get_config(variant: str = "h100"):
  if variant not in ("h100", "small"):
    raise ValueError(f"Unknown variant {variant!r}: use 'h100' or 'small'.")
  c = ml_collections.ConfigDict()
  # (batch, seq_len, q_heads, kv_heads, head_dim), causal, q_len = kv_len.
  c.shapes = ((4, 8192, 16, 16, 128), (2, 16384, 16, 16, 128),
              (1, 32768, 16, 16, 128), (4, 8192, 16, 16, 64))
  c.dtype = "bfloat16"
  c.causal = True
  c.thresholds = (0.0, 1e-3, 1e-2)
  # Each forward records the blocks it skipped; its backward walks the rest.
  c.implementations = ("pallas_mosaic", "pallas_triton")
  # Tiles per implementation (None: its defaults, 64 x 128 for Mosaic).
  c.block_sizes = ml_collections.ConfigDict(dict(
      pallas_mosaic=(None, None), pallas_triton=(128, 64)))
  c.pattern = ml_collections.ConfigDict(dict(
      sharpness=(2.0, 6.0, 10.0, 14.0, 18.0, 22.0, 26.0, 30.0),
      sink_tokens=4, window=256, noise=1.0))
  c.warmup = 2
  c.iters = 10
  c.seed = 0
  common.result_files(c, "backward", "bench_backward_output")
  if variant == "small":
    c.shapes = ((1, 256, 4, 2, 32),)
    c.dtype = "float32"
    c.implementations = ("pallas_triton",)
    c.block_sizes.pallas_triton = (64, 32)
    c.pattern.window = 16
    c.warmup, c.iters = 0, 1
    c.output_dir = "/tmp/blasst_bench_backward"
    c.output_name = "backward"
  return c
