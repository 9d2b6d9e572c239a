"""experiments.eval_sparsity end to end (CPU) and experiments.lm.lm_eval."""

import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lm import gpt
from experiments.lm import lm_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA's optimisation passes dominate these tiny CPU runs; the results do
# not depend on them.
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                      JAX_DISABLE_MOST_OPTIMIZATIONS="1")


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
      logprob, greedy, zeros, zeros, zeros, np.zeros((n, t), np.int32)))
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
  from experiments.lm import text_data  # pylint: disable=g-import-not-at-top
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
  env = SUBPROCESS_ENV
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.eval_sparsity",
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


# ------------------------------------------------------------- comparisons
def _config(name, variant):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      f"_cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _tiny_dataset(path):
  from experiments.lm import text_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = ("the kernel skips a block when scores fall below the running "
           "max of every row in the tile and keeps the sink").split()
  docs = {f"doc{i:02d}": " ".join(rng.choice(words, size=n)) + ".\n"
          for i, n in enumerate([300] * 10)}
  text_data.write_dataset(docs, str(path), vocab_size=300,
                          heldout_fraction=0.2, long_doc_chars=5000,
                          min_long_heldout=0)
  return str(path)


def _write_run(workdir, data_dir, *, seed, qk_scale=1.0, threshold=None):
  """A train_lm-shaped workdir (log.json + checkpoint) of a random model."""
  from experiments.lm import lm_checkpoint  # pylint: disable=g-import-not-at-top
  cfg = _config("lm_small", "finetune,small")
  cfg.data.data_dir = data_dir
  cfg.seed = seed
  model = lm_checkpoint.build_model(cfg)
  for block in model.blocks:      # peaked attention: something to skip
    for proj in (block.attn.q_proj, block.attn.k_proj):
      proj.kernel[...] = proj.kernel[...] * qk_scale
  _, params = nnx.split(model)
  lm_checkpoint.save_checkpoint(str(workdir), {"params": params}, step=7,
                                keep=1)
  record = {"threshold": 0.0 if threshold is None else threshold}
  (workdir / "log.json").write_text(json.dumps(
      {"config": cfg.to_dict(), "threshold": record}))


def _eval_config(output_dir, **kw):
  cfg = _config("eval_sparsity", "small")
  cfg.random_init = False
  cfg.data_dir = ""                     # the runs' own dataset
  cfg.output_dir = str(output_dir)
  cfg.context_lengths = (128,)
  cfg.thresholds = (0.0, 1e-1, 5e-1)
  cfg.target_sparsities = ()
  cfg.xattention.thresholds = ()
  cfg.max_windows = 2
  cfg.retrieval.update(depths=(0.5,), trials=1)
  cfg.progress = False
  cfg.update(kw)
  return cfg


@pytest.fixture(scope="module")
def finetune_root(tmp_path_factory):
  pytest.importorskip("tokenizers")
  pytest.importorskip("orbax.checkpoint")
  root = tmp_path_factory.mktemp("runs")
  data_dir = _tiny_dataset(root / "data")
  ft = root / "ft"
  for name, seed, scale, lam in (("dense", 0, 3.0, None),
                                 ("finetune", 1, 5.0, 0.3),
                                 ("dense_control", 2, 3.0, None)):
    (ft / name).mkdir(parents=True)
    _write_run(ft / name, data_dir, seed=seed, qk_scale=scale, threshold=lam)
  return ft


def test_parse_run_specs_and_errors():
  assert lm_eval.parse_run_specs(("a=x/y", "b = z")) == [("a", "x/y"),
                                                         ("b", "z")]
  assert lm_eval.parse_run_specs("a=x,b=y") == [("a", "x"), ("b", "y")]
  assert lm_eval.parse_run_specs({"b": "y", "a": "x"}) == [("b", "y"),
                                                           ("a", "x")]
  with pytest.raises(ValueError, match="label=path"):
    lm_eval.parse_run_specs(("nolabel",))
  with pytest.raises(ValueError, match="twice"):
    lm_eval.parse_run_specs(("a=x", "a=y"))
  with pytest.raises(ValueError, match="plain name"):
    lm_eval.parse_run_specs(("../a=x",))


def test_compare_finetune_root_at_equal_lambda(finetune_root, tmp_path):
  cfg = _eval_config(tmp_path / "out", workdir=str(finetune_root))
  runs = lm_eval.comparison_runs(cfg)
  assert [label for label, _ in runs] == ["dense_control", "finetune",
                                          "dense"]
  assert lm_eval.comparison_runs(_eval_config(
      tmp_path, workdir=str(finetune_root / "dense"))) is None
  assert lm_eval.trained_threshold(str(finetune_root / "finetune")) == 0.3
  cmp = lm_eval.evaluate_and_compare(cfg, runs, cfg.output_dir,
                                     verbose=False)
  out = tmp_path / "out"
  assert json.loads((out / "comparison.json").read_text())["table"] \
      == json.loads(json.dumps(cmp["table"]))
  assert (out / "comparison.png").stat().st_size > 5_000
  assert cmp["reference"] == "dense_control"
  assert cmp["thresholds"] == [0.0, 0.1, 0.3, 0.5]   # + the trained λ
  assert cmp["thresholds_added"] == [0.3]
  per_run = {label: json.loads((out / label / "results.json").read_text())
             for label, _ in runs}
  # One windows / passkeys / λ list for every run.
  rec = {label: r["lengths"][0] for label, r in per_run.items()}
  assert len({r["windows_sha1"] for r in rec.values()}) == 1
  assert len({r["passkeys_sha1"] for r in rec.values()}) == 1
  assert len({tuple(m["threshold"] for m in r["methods"])
              for r in rec.values()}) == 1
  (length,) = cmp["lengths"]
  assert length["length"] == 128 and length["thresholds"] == cmp["thresholds"]
  for label, r in length["runs"].items():
    assert len(r["sparsity"]) == len(r["perplexity"]) == 4
    assert r["sparsity"][0] == 0.0 and r["delta_ppl_pct"][0] == 0.0
    assert r["sparsity"] == sorted(r["sparsity"])
    assert r["dense_perplexity"] == rec[label]["methods"][0]["perplexity"]
    ref = length["runs"]["dense_control"]["dense_perplexity"]
    np.testing.assert_allclose(
        r["delta_ppl_vs_reference_pct"],
        (np.array(r["perplexity"]) / ref - 1) * 100, rtol=1e-9)
    assert len(r["retrieval"]) == 4
  assert length["runs"]["finetune"]["sparsity"][-1] > 0
  # Different models: different dense perplexities.
  assert length["runs"]["finetune"]["dense_perplexity"] \
      != length["runs"]["dense_control"]["dense_perplexity"]
  assert len(cmp["table"]) == 4
  text = lm_eval.format_comparison(cmp)
  assert "dense_control" in text and "finetune λ=0.3" in text


def test_block_q_override_shortens_the_tiles(finetune_root, tmp_path):
  run = str(finetune_root / "dense")
  model, record, _, _ = lm_eval.load_eval_model(
      _eval_config(tmp_path, block_q=32), workdir=run)
  assert lm_eval.model_tiles(model) == (32, 16)
  assert record["block_q"] == 32 and record["trained_block_q"] == 16
  model, record, _, _ = lm_eval.load_eval_model(_eval_config(tmp_path),
                                                workdir=run)
  assert lm_eval.model_tiles(model) == (16, 16) and record["block_q"] == 16
  for bad in (8, 24):
    with pytest.raises(ValueError, match="block_q"):
      lm_eval.load_eval_model(_eval_config(tmp_path, block_q=bad),
                              workdir=run)


def test_compare_a_run_with_itself_is_identical(finetune_root, tmp_path):
  run = str(finetune_root / "finetune")
  env = SUBPROCESS_ENV
  out = tmp_path / "self"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.eval_sparsity",
       "--config=configs/eval_sparsity.py:small",
       "--config.random_init=False", "--config.data_dir=",
       f"--config.output_dir={out}",
       f"--config.compare_workdirs=('a={run}', 'b={run}')",
       "--config.context_lengths=(128,)", "--config.target_sparsities=()",
       "--config.xattention.thresholds=()", "--config.max_windows=2",
       "--config.retrieval.depths=(0.5,)", "--config.retrieval.trials=1",
       "--config.include_trained_threshold=False", "--config.progress=False"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "Equal-λ comparison" in proc.stdout
  cmp = json.loads((out / "comparison.json").read_text())
  assert [r["label"] for r in cmp["runs"]] == ["a", "b"]
  assert cmp["thresholds"] == [0.0, 1e-2, 1e-1, 3e-1, 6e-1]
  (length,) = cmp["lengths"]
  a, b = length["runs"]["a"], length["runs"]["b"]
  assert a == b
  assert b["delta_ppl_vs_reference_pct"] == b["delta_ppl_pct"]
  assert (out / "comparison.png").stat().st_size > 5_000
  assert (out / "a" / "results.json").exists()
  assert (out / "b" / "tradeoff.png").exists()


def test_compare_runs_rejects_different_windows():
  def fake(sha, lams=(0.0, 0.1)):
    methods = [dict(kind="dense" if lam == 0 else "skip", threshold=lam,
                    perplexity=2.0, sparsity=0.0, combined_sparsity=0.0,
                    sparsity_per_layer=[0.0], delta_ppl_pct=0.0)
               for lam in lams]
    return {"model": {"source": "checkpoint", "trained_seq_len": 8},
            "lengths": [{"length": 8, "num_windows": 1, "window_source": "s",
                         "windows_sha1": sha, "methods": methods}]}
  assert lm_eval.compare_runs({"a": fake("x"), "b": fake("x")})["table"]
  with pytest.raises(ValueError, match="windows_sha1"):
    lm_eval.compare_runs({"a": fake("x"), "b": fake("y")})
  with pytest.raises(ValueError, match="thresholds"):
    lm_eval.compare_runs({"a": fake("x"), "b": fake("x", (0.0, 0.2))})


def test_checkpoint_of_another_vocabulary_is_rejected(tmp_path):
  """Params saved with one vocabulary do not load into a model of another
  (a data_dir whose tokenizer differs from the run's): a ValueError, not
  NaN perplexities."""
  from experiments.lm import lm_checkpoint  # pylint: disable=g-import-not-at-top

  def params(vocab):
    model = gpt.GPT(vocab_size=vocab, max_len=32, num_layers=1, d_model=16,
                    num_heads=2, rngs=nnx.Rngs(0))
    return nnx.split(model)[1]

  lm_checkpoint.save_checkpoint(str(tmp_path), {"params": params(64)},
                                step=1, keep=1)
  restored = lm_checkpoint.restore_checkpoint(str(tmp_path),
                                              {"params": params(64)})
  assert restored is not None
  with pytest.raises(ValueError, match="does not fit the model"):
    lm_checkpoint.restore_checkpoint(str(tmp_path), {"params": params(80)})
