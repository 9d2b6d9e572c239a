"""Prefill benchmark: Pallas Triton skip-softmax kernel against cuDNN and XLA.

    python experiments/bench_prefill.py --config=configs/bench_prefill.py
    python experiments/bench_prefill.py --config=configs/bench_prefill.py:smoke
"""

import ml_collections


def get_config(variant: str = "h100"):
  c = ml_collections.ConfigDict()
  # Problems: (batch, seq_len, q_heads, kv_heads, head_dim); q_len = kv_len.
  # batch * heads * q_len / 128 >= 8192 tiles: every shape fills 132 SMs.
  c.shapes = [(8, 4096, 16, 16, 128), (4, 8192, 16, 16, 128),
              (2, 16384, 16, 16, 128), (1, 32768, 16, 16, 128),
              (1, 65536, 16, 16, 128)]
  c.causal = [False, True]
  c.dtype = "bfloat16"
  # λ sweep for the skip rows; the sink/local pattern gives ~50-75% block
  # sparsity in the upper half of this range; 0.9 shows the floor (nearly
  # every block skipped: q·kᵀ and the K/V stream remain).
  c.thresholds = [1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 0.9]
  c.impls = ["cudnn", "xla", "pallas_triton", "pallas_mosaic"]
  c.xla_max_seq_len = 8192          # XLA materializes [B, H, S, S] scores
  c.block_q = 128
  c.block_kv = 64
  c.num_warps = 4
  c.num_stages = 3
  c.load_v_in_branch = True
  # The Hopper kernel's own tiles (block_q = rows per compute warpgroup).
  c.mosaic_block_q = 64
  c.mosaic_block_kv = 128
  c.mosaic_num_stages = 2
  # Score pattern (blasst_jax.patterns.sink_local_qkv).
  c.pattern = ml_collections.ConfigDict(dict(
      sharpness=(10.0, 14.0, 18.0, 22.0), sink_tokens=4, window=64,
      noise=1.0))
  c.warmup = 3
  c.iters = 20
  c.seed = 0
  # Kernel tuning sweep at one shape: (block_q, block_kv, num_warps,
  # num_stages, load_v_in_branch), dense and at thresholds[2].
  c.run_tuning = True
  c.tuning_shape = (4, 8192, 16, 16, 128)
  c.tuning = [(128, 64, 4, 3, True), (128, 64, 4, 3, False),
              (128, 64, 4, 4, True), (128, 64, 8, 3, True),
              (128, 128, 4, 3, True), (128, 128, 8, 2, True),
              (128, 32, 4, 3, True), (64, 64, 4, 3, True)]
  # Correctness against the oracle and cuDNN on a slice that fits the oracle.
  c.check_shape = (1, 4096, 4, 4, 128)
  # Results go to output_dir/<output_name or prefill_<device>>.json (+ .png);
  # --config.output_dir=benchmarks/results refreshes the committed ones.
  c.output_dir = "bench_prefill_output"
  c.output_name = ""
  c.stem = "prefill"
  if variant == "smoke":   # Seconds on a CPU: checks the script, not speed.
    c.shapes = [(1, 256, 2, 1, 32)]
    c.thresholds = [1e-2]
    c.impls = ["xla", "reference", "pallas_triton"]
    c.block_q = c.block_kv = 64
    c.tuning = []
    c.check_shape = (1, 128, 2, 1, 32)
    c.warmup, c.iters = 1, 2
    c.output_dir = "/tmp/blasst_bench_smoke"
    c.output_name = "prefill"
  elif variant != "h100":
    raise ValueError(f"Unknown variant {variant!r}: use 'h100' or 'smoke'.")
  return c
