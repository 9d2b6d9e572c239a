"""Context-parallel scaling: 128k-512k prefill and decode on 1..n GPUs.

    python -m experiments.bench_multigpu --config=configs/bench_multigpu.py
    python -m experiments.bench_multigpu --config=configs/bench_multigpu.py:smoke
"""

import ml_collections

from configs import common


def get_config(variant: str = "h100"):
  c = ml_collections.ConfigDict()
  # Device counts of the measured runs (those above the GPUs present are
  # left out) and of the modeled ones (the slowest device's work of an
  # n-device run, timed alone on one device; no communication).
  c.device_counts = [1, 2, 4, 8]
  c.modeled_device_counts = [2, 4, 8]
  c.dtype = "bfloat16"
  # Comma-separated; one phase per command keeps each run short
  # (--config.phases=decode --config.output_name=...).
  c.phases = "prefill,decode"
  # Prefill: (batch, seq_len, q_heads, kv_heads, head_dim), causal.
  c.prefill_shapes = [(1, 131072, 8, 8, 128), (1, 262144, 8, 8, 128),
                      (1, 524288, 8, 8, 128)]
  c.prefill_thresholds = [0.0, 1e-2]
  # Context-parallel variants: (share_max, load_balance); share_max chains
  # the running max through the kernel (`initial_max`).
  c.prefill_variants = [(False, False), (False, True), (True, False),
                        (True, True)]
  # Prefill tiles (None: the kernel's defaults); a context chunk must hold
  # whole tiles for the shared max to give one device's decisions.
  c.prefill_block_q = ml_collections.FieldReference(None, field_type=int)
  c.prefill_block_kv = ml_collections.FieldReference(None, field_type=int)
  # Decode: (batch, q_heads, kv_heads, max_len, head_dim), full caches.
  c.decode_shapes = [(8, 32, 8, 131072, 128), (8, 32, 8, 262144, 128),
                     (8, 32, 8, 524288, 128)]
  c.decode_thresholds = [0.0, 1e-3]
  c.decode_max_mode = "anchored"
  c.block_kv = 128              # decode block
  c.pattern = ml_collections.ConfigDict(dict(
      sharpness=(10.0, 14.0, 18.0, 22.0), sink_tokens=4, window=64,
      noise=1.0))
  c.implementation = ml_collections.FieldReference(None, field_type=str)
  c.interpret = False
  c.warmup = 1
  c.iters = 3             # prefill: ~0.1-1 s per call
  # Decode calls take ~1 ms: more samples, 5 calls queued per sample.
  c.decode_warmup = 3
  c.decode_iters = 15
  c.decode_reps = 5
  c.seed = 0
  common.result_files(c, "multigpu", "bench_multigpu_output")
  if variant == "smoke":   # Seconds on 8 CPU devices: checks the script.
    c.device_counts = [1, 2]
    c.modeled_device_counts = [4]
    c.dtype = "float32"
    c.prefill_shapes = [(1, 256, 2, 1, 32)]
    c.decode_shapes = [(2, 4, 2, 256, 32)]
    c.prefill_thresholds = [0.0, 5e-2]
    # Each of share_max and load_balance on and off; every pair of them is
    # checked against one device in tests/test_sharding.py.
    c.prefill_variants = [(False, False), (True, True)]
    c.decode_thresholds = [0.0, 1e-2]
    c.block_kv = 32
    c.prefill_block_q = c.prefill_block_kv = 16
    # The oracle: the script's sharding, chunking and timing paths without
    # the interpreter's cost (tests/test_sharding.py runs the kernels).
    c.implementation = "reference"
    c.interpret = False
    c.warmup, c.iters = 0, 1
    c.decode_warmup, c.decode_iters, c.decode_reps = 0, 1, 1
    c.output_dir = "/tmp/blasst_bench_smoke"
    c.output_name = "multigpu"
  elif variant != "h100":
    raise ValueError(f"Unknown variant {variant!r}: use 'h100' or 'smoke'.")
  return c
