r"""Skip-softmax on a trained GPT: sparsity against perplexity and retrieval.

For the model of a train_lm run (`--config.workdir`, or a random-init model
with `--config.random_init=True`) and the held-out documents of its text
dataset, at every context length of the config (RoPE positions interpolated
past the trained length):

  * methods: dense (λ = 0), each λ of `thresholds`, each target sparsity
    (λ calibrated on training-split text at that length,
    `lm_eval.calibrate_thresholds`), XAttention block selection alone (each
    τ) and XAttention + skip-softmax (each τ with each `skip_thresholds` λ);
  * per method: block sparsity per layer and per head, pooled; held-out
    perplexity over non-overlapping windows and Δ perplexity vs dense (%);
    passkey retrieval ("The pass key is 73914. Remember it." at depths
    0-100 % of held-out text; greedy exact match and mean log-prob of the
    key's tokens) over several random keys per depth.

Writes results.json and PNGs (trade-off, sparsity by layer, per-head
heatmap, sparsity vs context length, retrieval heatmaps) into
`--config.output_dir`, and prints a summary table with the answers to: at
what sparsity does perplexity move by 1 %, does retrieval hold there, how
does sparsity grow with context, does XAttention + skip keep accuracy.

    python experiments/eval_sparsity.py --config=configs/eval_sparsity.py \
        --config.workdir=lm_small_output
    python experiments/eval_sparsity.py --config=configs/eval_sparsity.py:small
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import logging
from flax import nnx
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from blasst_jax import lm_checkpoint  # pylint: disable=g-import-not-at-top
from blasst_jax import lm_eval  # pylint: disable=g-import-not-at-top
from blasst_jax import testing  # pylint: disable=g-import-not-at-top
from blasst_jax import text_data  # pylint: disable=g-import-not-at-top
from blasst_jax.progress import ProgressBar  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config",
                                          "configs/eval_sparsity.py")


def load_model(cfg):
  """(model, record, data_dir, trained seq_len) from the config."""
  if cfg.random_init:
    if not cfg.data_dir:
      raise ValueError("`random_init` needs `data_dir` (a folder written by "
                       "experiments/prepare_text.py).")
    train_cfg = ml_collections.ConfigDict(dict(
        model=cfg.model.to_dict(), seq_len=cfg.train_seq_len, seed=cfg.seed,
        data=dict(kind="text", data_dir=cfg.data_dir)))
    model = lm_checkpoint.build_model(train_cfg)
    if cfg.random_qk_scale != 1.0:
      # Sharper random attention (score std grows by scale**2): a random
      # model otherwise attends near uniformly and skips nothing.
      for block in model.blocks:
        for proj in (block.attn.q_proj, block.attn.k_proj):
          proj.kernel[...] = proj.kernel[...] * cfg.random_qk_scale
    record = {"source": "random_init", "seed": cfg.seed,
              "random_qk_scale": cfg.random_qk_scale}
    data_dir, seq_len = cfg.data_dir, cfg.train_seq_len
  else:
    model, train_cfg, step = lm_checkpoint.load_run(
        cfg.workdir, step=None if cfg.step < 0 else cfg.step,
        data_dir=cfg.data_dir or None)
    if lm_checkpoint.data_kind(train_cfg) != "text":
      raise ValueError(f"The run in `workdir` {cfg.workdir!r} trained on "
                       "synthetic tokens: evaluate a run of "
                       "configs/lm_small.py (real text).")
    record = {"source": "checkpoint", "workdir": os.path.abspath(cfg.workdir),
              "step": step}
    data_dir, seq_len = train_cfg.data.data_dir, train_cfg.seq_len
  if cfg.implementation is not None:
    for block in model.blocks:
      block.attn.implementation = cfg.implementation
  m = train_cfg.model
  record.update(
      trained_seq_len=int(seq_len), num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, d_model=m.d_model,
      block_q=m.block_q, block_kv=m.block_kv, dtype=m.dtype,
      position=m.get("position", "learned"),
      implementation=cfg.implementation or "auto",
      num_params=int(sum(x.size for x in jax.tree.leaves(
          nnx.state(model, nnx.Param)))))
  return model, record, data_dir, int(seq_len)


def methods_for(cfg, calibrated: dict) -> list[dict]:
  """The methods evaluated at one length (calibrated: target -> record)."""
  fmt = lambda lam: f"{lam:.0e}"  # pylint: disable=g-long-lambda
  methods = [dict(label="dense", kind="dense", threshold=0.0,
                  xattention_threshold=None, target_sparsity=None)]
  for lam in sorted(set(float(x) for x in cfg.thresholds) - {0.0}):
    methods.append(dict(label=f"λ={fmt(lam)}", kind="skip", threshold=lam,
                        xattention_threshold=None, target_sparsity=None))
  for target, rec in calibrated.items():
    if "threshold" in rec:
      methods.append(dict(label=f"target {target:.0%}", kind="target",
                          threshold=rec["threshold"],
                          xattention_threshold=None, target_sparsity=target))
  for tau in cfg.xattention.thresholds:
    methods.append(dict(label=f"XAttn τ={tau:g}", kind="xattention",
                        threshold=0.0, xattention_threshold=float(tau),
                        target_sparsity=None))
    for lam in cfg.xattention.skip_thresholds:
      methods.append(dict(label=f"XAttn τ={tau:g} + λ={fmt(lam)}",
                          kind="xattention+skip", threshold=float(lam),
                          xattention_threshold=float(tau),
                          target_sparsity=None))
  return methods


def evaluate_length(cfg, model, length, *, trained_len, heldout, train_docs,
                    tokenizer, filler):
  """All methods at one context length: a record for results.json."""
  rope_scale = max(1.0, length / trained_len)
  if model.position == "rope":
    model.set_rope_scale(rope_scale)
  elif length > trained_len:
    raise ValueError(f"Context length {length} exceeds the learned position "
                     f"table ({trained_len}): drop it from `context_lengths`.")
  windows, source = lm_eval.perplexity_windows(
      heldout, length, source=cfg.window_source,
      documents_from=cfg.documents_from, max_windows=cfg.max_windows)
  record = {"length": int(length), "rope_scale": rope_scale,
            "window_source": source, "num_windows": int(windows.shape[0]),
            "tokens": int(windows.shape[0] * length)}
  t0 = time.perf_counter()
  calibrated = {}
  if cfg.target_sparsities:
    cal_windows, _ = lm_eval.perplexity_windows(
        train_docs, length, source="stream",
        max_windows=cfg.calibration_windows)
    calibrated = lm_eval.calibrate_thresholds(
        model, cal_windows, cfg.target_sparsities, length=length)
  record["calibration"] = {f"{t:g}": r for t, r in calibrated.items()}
  record["calibration_seconds"] = time.perf_counter() - t0
  samples = []
  if cfg.retrieval.enabled:
    r = cfg.retrieval
    samples = lm_eval.passkey_samples(
        tokenizer, filler, length=length, depths=r.depths, trials=r.trials,
        seed=r.seed, num_digits=r.num_digits)
  passkey_tokens = np.stack([s.tokens for s in samples]) if samples else None
  batch = max(1, cfg.tokens_per_batch // length)
  evaluator = lm_eval.Evaluator(model, batch_size=batch, xattention=(
      lm_eval.XAttentionOptions(block_size=cfg.xattention.block_size,
                                stride=cfg.xattention.stride)
      if cfg.xattention.thresholds else None))
  methods = methods_for(cfg, calibrated)
  n_batches = -(-windows.shape[0] // batch) + (
      -(-len(samples) // batch) if samples else 0)
  bar = ProgressBar(len(methods) * n_batches, desc=f"length {length}",
                    enabled=cfg.progress)
  t0 = time.perf_counter()
  dense_ppl = None
  for method in methods:
    kw = dict(threshold=method["threshold"],
              xattention_threshold=method["xattention_threshold"],
              progress=bar)
    out = evaluator.run(windows[:, :-1], windows[:, 1:], **kw)
    nll, ppl = lm_eval.perplexity(out.logprob)
    if dense_ppl is None:
      dense_ppl = ppl                       # methods[0] is dense
    method.update(nll=nll, perplexity=ppl,
                  delta_ppl_pct=(ppl / dense_ppl - 1.0) * 100.0,
                  **lm_eval.block_sparsity(out))
    if samples:
      pk = evaluator.run(passkey_tokens[:, :-1], passkey_tokens[:, 1:], **kw)
      scores = lm_eval.score_passkeys(samples, pk)
      depths = np.array([s.depth for s in samples])
      method["retrieval"] = {
          "accuracy": float(scores["correct"].mean()),
          "mean_logprob": float(scores["logprob"].mean()),
          "accuracy_by_depth": [float(scores["correct"][depths == d].mean())
                                for d in cfg.retrieval.depths],
          "logprob_by_depth": [float(scores["logprob"][depths == d].mean())
                               for d in cfg.retrieval.depths],
          "sparsity": lm_eval.block_sparsity(pk)["combined_sparsity"],
          "keys": [s.key for s in samples[::len(cfg.retrieval.depths)]],
      }
  bar.close()
  record["eval_seconds"] = time.perf_counter() - t0
  record["methods"] = methods
  if samples:
    record["retrieval_setup"] = {
        "depths": list(cfg.retrieval.depths), "trials": cfg.retrieval.trials,
        "needle": lm_eval.NEEDLE, "question": lm_eval.QUESTION,
        "needle_positions": [s.needle_start for s in samples]}
  return record


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  t_start = time.time()
  device = testing.announce_device()[0]
  model, model_record, data_dir, trained_len = load_model(cfg)
  heldout = text_data.load_documents(data_dir, "heldout")
  train_docs = text_data.load_documents(data_dir, "train")
  tokenizer = text_data.load_tokenizer(data_dir)
  filler = lm_eval.filler_stream(heldout, tokenizer.bos_id)
  print(f"model: {model_record['source']}, {model_record['num_params']:,} "
        f"params, trained at {trained_len} tokens; held out: {len(heldout)} "
        f"documents, {sum(d.size for d in heldout):,} tokens", flush=True)
  lengths = []
  for length in cfg.context_lengths:
    lengths.append(evaluate_length(
        cfg, model, int(length), trained_len=trained_len, heldout=heldout,
        train_docs=train_docs, tokenizer=tokenizer, filler=filler))
    rec = lengths[-1]
    print(f"length {length}: {rec['num_windows']} windows "
          f"({rec['window_source']}), dense ppl "
          f"{rec['methods'][0]['perplexity']:.3f}, "
          f"{rec['eval_seconds']:.1f} s", flush=True)
  results = {**device, "config": cfg.to_dict(), "model": model_record,
             "data": {"data_dir": os.path.abspath(data_dir),
                      "heldout_documents": len(heldout),
                      "heldout_tokens": int(sum(d.size for d in heldout))},
             "lengths": lengths}
  results["summary"] = lm_eval.summary_rows(results)
  results["answers"] = lm_eval.answer_questions(results)
  os.makedirs(cfg.output_dir, exist_ok=True)
  results["plots"] = lm_eval.plot_results(
      results, cfg.output_dir, heatmap_threshold=cfg.heatmap_threshold)
  results["seconds"] = time.time() - t_start
  path = os.path.join(cfg.output_dir, "results.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(lm_eval.format_summary(results))
  print(f"results written to {os.path.abspath(path)}; plots: "
        + ", ".join(results["plots"]))
  print(f"done in {results['seconds']:.0f} s")


if __name__ == "__main__":
  app.run(main)
