"""Train a small GPT on synthetic tokens, dense or with skip-softmax.

Variants (comma-separated): a mode, `dense` (default), `sparse` or
`finetune`, and optionally `small` (CPU, seconds).

    python -m experiments.train_lm --config=configs/train_lm.py
    python -m experiments.train_lm --config=configs/train_lm.py:sparse
    python -m experiments.train_lm --config=configs/train_lm.py:finetune,small
    python -m experiments.train_lm --config=configs/train_lm.py:finetune \
        --config.init_from=/tmp/train_lm/dense --config.workdir=/tmp/ft

`finetune` without `init_from` trains dense for `dense_steps` into
WORKDIR/dense (with `optim`), fine-tunes sparsely for `steps` into
WORKDIR/finetune and runs the dense control into WORKDIR/dense_control
(both with `finetune_optim` over `optim`), and plots them into
WORKDIR/dense_vs_finetune.png.
"""

import ml_collections

from configs import common

MODES = ("dense", "sparse", "finetune")


def new_config(variant: str, workdir: str):
  """(c, small): a train_lm config's first fields (mode, workdir, init_from,
  seed) and whether `variant` asks for the CPU size of the tests."""
  mode, small = common.parse_variant(variant, MODES)
  c = ml_collections.ConfigDict()
  c.mode = mode
  c.workdir = workdir
  c.init_from = ""          # checkpoint dir to take the params from
  c.seed = 0                # model init
  return c, small


def add_training(c, *, warmup_steps: int, eval_every: int) -> None:
  """The optimiser, skip-softmax, evaluation and checkpoint fields of a
  train_lm config (this one and configs/lm_small.py), after its `steps`."""
  c.optim = ml_collections.ConfigDict(dict(
      peak_lr=1e-3, end_lr_ratio=0.1, warmup_steps=warmup_steps,
      weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0))
  # Skip-softmax during sparse / finetune training: exactly one of these.
  c.sparsity = ml_collections.ConfigDict(dict(
      threshold=0.0, scale_factor=0.0, target_sparsity=0.0))
  c.eval_every = eval_every
  c.eval_batches = 4
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  c.progress = True
  if c.mode in ("sparse", "finetune"):
    c.sparsity.target_sparsity = 0.3
  if c.mode == "finetune":
    c.steps = 500
    # The fine-tune (and its dense control) overrides these `optim` fields;
    # the dense phase trains with `optim` itself.
    c.finetune_optim = ml_collections.ConfigDict(dict(peak_lr=3e-4,
                                                      warmup_steps=20))


def shrink_training(c, *, steps: int, warmup_steps: int,
                    finetune_steps: int) -> None:
  """`add_training`'s fields at the CPU size of the tests (seconds)."""
  c.steps = steps
  c.dense_steps = steps
  c.optim.update(peak_lr=3e-3, warmup_steps=warmup_steps)
  c.eval_every = 10
  c.eval_batches = 2
  c.checkpoint_every = 10
  if c.mode in ("sparse", "finetune"):
    # A fixed λ: calibration is exercised by the GPU configs.
    c.sparsity.update(threshold=0.9, target_sparsity=0.0)
  if c.mode == "finetune":
    c.steps = finetune_steps
    c.finetune_optim.update(peak_lr=1e-3, warmup_steps=4)


def get_config(variant: str = "dense"):
  c, small = new_config(variant, "train_lm_output")
  # A bos token and a prompt recalled from the start of the context give
  # heads a reason to look at (and park on) the first block.
  c.data = ml_collections.ConfigDict(dict(
      vocab_size=512, seed=0, branching=4, copy_prob=0.01, copy_len=32,
      min_copy_distance=64, bos=True, prompt_len=48, recall_prob=0.005))
  # GPU-sized: ~25M params, 8 x 2048 tokens per step.
  c.model = ml_collections.ConfigDict(dict(
      num_layers=6, d_model=512, num_heads=8, num_kv_heads=2, mlp_ratio=4,
      tie_embeddings=True, dtype="bfloat16", param_dtype="float32",
      # None: the Hopper kernels on H100/H200 (forward and backward), the
      # Triton ones on other GPUs; 64 x 128 tiles are the Hopper kernel's.
      implementation=None, block_q=64, block_kv=128))
  c.seq_len = 2048
  c.batch_size = 8
  c.steps = 1500
  c.dense_steps = 1500      # finetune mode without init_from: dense phase
  add_training(c, warmup_steps=100, eval_every=100)

  if small:                 # tests: seconds on CPU
    c.data.update(vocab_size=64, copy_len=8, min_copy_distance=16,
                  copy_prob=0.02, prompt_len=8, recall_prob=0.02)
    c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                   dtype="float32", block_q=16, block_kv=16,
                   implementation=None)
    c.seq_len = 128
    c.batch_size = 8
    shrink_training(c, steps=30, warmup_steps=5, finetune_steps=20)
  return c
