r"""Skip-softmax on a trained GPT: sparsity against perplexity and retrieval.

For the model of a train_lm run (`--config.workdir`, or a random-init model
with `--config.random_init=True`) and the held-out documents of its text
dataset, at every context length of the config (RoPE positions interpolated
past the trained length):

  * methods: dense (λ = 0), each λ of `thresholds`, each target sparsity
    (λ calibrated on training-split text at that length,
    `lm_eval.calibrate_thresholds`), XAttention block selection alone (each
    τ) and XAttention + skip-softmax (each τ with each `skip_thresholds` λ);
  * per method: block sparsity per layer and per head, pooled; held-out
    perplexity over non-overlapping windows and Δ perplexity vs dense (%);
    passkey retrieval ("The pass key is 73914. Remember it." at depths
    0-100 % of held-out text; greedy exact match and mean log-prob of the
    key's tokens) over several random keys per depth.

Writes results.json and PNGs (trade-off, sparsity by layer, per-head
heatmap, sparsity vs context length, retrieval heatmaps) into
`--config.output_dir`, and prints a summary table with the answers to: at
what sparsity does perplexity move by 1 %, does retrieval hold there, how
does sparsity grow with context, does XAttention + skip keep accuracy.

Several runs at equal λ: `--config.compare_workdirs` ("label=path", the
first the reference), or a `--config.workdir` that holds a finetune-mode
train_lm run (configs/lm_small.py:finetune: dense/, finetune/,
dense_control/; `--config.finetune_runs` picks them). Each run is evaluated
with the same windows, passkeys and λ sweep (plus the λ a run trained
with) into output_dir/<label>/, and output_dir/comparison.json and
comparison.png put sparsity, Δ perplexity (vs each run's dense and vs the
reference's dense) and retrieval against λ side by side.

    python -m experiments.eval_sparsity --config=configs/eval_sparsity.py \
        --config.workdir=lm_small_output
    python -m experiments.eval_sparsity --config=configs/eval_sparsity.py:small
    python -m experiments.eval_sparsity --config=configs/eval_sparsity.py \
        --config.workdir=lm_finetune_output     # finetune vs dense_control
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import logging
from ml_collections import config_flags

from experiments import config_file
from experiments.lm import lm_eval
from blasst_jax import testing

_CONFIG = config_flags.DEFINE_config_file("config", config_file("eval_sparsity"))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  t_start = time.time()
  device = testing.announce_device()[0]
  runs = lm_eval.comparison_runs(cfg)
  if runs is None:
    results = lm_eval.evaluate_run(cfg, output_dir=cfg.output_dir,
                                   device=device)
    print(lm_eval.format_summary(results))
    path = os.path.join(cfg.output_dir, "results.json")
    print(f"results written to {os.path.abspath(path)}; plots: "
          + ", ".join(results["plots"]))
  else:
    print("comparing " + ", ".join(f"{label}={path}" for label, path in runs),
          flush=True)
    comparison = lm_eval.evaluate_and_compare(cfg, runs, cfg.output_dir,
                                              device=device)
    print(lm_eval.format_comparison(comparison))
    print(f"comparison written to "
          f"{os.path.abspath(os.path.join(cfg.output_dir, 'comparison.json'))}"
          f"; plots: {', '.join(comparison['plots'])}; per run: "
          + ", ".join(comparison["outputs"].values()))
  print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
  app.run(main)
