"""Skip-softmax on a trained GPT: sparsity, perplexity, passkey retrieval.

experiments/eval_sparsity.py reads a train_lm run (`workdir`, e.g. one of
configs/lm_small.py) and the held-out documents of its text dataset.

Variants (comma-separated): `default` (GPU: 1k-8k, the model of the run in
`workdir`) and `small` (CPU tests: a random-init tiny model, reference
implementation, seconds).

    python -m experiments.eval_sparsity --config=configs/eval_sparsity.py \
        --config.workdir=lm_small_output
    python -m experiments.eval_sparsity --config=configs/eval_sparsity.py \
        --config.random_init=True          # no checkpoint: a smoke run
    python -m experiments.eval_sparsity --config=configs/eval_sparsity.py \
        --config.workdir=lm_finetune_output    # finetune vs dense control
    python -m experiments.eval_sparsity --config=configs/eval_sparsity.py \
        --config.compare_workdirs="('a=RUN_A', 'b=RUN_B')"
"""

import ml_collections

from configs import common
from experiments import repo_path


def get_config(variant: str = "default"):
  _, small = common.parse_variant(variant)
  c = ml_collections.ConfigDict()
  c.workdir = "lm_small_output"   # a train_lm run (log.json, checkpoints/)
  c.step = -1                     # checkpoint step; -1: the latest
  # True: evaluate a randomly initialised model built from `model` and
  # `train_seq_len` below (no checkpoint needed; for tests and smoke runs).
  c.random_init = False
  c.random_qk_scale = 1.0         # random_init: q/k weights times this
  c.seed = 0
  c.data_dir = ""                 # "": the run's data.data_dir
  c.output_dir = "eval_sparsity_output"   # benchmarks/results/lm_eval: committed
  # Several runs at equal λ: "label=path" train_lm workdirs (the first is
  # the reference), each evaluated with the same windows, passkeys and λ
  # into output_dir/<label>/, plus output_dir/comparison.{json,png}.
  c.compare_workdirs = ()
  # A `workdir` holding a finetune-mode run (dense/, finetune/,
  # dense_control/ of configs/lm_small.py:finetune) compares these runs.
  c.compare_finetune = True
  c.finetune_runs = ("dense_control", "finetune", "dense")
  # Comparing: add the λ each run trained with to `thresholds`.
  c.include_trained_threshold = True
  # None: the best implementation for the backend (Hopper kernel on
  # H100/H200, reference on CPU); a name overrides the run's.
  c.implementation = ml_collections.config_dict.placeholder(str)
  # Rows per attention tile; 0: the run's (64). Skipping needs every row of
  # a tile to agree, so fewer rows skip more: e.g. 16 with
  # implementation="pallas_triton" on GPU (the Hopper kernel runs 64).
  c.block_q = 0
  # Context lengths; beyond the trained length RoPE positions are
  # interpolated (scale = length / trained length).
  c.context_lengths = (1024, 2048, 4096, 8192)
  c.thresholds = (0.0, 1e-3, 1e-2, 1e-1, 3e-1, 5e-1, 7e-1, 9e-1, 9.7e-1)
  c.target_sparsities = (0.2, 0.4, 0.6)
  # Calibration on training-split windows (never held out).
  c.calibration_windows = 2
  c.heatmap_threshold = 1e-2      # λ of the per-head heatmap
  # Perplexity windows: "auto" (documents for length >= documents_from,
  # else the concatenated stream), "documents" or "stream".
  c.window_source = "auto"
  c.documents_from = 2048
  c.max_windows = 64              # per length (evenly spaced subset)
  c.tokens_per_batch = 32768      # batch = tokens_per_batch // length
  c.xattention = ml_collections.ConfigDict(dict(
      block_size=128, stride=8, thresholds=(0.9, 0.95),
      skip_thresholds=(1e-1, 5e-1)))   # XAttention + skip: every pair
  c.retrieval = ml_collections.ConfigDict(dict(
      enabled=True, depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=4,
      num_digits=5, seed=0))
  c.progress = True
  # Model of random_init (as configs/lm_small.py) and its trained length.
  c.train_seq_len = 4096
  c.model = ml_collections.ConfigDict(dict(
      num_layers=8, d_model=512, num_heads=8, num_kv_heads=2, mlp_ratio=4,
      tie_embeddings=True, position="rope", rope_base=10000.0,
      norm="rmsnorm", dtype="bfloat16", param_dtype="float32",
      implementation=None, block_q=64, block_kv=128))

  if small:            # CPU: seconds
    c.random_init = True
    c.random_qk_scale = 4.0       # peaked attention: something to skip
    c.data_dir = repo_path("data", "debian_en")
    c.implementation = "reference"
    c.context_lengths = (128, 256)
    c.train_seq_len = 128
    c.thresholds = (0.0, 1e-2, 1e-1, 3e-1, 6e-1)
    c.target_sparsities = (0.02,)
    c.calibration_windows = 1
    c.heatmap_threshold = 1e-1
    c.documents_from = 256
    c.max_windows = 4
    c.tokens_per_batch = 512
    c.xattention.update(block_size=16, stride=4, thresholds=(0.9,),
                        skip_thresholds=(1e-1,))
    c.retrieval.update(depths=(0.0, 0.5, 1.0), trials=2)
    c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                   dtype="float32", block_q=16, block_kv=16)
  return c
