"""`make demo`: λ sweep on synthetic sink + local-window attention (CPU)."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.batch = 1
  c.seq_len = 2048
  c.head_dim = 64
  # One head per sharpness: from diffuse (2) to very peaked (20).
  c.sharpness = (2.0, 6.0, 12.0, 20.0)
  c.window = 64
  c.sink_tokens = 4
  c.noise = 1.0
  c.causal = True
  c.block_q = 64
  c.block_kv = 64
  c.thresholds = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
  c.implementation = "reference"
  # Also run the Pallas kernel (interpret mode on CPU) at this λ and check
  # that it makes the oracle's decisions; <= 0 disables.
  c.kernel_check_threshold = 1e-2
  c.kernel_check_seq_len = 512
  c.heatmap_threshold = 1e-2
  c.seed = 0
  c.output_dir = "demo_output"
  return c
