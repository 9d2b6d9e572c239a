"""Tiny Llama checkpoints written on the spot (for tests and examples).

    cfg = tiny_config()
    params = random_params(cfg, seed=0)            # Hugging Face names, f32
    write_gguf(path, cfg, params, types={"ffn_up": "Q4_1"})
    write_hf(folder, cfg, params, shards=2)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from blasst_jax.models.llama import LlamaConfig
from blasst_jax.models import weights

__all__ = ["byte_alphabet", "random_params", "tiny_config", "tiny_vocab",
           "write_gguf", "write_hf"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"))


def byte_alphabet() -> list[str]:
  """GPT-2's byte-level alphabet: the character of each byte 0..255."""
  keep = (list(range(ord("!"), ord("~") + 1))
          + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars = {b: chr(b) for b in keep}
  n = 0
  for b in range(256):
    if b not in chars:
      chars[b] = chr(256 + n)
      n += 1
  return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[tuple[str, str]], list[int]]:
  """(tokens, merges, GGUF token types) of a small byte-level BPE."""
  tokens = byte_alphabet() + ["".join(m) for m in MERGES] + list(
      SPECIAL_TOKENS)
  types = [1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(
      SPECIAL_TOKENS)
  return tokens, list(MERGES), types


def tiny_config(**overrides) -> LlamaConfig:
  """A 2-layer GQA Llama (hidden 64, 4 / 2 heads of 16, SwiGLU 256) over
  `tiny_vocab` (dims are multiples of the GGUF quantization blocks)."""
  fields = dict(vocab_size=len(tiny_vocab()[0]), hidden_size=64,
                intermediate_size=256, num_layers=2, num_heads=4,
                num_kv_heads=2, rms_norm_eps=1e-5, rope_base=10000.0,
                tie_embeddings=False, max_position=512, bos_id=256 + len(
                    MERGES), eos_id=256 + len(MERGES) + 2)
  fields.update(overrides)
  return LlamaConfig(**fields)


def random_params(cfg: LlamaConfig, *, seed: int = 0,
                  qk_scale: float = 2.0) -> dict[str, np.ndarray]:
  """Random f32 weights under Hugging Face names (norm weights near 1; Q/K
  scaled by `qk_scale` for attention that is sharp enough to skip)."""
  rng = np.random.default_rng(seed)
  h, d = cfg.hidden_size, cfg.head_dim
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h),
            "model.norm.weight": (h,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, h)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
        p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
        p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
        p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
        p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
    })
  params = {}
  for name, shape in shapes.items():
    if len(shape) == 1:
      params[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      scale = 1 / np.sqrt(shape[1])
      if "q_proj" in name or "k_proj" in name:
        scale *= qk_scale
      params[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
  return params


def write_hf(folder: str, cfg: LlamaConfig, params: Mapping[str, np.ndarray],
             *, shards: int = 1, dtype=np.float32) -> None:
  """A Hugging Face checkpoint folder: config.json + model*.safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f)
  names = sorted(params)
  for s in range(shards):
    part = {n: np.asarray(params[n]).astype(dtype) for n in names[s::shards]}
    save_file(part, os.path.join(
        folder, f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))


def write_gguf(path: str, cfg: LlamaConfig, params: Mapping[str, np.ndarray],
               *, types: Mapping[str, str] | None = None,
               pre: str = "smollm", raw: Mapping[str, tuple] | None = None,
               skip_fields: tuple[str, ...] = ()) -> None:
  """A llama.cpp-style GGUF file of Hugging Face-named f32 weights.

  Q/K rows are permuted as llama.cpp's converter does (`permute_qk`).

  Args:
    path: the file to write.
    cfg, params: the model.
    types: {GGUF tensor name part ("attn_q", "ffn_up", "token_embd"...):
      GGML type name} ("F32" default; "F16", "BF16", "Q8_0", "Q4_0",
      "Q4_1", "Q5_0"...: quantized with `gguf.quants.quantize`).
    pre: the `tokenizer.ggml.pre` value.
    raw: {GGUF tensor name: (uint8 bytes array, GGML type name)}: written as
      given, replacing the quantized weight (for types that `gguf` cannot
      quantize, e.g. Q6_K).
    skip_fields: metadata keys to leave out (tests of error messages).
  """
  import gguf  # pylint: disable=g-import-not-at-top
  types = dict(types or {})
  raw = dict(raw or {})
  writer = gguf.GGUFWriter(path, "llama")
  fields = {
      "llama.block_count": (writer.add_block_count, cfg.num_layers),
      "llama.context_length": (writer.add_context_length, cfg.max_position),
      "llama.embedding_length": (writer.add_embedding_length,
                                 cfg.hidden_size),
      "llama.feed_forward_length": (writer.add_feed_forward_length,
                                    cfg.intermediate_size),
      "llama.attention.head_count": (writer.add_head_count, cfg.num_heads),
      "llama.attention.head_count_kv": (writer.add_head_count_kv,
                                        cfg.num_kv_heads),
      "llama.rope.freq_base": (writer.add_rope_freq_base, cfg.rope_base),
      "llama.attention.layer_norm_rms_epsilon": (
          writer.add_layer_norm_rms_eps, cfg.rms_norm_eps),
      "llama.rope.dimension_count": (writer.add_rope_dimension_count,
                                     cfg.head_dim),
  }
  for key, (add, value) in fields.items():
    if key not in skip_fields:
      add(value)
  tokens, merges, token_types = tiny_vocab()
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(token_types)
  writer.add_token_merges([" ".join(m) for m in merges])
  writer.add_bos_token_id(cfg.bos_id)
  writer.add_eos_token_id(cfg.eos_id)
  inverse = {v: k for k, v in weights.GGUF_NAMES.items()}
  for name, value in params.items():
    value = np.asarray(value, np.float32)
    layer = None
    if name.startswith("model.layers."):
      layer = name.split(".")[2]
      template = name.replace(f"layers.{layer}.", "layers.{i}.", 1)
      gguf_name = inverse[template].format(i=layer)
    else:
      gguf_name = inverse[name]
    if name.endswith("q_proj.weight"):
      value = weights.permute_qk(value, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      value = weights.permute_qk(value, cfg.num_kv_heads)
    if gguf_name in raw:
      data, kind = raw[gguf_name]
      writer.add_tensor(gguf_name, data, raw_shape=data.shape,
                        raw_dtype=gguf.GGMLQuantizationType[kind])
      continue
    part = gguf_name.split(".")[-2]
    kind = gguf.GGMLQuantizationType[types.get(part, "F32")]
    if kind == gguf.GGMLQuantizationType.F32:
      writer.add_tensor(gguf_name, value)
    elif kind == gguf.GGMLQuantizationType.F16:
      writer.add_tensor(gguf_name, value.astype(np.float16))
    else:
      data = gguf.quants.quantize(value, kind)
      writer.add_tensor(gguf_name, data, raw_shape=data.shape,
                        raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
