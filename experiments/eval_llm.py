r"""Skip-softmax on a pretrained LLM: sparsity against accuracy, prefill and decode.

For a Llama-family checkpoint (SmolLM2-135M-Instruct by default, every
attention layer through `blasst_jax.attention` / `decode_attention`) and
public-domain prose (Spurgeon's Treasury of David to evaluate, Matthew
Henry's Concise Commentary to calibrate; Debian's SWORD packages), at every
context length of the config:

  * prefill (one teacher-forced pass per window): dense, each λ, each
    calibrated target sparsity (λ = c / L fitted on the calibration text),
    XAttention alone and XAttention + skip; per method the block sparsity
    per layer and head, Δ perplexity vs dense, top-1 agreement with dense,
    passkey retrieval at several depths (`experiments.lm.lm_eval`);
  * decode (a dense prefill, then the last `decode.steps` tokens fed one
    decode step at a time): dense, each decode λ and each calibrated decode
    target; per method the decode-block sparsity, Δ perplexity and top-1
    agreement over those tokens.

Writes results.json, the PNGs of `lm_eval.plot_results` and
agreement_decode.png into --config.output_dir, and prints the tables.

    python -m experiments.eval_llm --config=configs/eval_llm.py
    python -m experiments.eval_llm --config=configs/eval_llm.py:small \
        --config.text.files="('a.txt', 'b.txt')"
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import logging
from ml_collections import config_flags

from experiments import config_file
from blasst_jax import calibration
from blasst_jax import decode as decode_lib
from experiments.lm import lm_eval
from blasst_jax import plotting
from blasst_jax import testing
from blasst_jax._progress import ProgressBar
from experiments.lm import pretrained

_CONFIG = config_flags.DEFINE_config_file("config", config_file("eval_llm"))


# ------------------------------------------------------------------ decode
def decode_study(cfg, model, length: int, eval_docs, cal_docs) -> dict:
  """Teacher-forced decode at one context length (`lm_eval.evaluate_decode`)
  with the decode λ sweep and calibrated decode targets."""
  d = cfg.decode
  windows, source = lm_eval.perplexity_windows(
      eval_docs, length, source=cfg.window_source,
      documents_from=cfg.documents_from, max_windows=d.windows)
  cal, _ = lm_eval.perplexity_windows(cal_docs, length, source="stream",
                                      max_windows=cfg.calibration_windows)
  # One split count for calibration and evaluation: each split keeps its
  # own running max, so the count changes the decisions.
  splits = d.num_splits or decode_lib.default_num_splits(
      d.batch_size, model.config.num_kv_heads, length,
      decode_lib.DEFAULT_BLOCK_KV)
  t0 = time.perf_counter()
  calibrated = lm_eval.calibrate_decode_thresholds(
      model, cal, d.target_sparsities, length=length, steps=d.steps,
      cache_lengths=d.calibration_lengths,
      options=calibration.DecodeOptions(num_splits=splits))
  cal_seconds = time.perf_counter() - t0
  methods = [dict(label="dense", kind="dense", threshold=0.0)]
  methods += [dict(label=f"λ={lam:.2g}", kind="skip", threshold=float(lam))
              for lam in sorted(set(d.thresholds) - {0.0})]
  methods += [dict(label=f"target {target:.0%}", kind="target",
                   threshold=rec["threshold"], target_sparsity=target)
              for target, rec in calibrated.items() if "threshold" in rec]
  batches = -(-windows.shape[0] // d.batch_size)
  bar = ProgressBar(batches * len(methods), desc=f"decode {length}",
                    enabled=cfg.progress)
  t0 = time.perf_counter()
  out = lm_eval.evaluate_decode(model, windows, steps=d.steps,
                                methods=methods, batch_size=d.batch_size,
                                num_splits=splits, progress=bar)
  bar.close()
  return {"num_windows": int(windows.shape[0]), "window_source": source,
          "windows_sha1": lm_eval.fingerprint(windows), "steps": d.steps,
          "num_splits": int(splits), "block_kv": decode_lib.DEFAULT_BLOCK_KV,
          "calibration": {f"{t:g}": r for t, r in calibrated.items()},
          "calibration_seconds": cal_seconds,
          "eval_seconds": time.perf_counter() - t0, "methods": out}


def format_decode(results: dict) -> str:
  lines = [f"{'length':>6}  {'decode method':<16} {'λ':>9} {'sparsity':>8} "
           f"{'Δppl %':>8} {'top-1 agree':>11}"]
  for rec in results["lengths"]:
    for m in rec.get("decode", {}).get("methods", []):
      lines.append(f"{rec['length']:>6}  {m['label']:<16} "
                   f"{m['threshold']:>9.3g} {m['sparsity']:>8.3f} "
                   f"{m['delta_ppl_pct']:>+8.2f} {m['top1_agreement']:>11.3f}")
  return "\n".join(lines)


def plot_agreement_and_decode(results: dict, out_dir: str) -> str:
  """Top-1 agreement vs sparsity (prefill), and decode Δ perplexity and
  agreement vs decode sparsity, one line per context length."""
  fig = plotting.Figure(figsize=(15, 4.2))
  axes = fig.subplots(1, 3)
  for rec in results["lengths"]:
    skip = sorted((m for m in rec["methods"] if m["kind"] in ("dense",
                                                             "skip")),
                  key=lambda m: m["threshold"])
    axes[0].plot([m["combined_sparsity"] for m in skip],
                 [m["top1_agreement"] for m in skip], "o-",
                 label=f"{rec['length']}")
    dec = sorted((m for m in rec.get("decode", {}).get("methods", [])
                  if m["kind"] in ("dense", "skip")),
                 key=lambda m: m["threshold"])
    if dec:
      axes[1].plot([m["sparsity"] for m in dec],
                   [m["delta_ppl_pct"] for m in dec], "o-",
                   label=f"{rec['length']}")
      axes[2].plot([m["sparsity"] for m in dec],
                   [m["top1_agreement"] for m in dec], "o-",
                   label=f"{rec['length']}")
  titles = ("Prefill: top-1 agreement with dense",
            "Decode: Δ perplexity (%)", "Decode: top-1 agreement with dense")
  for ax, title in zip(axes, titles):
    ax.set_title(title)
    ax.set_xlabel("block sparsity (skipped / visited)")
    ax.grid(alpha=0.3)
    ax.legend(title="context", fontsize=8)
  axes[1].axhline(1.0, color="gray", ls=":", lw=1)
  fig.suptitle(f"{results['model']['file']} on {results['data']['eval']['text']}")
  name = "agreement_decode.png"
  plotting.save_figure(fig, os.path.join(out_dir, name))
  return name


# -------------------------------------------------------------------- main
def run(cfg, device: dict | None = None, verbose: bool = True) -> dict:
  """The whole study; returns (and writes) results.json's content."""
  t_start = time.time()
  os.makedirs(cfg.output_dir, exist_ok=True)
  model, tok, model_record = pretrained.load_model(cfg, cfg.output_dir)
  texts = pretrained.load_texts(cfg, tok)
  eval_docs, cal_docs = texts["eval"], texts["calibration"]
  if verbose:
    print(f"model: {model_record['file']}, {model_record['num_params']:,} "
          f"params; eval text {texts['record']['eval']}; calibration text "
          f"{texts['record']['calibration']}", flush=True)
  filler = lm_eval.filler_stream(eval_docs, tok.bos_id)
  lengths = []
  for length in cfg.context_lengths:
    rec = lm_eval.evaluate_length(
        cfg, model, int(length), trained_len=model.config.max_position,
        heldout=eval_docs, train_docs=cal_docs, tokenizer=tok, filler=filler)
    if cfg.decode.enabled:
      rec["decode"] = decode_study(cfg, model, int(length), eval_docs,
                                   cal_docs)
    lengths.append(rec)
    with open(os.path.join(cfg.output_dir, "partial.json"), "w") as f:
      json.dump({"model": model_record, "data": texts["record"],
                 "lengths": lengths}, f)      # survives an interrupted run
    if verbose:
      print(f"length {length}: {rec['num_windows']} windows, dense ppl "
            f"{rec['methods'][0]['perplexity']:.3f}, "
            f"{rec['eval_seconds']:.1f} s", flush=True)
  results = {**(device or {}), "config": cfg.to_dict(),
             "model": model_record, "data": texts["record"],
             "lengths": lengths}
  results["summary"] = lm_eval.summary_rows(results)
  results["answers"] = lm_eval.answer_questions(results)
  results["plots"] = lm_eval.plot_results(
      results, cfg.output_dir, heatmap_threshold=cfg.heatmap_threshold)
  results["plots"].append(plot_agreement_and_decode(results, cfg.output_dir))
  results["seconds"] = time.time() - t_start
  with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  device = testing.announce_device()[0]
  results = run(cfg, device)
  print(lm_eval.format_summary(results))
  print(format_decode(results))
  print(f"results written to "
        f"{os.path.abspath(os.path.join(cfg.output_dir, 'results.json'))}; "
        f"plots: {', '.join(results['plots'])}")


if __name__ == "__main__":
  app.run(main)
