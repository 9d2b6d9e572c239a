"""Sparsity statistics of a small Flax model (CPU, ~30 s).

    python -m experiments.analyze --config=configs/analyze.py
    python -m experiments.analyze --config=configs/analyze.py:small
    python -m experiments.analyze --config=configs/analyze.py \
        --config.seq_len=2048 --config.output_dir=/tmp/analysis
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """`experiments.lm.toy_model.SinkLocalTransformer` arguments: two layers (a
  SkipSelfAttention with GQA, an nnx.MultiHeadAttention), one sharpness per
  head, from diffuse (2) to peaked (24)."""
  return ml_collections.ConfigDict(dict(
      content_dim=32, num_heads=4, num_kv_heads=2, head_dim=32,
      sharpness=((2.0, 6.0, 12.0, 20.0), (4.0, 10.0, 16.0, 24.0)),
      window=64, sink_tokens=4, noise=1.0, block_q=64, block_kv=64))


def get_config(variant: str = "default"):
  c = ml_collections.ConfigDict()
  c.model = model_config()
  c.model_seed = 0
  c.batch = 2
  c.seq_len = 1024
  c.input_seed = 1
  c.thresholds = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
  # Sparsity against context length: prefixes of the inputs, at fixed λ and
  # at λ = c / length.
  c.context_lengths = (128, 256, 512, 1024)
  c.context_thresholds = (1e-3, 1e-2)
  c.context_scale_factors = (2.0, 20.0)
  c.heatmap_threshold = 1e-2     # λ of the skipped-block maps
  c.table_threshold = 1e-2       # λ of the error columns of the table
  c.output_dir = "analysis_output"
  if variant == "small":         # tests: seconds on CPU
    c.batch = 1
    c.seq_len = 256
    c.model.block_q = 32
    c.model.block_kv = 32
    # Both layers MHA: equal shapes share compiles.
    c.model.num_kv_heads = c.model.num_heads
    c.thresholds = (0.0, 1e-3, 1e-2, 1e-1)
    c.context_lengths = (128, 256)
    c.context_thresholds = (1e-2,)
    c.context_scale_factors = (2.0,)
  elif variant != "default":
    raise ValueError(f"Unknown variant {variant!r}: use 'default' or 'small'.")
  return c
