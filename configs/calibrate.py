"""Calibrate threshold scale factors for a target sparsity (CPU, ~1 min).

Calibration and held-out inputs are different random token sequences fed
through the same small Flax model (`configs/analyze.py`'s).

    python -m experiments.calibrate --config=configs/calibrate.py
    python -m experiments.calibrate --config=configs/calibrate.py:small
    python -m experiments.calibrate --config=configs/calibrate.py \
        --config.target_sparsity.prefill=0.2
"""

import ml_collections


def get_config(variant: str = "default"):
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      content_dim=32, num_heads=4, num_kv_heads=2, head_dim=32,
      sharpness=((2.0, 6.0, 12.0, 20.0), (4.0, 10.0, 16.0, 24.0)),
      window=64, sink_tokens=4, noise=1.0, block_q=64, block_kv=64))
  c.model_seed = 0
  c.seq_len = 1024
  c.calibration_batch = 4
  c.calibration_seed = 1
  c.held_out_batch = 4
  c.held_out_seed = 2
  # Decode steps replayed from each prefill: the cache lengths.
  c.decode_cache_lengths = (256, 512, 768, 1024)
  c.decode_block_kv = 64
  c.decode_num_splits = 0        # 0: decode_attention's default
  c.decode_max_mode = "anchored"
  c.target_sparsity = ml_collections.ConfigDict(dict(prefill=0.3,
                                                     decode=0.6))
  c.tolerance = 0.03             # ±3 points on held-out inputs
  # Swept scale factors: geomspace(min, max, num).
  c.scale_factor_min = 1e-4
  c.scale_factor_max = 1e4
  c.num_scale_factors = 65
  c.fit_window = 0.05
  c.output_dir = "calibration_output"
  if variant == "small":         # tests: seconds on CPU
    c.seq_len = 256
    c.calibration_batch = 2
    c.held_out_batch = 2
    c.model.block_q = 32
    c.model.block_kv = 32
    # Both layers MHA: equal shapes share compiles.
    c.model.num_kv_heads = c.model.num_heads
    c.decode_cache_lengths = (128, 192, 256)
    c.decode_block_kv = 32
    c.num_scale_factors = 33
    c.target_sparsity.prefill = 0.2
    c.target_sparsity.decode = 0.4
  elif variant != "default":
    raise ValueError(f"Unknown variant {variant!r}: use 'default' or 'small'.")
  return c
