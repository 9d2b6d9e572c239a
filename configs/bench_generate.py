"""Generation latency (TTFT / TPOT) of a pretrained LLM, dense vs skip.

experiments/bench_generate.py; model and text options as configs/eval_llm.py.
Variants: `default` (GPU: SmolLM2 at its 8k context, batch 1 and 8) and
`small` (CPU smoke: a tiny checkpoint, a 256-token context).

    python -m experiments.bench_generate --config=configs/bench_generate.py \
        --config.from_results=eval_llm_output/results.json
"""

import ml_collections

from configs import eval_llm


def get_config(variant: str = "default"):
  parts = [p for p in variant.split(",") if p and p != "default"]
  if set(parts) - {"small"}:
    raise ValueError(f"Unknown variant {variant!r}: use 'default' or "
                     "'small'.")
  base = eval_llm.get_config(variant)
  c = ml_collections.ConfigDict()
  for key in ("model_path", "bos_token", "dtype", "implementation",
              "block_q", "block_kv", "seed", "text"):
    c[key] = base[key]
  c.output_dir = "bench_generate_output"
  c.output_name = ""               # "": generate_<device>.{json,png}
  c.context = 8192                 # prompt + new tokens (SmolLM2's context)
  c.new_tokens = 128
  c.batch_sizes = (1, 8)
  # Operating points besides dense: (label, prefill λ, decode λ).
  c.points = ()
  # An eval_llm results.json: adds the largest-sparsity prefill and decode
  # λ within `max_delta_ppl_pct` at the context length nearest `context`.
  c.from_results = ""
  c.max_delta_ppl_pct = 1.0
  c.warmup = 1
  c.repeats = 5
  if "small" in parts:
    c.context = 256
    c.new_tokens = 8
    c.batch_sizes = (1, 2)
    c.points = (("λ=0.3", 0.3, 0.3),)
    c.warmup = 0
    c.repeats = 2
  return c
