"""experiments/eval_sparsity.py end to end (CPU) and blasst_jax.lm_eval."""

import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blasst_jax import gpt
from blasst_jax import lm_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharTokenizer:
  """One token per character (id = code point + 1); BOS is 0."""

  bos_id = 0
  vocab_size = 256

  def encode(self, text):
    return [ord(c) + 1 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 1) for i in ids if i)


def _filler(n=5000, seed=0):
  return np.random.default_rng(seed).integers(200, 250, n).astype(np.int32)


# ------------------------------------------------------------------ passkey
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_needle_at_depth_and_question_at_end(depth):
  tok = CharTokenizer()
  filler = _filler()
  s = lm_eval.build_passkey(tok, filler, length=300, depth=depth,
                            key="73914")
  assert s.tokens.shape == (301,) and s.tokens.dtype == np.int32
  assert s.tokens[0] == tok.bos_id
  needle = tok.encode(lm_eval.NEEDLE.format(key="73914"))
  question = tok.encode(lm_eval.QUESTION)
  answer = tok.encode(" 73914")
  n_filler = 301 - 1 - len(needle) - len(question) - len(answer)
  assert s.needle_start == 1 + round(depth * n_filler)
  assert s.needle_length == len(needle)
  assert s.tokens[s.needle_start:s.needle_start + len(needle)].tolist() \
      == needle
  # Real filler before and after the needle, in order.
  rest = np.concatenate([s.tokens[1:s.needle_start],
                         s.tokens[s.needle_start + len(needle):
                                  301 - len(question) - len(answer)]])
  assert rest.tolist() == filler[:n_filler].tolist()
  end = tok.decode(s.tokens[-len(question) - len(answer):])
  assert end == "\nWhat is the pass key? The pass key is 73914"
  assert s.answer_start == 301 - len(answer)
  assert tok.decode(s.tokens[s.answer_start:]) == " 73914"


def test_passkey_samples_deterministic_per_seed():
  tok = CharTokenizer()
  kw = dict(length=256, depths=[0.0, 0.5, 1.0], trials=3)
  a = lm_eval.passkey_samples(tok, _filler(), seed=1, **kw)
  b = lm_eval.passkey_samples(tok, _filler(), seed=1, **kw)
  c = lm_eval.passkey_samples(tok, _filler(), seed=2, **kw)
  assert len(a) == 9
  assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))
  assert [x.key for x in a] != [x.key for x in c]
  assert all(len(x.key) == 5 and x.key.isdigit() for x in a)
  # One key and filler per trial, shared by its depths.
  assert [x.key for x in a[:3]] == [a[0].key] * 3
  assert [x.depth for x in a[:3]] == [0.0, 0.5, 1.0]


def test_passkey_errors_name_the_argument():
  tok = CharTokenizer()
  with pytest.raises(ValueError, match="`depth`"):
    lm_eval.build_passkey(tok, _filler(), length=300, depth=1.5, key="1")
  with pytest.raises(ValueError, match="`length`"):
    lm_eval.build_passkey(tok, _filler(), length=40, depth=0.5, key="1")
  with pytest.raises(ValueError, match="`filler`"):
    lm_eval.build_passkey(tok, _filler(10), length=300, depth=0.5, key="1")


def test_score_passkeys_uses_the_answer_positions():
  tok = CharTokenizer()
  samples = lm_eval.passkey_samples(tok, _filler(), length=200,
                                    depths=[0.5], trials=2)
  n, t = 2, 200
  greedy = np.zeros((n, t), bool)
  logprob = np.full((n, t), -5.0, np.float32)
  s = samples[0]
  sl = slice(s.answer_start - 1, s.answer_start - 1 + s.answer_length)
  greedy[0, sl] = True
  logprob[0, sl] = -0.5
  greedy[1, sl.start:sl.stop - 1] = True        # last key token wrong
  zeros = np.zeros((1, n, 1), np.int64)
  scores = lm_eval.score_passkeys(samples, lm_eval.EvalOutput(
      logprob, greedy, zeros, zeros, zeros))
  assert scores["correct"].tolist() == [True, False]
  np.testing.assert_allclose(scores["logprob"], [-0.5, -5.0])


# ------------------------------------------------------------------ windows
def test_perplexity_windows_non_overlapping():
  docs = [np.arange(1000, dtype=np.int32), np.arange(50, dtype=np.int32)]
  w, source = lm_eval.perplexity_windows(docs, 100, source="documents")
  assert source == "documents" and w.shape == (9, 101)
  assert np.array_equal(w[:, 0], np.arange(0, 900, 100))
  assert np.array_equal(w[1:, 0], w[:-1, -1])   # targets do not overlap
  w, source = lm_eval.perplexity_windows(docs, 100, source="auto",
                                         documents_from=2048)
  assert source == "stream" and w.shape == (10, 101)
  w, _ = lm_eval.perplexity_windows(docs, 100, max_windows=3)
  assert w.shape == (3, 101)
  with pytest.raises(ValueError, match="source='stream'"):
    lm_eval.perplexity_windows(docs, 2000, source="documents")


def test_tile_block_mask_repeats_blocks_into_tiles():
  mask = jnp.array([[[[1, 0], [1, 1]]]], bool)       # [1, 1, 2, 2], 32-blocks
  tiles = lm_eval.tile_block_mask(mask, 32, 16, 32, 50, 50)
  assert tiles.shape == (1, 1, 4, 2)
  assert tiles[0, 0].tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]]
  with pytest.raises(ValueError, match="block_size"):
    lm_eval.tile_block_mask(mask, 32, 64, 32, 50, 50)


def test_gpt_block_selector_all_blocks_is_dense_and_masks_count():
  model = gpt.GPT(64, 64, num_layers=1, d_model=32, num_heads=4,
                  num_kv_heads=2, position="rope", block_q=16, block_kv=16,
                  implementation="reference", rngs=nnx.Rngs(0))
  tokens = jnp.arange(64)[None] % 64
  dense = model(tokens)
  keep_all = lambda q, k: jnp.ones((1, 4, 4, 4), bool)  # pylint: disable=g-long-lambda
  out, stats = model(tokens, block_selector=keep_all, return_stats=True)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
  assert int(stats[0].masked_blocks.sum()) == 0
  diag = lambda q, k: jnp.broadcast_to(jnp.eye(4, dtype=bool), (1, 4, 4, 4))  # pylint: disable=g-long-lambda
  _, stats = model(tokens, block_selector=diag, return_stats=True)
  assert int(stats[0].masked_blocks[0, 0]) == 6    # 10 causal blocks - 4


def test_evaluator_dense_matches_model_and_pads_last_batch():
  model = gpt.GPT(64, 64, num_layers=1, d_model=32, num_heads=4,
                  position="rope", block_q=16, block_kv=16,
                  implementation="reference", rngs=nnx.Rngs(1))
  tokens = np.random.default_rng(0).integers(0, 64, (3, 65)).astype(np.int32)
  ev = lm_eval.Evaluator(model, batch_size=2,
                         xattention=lm_eval.XAttentionOptions(16, 4))
  out = ev.run(tokens[:, :-1], tokens[:, 1:])
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(
      model(jnp.asarray(tokens[:, :-1])))), tokens[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(out.logprob, logp, rtol=1e-5, atol=1e-5)
  assert out.skipped.shape == (1, 3, 4) and out.skipped.sum() == 0
  x = ev.run(tokens[:, :-1], tokens[:, 1:], xattention_threshold=0.5)
  assert x.masked.sum() > 0
  with pytest.raises(ValueError, match="xattention_threshold"):
    ev.run(tokens[:, :-1], tokens[:, 1:], xattention_threshold=1.5)


# --------------------------------------------------------------- end to end
def test_eval_sparsity_small_end_to_end(tmp_path):
  pytest.importorskip("tokenizers")
  from blasst_jax import text_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = ("the kernel skips a block when scores fall below the running "
           "max of every row in the tile and keeps the sink").split()
  docs = {f"doc{i:02d}": " ".join(rng.choice(words, size=n)) + ".\n"
          for i, n in enumerate([400] * 10 + [1500] * 4)}
  data_dir = tmp_path / "data"
  text_data.write_dataset(docs, str(data_dir), vocab_size=300,
                          heldout_fraction=0.2, long_doc_chars=5000,
                          min_long_heldout=2)
  out_dir = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "experiments/eval_sparsity.py",
       "--config=configs/eval_sparsity.py:small",
       f"--config.data_dir={data_dir}", f"--config.output_dir={out_dir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "device_kind=cpu" in proc.stdout and "jax=" in proc.stdout
  assert "At what sparsity does perplexity move by 1 %?" in proc.stdout
  res = json.loads((out_dir / "results.json").read_text())
  assert res["model"]["source"] == "random_init"
  assert [r["length"] for r in res["lengths"]] == [128, 256]
  assert res["lengths"][1]["rope_scale"] == 2.0
  kinds = {m["kind"] for r in res["lengths"] for m in r["methods"]}
  assert {"dense", "skip", "xattention", "xattention+skip"} <= kinds
  for rec in res["lengths"]:
    assert rec["num_windows"] >= 1 and "0.02" in rec["calibration"]
    dense = rec["methods"][0]
    assert dense["label"] == "dense" and dense["delta_ppl_pct"] == 0.0
    assert dense["sparsity"] == 0.0 and dense["combined_sparsity"] == 0.0
    skip = sorted((m for m in rec["methods"] if m["kind"] in ("dense", "skip")),
                  key=lambda m: m["threshold"])
    assert [m["threshold"] for m in skip] == [0.0, 1e-2, 1e-1, 3e-1, 6e-1]
    pooled = [m["sparsity"] for m in skip]
    first_layer = [m["sparsity_per_layer"][0] for m in skip]
    assert pooled == sorted(pooled) and first_layer == sorted(first_layer)
    assert pooled[-1] > 0
    for m in rec["methods"]:
      assert np.isfinite(m["perplexity"]) and m["perplexity"] > 1
      assert len(m["sparsity_per_layer"]) == 2
      assert np.array(m["sparsity_per_head"]).shape == (2, 4)
      r = m["retrieval"]
      assert 0 <= r["accuracy"] <= 1 and len(r["accuracy_by_depth"]) == 3
      assert all(0 <= a <= 1 for a in r["accuracy_by_depth"])
      assert r["mean_logprob"] <= 0
    x = [m for m in rec["methods"] if m["kind"] == "xattention"][0]
    assert x["mask_sparsity"] > 0
  assert len(res["summary"]) == sum(len(r["methods"]) for r in res["lengths"])
  assert len(res["answers"]) == 4
  for name in ("tradeoff.png", "sparsity_by_layer.png",
               "sparsity_per_head.png", "sparsity_vs_context.png",
               "retrieval.png"):
    assert (out_dir / name).stat().st_size > 5_000, name
