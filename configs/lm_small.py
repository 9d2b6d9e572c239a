"""Train a small RoPE GPT on real English text (experiments/train_lm.py).

Data: `python -m experiments.prepare_text` first (writes data/debian_en/,
~2.5 min: English documentation of 17 Debian main packages (Python, Linux
kernel, Perl, PostgreSQL, Django, SQLite, Git, man-pages, ...), byte-level
BPE with 8192 tokens, ~20.4 M training tokens in 7,533 documents, ~1.2 M
held-out tokens in 449 documents; `--corpus=pydoc` gives the earlier
2.9 M-token corpus in data/pydoc/). Evaluation reads the held-out documents
only.

Passkey augmentation (`data.passkey_prob`, default 0.1): one training
sequence in ten carries the passkey-retrieval format that
experiments/eval_sparsity.py scores (the same needle / question template,
`text_data.PASSKEY_*`, a random 5-digit key at a random depth, question and
answer at the end; keys drawn from a stream of their own). Retrieval
accuracy then measures a trained skill, not an emergent one; set
`--config.data.passkey_prob=0` to train on plain text only.
`data.passkey_answer_weight` > 1 up-weights the answer's targets in the
loss (they are 3 of 4096 tokens of a row).

Variants (comma-separated): a mode, `dense` (default), `sparse` or
`finetune` (as in configs/train_lm.py), and optionally `small` (CPU,
seconds; point data.data_dir at a small dataset). `finetune` without
`init_from` trains dense for `dense_steps` with `optim`, then fine-tunes
with skip-softmax for `steps` and runs the dense control, both from that
checkpoint with `finetune_optim` (peak_lr 3e-4, 20 warmup steps) over
`optim`.

    python -m experiments.prepare_text && python -m experiments.train_lm \
        --config=configs/lm_small.py
    python -m experiments.train_lm --config=configs/lm_small.py \
        --config.data.passkey_prob=0 --config.workdir=lm_small_plain
    python -m experiments.train_lm --config=configs/lm_small.py:finetune \
        --config.init_from=lm_small_output --config.workdir=/tmp/ft

GPU size: 8 layers, d_model 512, 8 query heads / 2 KV heads of 64 (GQA),
RMSNorm, RoPE, tied 8192-token embedding: 26.2 M parameters (22.0 M
outside the embedding). 16 x 4096 = 65,536 tokens per step; 1000 steps =
65.5 M tokens, ~3.2 passes over the training split (about 80 s at ~830 k
tokens/s on one H100). The earlier corpus over-fitted after ~13 passes;
the evaluations every 50 steps show whether this one does.
"""

import ml_collections

from configs import train_lm
from experiments import repo_path


def get_config(variant: str = "dense"):
  c, small = train_lm.new_config(variant, "lm_small_output")
  # Random 4097-token crops of the training stream (documents open with
  # <|doc|>); the vocabulary is the tokenizer's.
  # passkey_prob: share of training sequences in the passkey-retrieval
  # format of the evaluation (0: plain text only); passkey_answer_weight:
  # loss weight of the answer's targets (1: an ordinary token).
  c.data = ml_collections.ConfigDict(dict(
      kind="text", data_dir=repo_path("data", "debian_en"), seed=0, start="random",
      passkey_prob=0.1, passkey_digits=5, passkey_answer_weight=1.0))
  c.model = ml_collections.ConfigDict(dict(
      num_layers=8, d_model=512, num_heads=8, num_kv_heads=2, mlp_ratio=4,
      tie_embeddings=True, position="rope", rope_base=10000.0,
      norm="rmsnorm", dtype="bfloat16", param_dtype="float32",
      # None: the Hopper kernels on H100/H200 (forward and backward).
      implementation=None, block_q=64, block_kv=128))
  c.seq_len = 4096
  c.batch_size = 16
  c.steps = 1000            # ~3.2 passes over data/debian_en's train split
  c.dense_steps = 1000      # finetune mode without init_from: dense phase
  # Evaluation: 4 batches, 4 x 65k tokens of held-out crops.
  train_lm.add_training(c, warmup_steps=50, eval_every=50)

  if small:                 # tests: seconds on CPU
    c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                   dtype="float32", block_q=16, block_kv=16)
    c.seq_len = 128
    c.batch_size = 4
    train_lm.shrink_training(c, steps=20, warmup_steps=4, finetune_steps=10)
  return c
