r"""Skip-softmax statistics of a small Flax model, per layer and head.

Runs `experiments.lm.toy_model.SinkLocalTransformer` (attention heads with
planted sink + local-window scores, one sharpness per head) on random
tokens, captures every attention layer's q/k/v, and measures over a λ sweep:
block sparsity (overall, per q tile, against context length), dropped
softmax mass, output error against dense attention and the block-gap
distribution. Prints a table per layer and head; writes `analysis.json` and
PNG figures into `--config.output_dir`.

    python -m experiments.analyze --config=configs/analyze.py
    python -m experiments.analyze --config=configs/analyze.py:small
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from flax import nnx
import jax
from ml_collections import config_flags

from experiments import config_file
from blasst_jax import analysis
from blasst_jax import plotting
from blasst_jax import testing
from experiments.lm import toy_model

_CONFIG = config_flags.DEFINE_config_file("config", config_file("analyze"))


def build_model(cfg) -> toy_model.SinkLocalTransformer:
  return toy_model.SinkLocalTransformer(**cfg.model.to_dict(),
                                        rngs=nnx.Rngs(cfg.model_seed))


def main(argv):
  del argv
  cfg = _CONFIG.value
  t0 = time.time()
  device = testing.announce_device()[0]
  model = build_model(cfg)
  tokens = model.token_embeddings(jax.random.PRNGKey(cfg.input_seed),
                                  batch=cfg.batch, seq_len=cfg.seq_len)
  print(f"model: {len(model.layers)} attention layers, "
        f"{cfg.model.num_heads} heads, head_dim {cfg.model.head_dim}; input "
        f"batch {cfg.batch} x {cfg.seq_len} tokens; blocks "
        f"{cfg.model.block_q}x{cfg.model.block_kv}", flush=True)
  report = analysis.analyze_model(
      model, tokens, thresholds=tuple(cfg.thresholds),
      context_lengths=tuple(cfg.context_lengths),
      context_thresholds=tuple(cfg.context_thresholds),
      context_scale_factors=tuple(cfg.context_scale_factors),
      heatmap_threshold=cfg.heatmap_threshold, progress=True)
  print("\nBlock sparsity per layer and head (skipped / visited blocks); "
        "error columns against dense attention:\n")
  print(report.table(cfg.table_threshold))

  os.makedirs(cfg.output_dir, exist_ok=True)
  output = os.path.join(cfg.output_dir, "analysis.json")
  with open(output, "w") as f:
    json.dump(dict(device, config=cfg.to_dict(), **report.to_dict()), f,
              indent=1)
  paths = plotting.plot_report(report, cfg.output_dir)
  print(f"report written to {os.path.abspath(output)}")
  for path in paths:
    print(f"plot written to {os.path.abspath(path)}")
  print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
