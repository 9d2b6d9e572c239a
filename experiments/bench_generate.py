r"""End-to-end generation latency of a pretrained LLM: dense vs skip-softmax.

Time-to-first-token (TTFT: the jitted prefill of the prompt, first token
sampled) and time-per-output-token (TPOT: one decode step of every layer; both
one jitted call per token, median over the generated tokens, and all
tokens in one compiled loop, total / tokens) of `blasst_jax.models.Generator`
at the longest context the model holds, for each operating point (prefill
λ, decode λ) of the config: dense, and the calibrated points of an
experiments/eval_llm.py run (the largest measured sparsity with at most
`max_delta_ppl_pct` perplexity change at that context, prefill and decode
separately). Beside each time, the attention alone at the same shapes
(every layer's q/k/v captured from the prompt, all layers in one jitted
call) gives the attention share of the step; cuDNN's dense attention on the
same q/k/v is the baseline for the prefill attention. Sparsity comes from a
run with statistics. Writes JSON + PNG.

    python -m experiments.bench_generate --config=configs/bench_generate.py \
        --config.from_results=benchmarks/results/eval_llm_h200/results.json
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from experiments import config_file
from experiments import harness
import blasst_jax as bj
from blasst_jax import analysis
from experiments.lm import lm_eval
from blasst_jax import models
from blasst_jax import testing
from experiments.lm import pretrained

_CONFIG = config_flags.DEFINE_config_file("config", config_file("bench_generate"))


def operating_points(cfg) -> list[dict]:
  """Dense, the config's explicit points, and the calibrated points read
  from an eval_llm results.json at the config's context length."""
  points = [dict(label="dense", prefill=0.0, decode=0.0, source="dense")]
  for label, prefill, decode in cfg.points:
    points.append(dict(label=label, prefill=float(prefill),
                       decode=float(decode), source="config"))
  if cfg.from_results:
    with open(cfg.from_results) as f:
      results = json.load(f)
    rec = min(results["lengths"],
              key=lambda r: abs(r["length"] - cfg.context))
    ok = lambda m: abs(m["delta_ppl_pct"]) <= cfg.max_delta_ppl_pct  # pylint: disable=g-long-lambda
    prefill = max((m for m in rec["methods"]
                   if m["kind"] in ("skip", "target") and ok(m)),
                  key=lambda m: m["sparsity"], default=None)
    decode = max((m for m in rec.get("decode", {}).get("methods", [])
                  if m["kind"] in ("skip", "target") and ok(m)),
                 key=lambda m: m["sparsity"], default=None)
    if prefill is not None or decode is not None:
      points.append(dict(
          label=f"skip (≤{cfg.max_delta_ppl_pct:g} % Δppl)",
          prefill=prefill["threshold"] if prefill else 0.0,
          decode=decode["threshold"] if decode else 0.0,
          source=f"{cfg.from_results} at {rec['length']}: prefill "
          f"{prefill['label'] if prefill else '-'}, decode "
          f"{decode['label'] if decode else '-'}",
          study_prefill=prefill and {k: prefill[k] for k in (
              "label", "sparsity", "delta_ppl_pct")},
          study_decode=decode and {k: decode[k] for k in (
              "label", "sparsity", "delta_ppl_pct")}))
  return points


def time_generation(model, prompts, point: dict, cfg) -> dict:
  """TTFT and TPOT (ms) of one operating point, and its sparsity."""
  b, prompt_len = prompts.shape
  lengths = np.full((b,), prompt_len, np.int32)
  max_len = prompt_len + cfg.new_tokens
  gen = models.Generator(model, batch=b, max_len=max_len,
                         threshold=point["prefill"],
                         decode_threshold=point["decode"])
  ttft, tpot, tpot_loop = [], [], []
  for rep in range(cfg.warmup + cfg.repeats):
    t0 = time.perf_counter()
    tok = jax.block_until_ready(gen.prefill(prompts, lengths))
    t = (time.perf_counter() - t0) * 1e3      # the cache restarts at 0
    steps = []
    for _ in range(cfg.new_tokens - 1):
      t0 = time.perf_counter()
      tok = jax.block_until_ready(gen.step(tok))
      steps.append((time.perf_counter() - t0) * 1e3)
    # The same steps in one compiled loop: no host round trip per token.
    tok = gen.prefill(prompts, lengths)
    t0 = time.perf_counter()
    jax.block_until_ready(gen.decode_loop(tok, cfg.new_tokens - 1))
    loop = (time.perf_counter() - t0) * 1e3 / (cfg.new_tokens - 1)
    if rep >= cfg.warmup:
      ttft.append(t)
      tpot.append(statistics.median(steps[1:]))
      tpot_loop.append(loop)
  stats_gen = models.Generator(model, batch=b, max_len=max_len,
                               threshold=point["prefill"],
                               decode_threshold=point["decode"],
                               return_stats=True)
  tok, sk, vi = stats_gen.prefill(prompts, lengths)
  dsk = dvi = 0.0
  for _ in range(cfg.new_tokens - 1):
    tok, s, v = stats_gen.step(tok)
    dsk, dvi = dsk + float(s), dvi + float(v)
  return {"ttft_ms": statistics.median(ttft),
          "tpot_ms": statistics.median(tpot),
          "tpot_loop_ms": statistics.median(tpot_loop),
          "ttft_samples_ms": ttft, "tpot_samples_ms": tpot,
          "tpot_loop_samples_ms": tpot_loop,
          "prefill_sparsity": float(sk) / max(float(vi), 1.0),
          "decode_sparsity": dsk / max(dvi, 1.0)}


def time_attention(inputs, point: dict, cfg) -> dict:
  """The attention alone (all layers in one call), prefill and one decode
  step at the prompt's length, with the model's tiles; cuDNN dense."""
  qs = [x.q for x in inputs]
  ks = [x.k for x in inputs]
  vs = [x.v for x in inputs]
  b, t = qs[0].shape[:2]
  lengths = jnp.full((b,), t, jnp.int32)
  time_ms = lambda f, *a: testing.median_time_ms(  # pylint: disable=g-long-lambda
      f, *a, warmup=2, iters=cfg.repeats)

  @jax.jit
  def prefill(qs, ks, vs):
    return [bj.attention(q, k, v, threshold=point["prefill"], causal=True,
                         block_q=cfg.block_q, block_kv=cfg.block_kv)
            for q, k, v in zip(qs, ks, vs)]

  @jax.jit
  def decode(qs, ks, vs):
    return [bj.decode_attention(q[:, -1], k, v, lengths,
                                threshold=point["decode"])
            for q, k, v in zip(qs, ks, vs)]

  out = {"prefill_attention_ms": time_ms(prefill, qs, ks, vs),
         "decode_attention_ms": time_ms(decode, qs, ks, vs)}
  if point["prefill"] == 0 and jax.default_backend() == "gpu":
    @jax.jit
    def cudnn(qs, ks, vs):
      return [jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                           implementation="cudnn")
              for q, k, v in zip(qs, ks, vs)]
    try:
      out["cudnn_prefill_attention_ms"] = time_ms(cudnn, qs, ks, vs)
    except Exception as e:  # pylint: disable=broad-except
      out["cudnn_error"] = harness.error_text(e)
  return out


def plot(result: dict, path: str) -> None:
  rows = result["rows"]
  fig, axes = harness.figure(1, 2, (12, 4.5))
  labels = [f"B{r['batch']}\n{r['label']}" for r in rows]
  x = np.arange(len(rows))
  for ax, total, attn, title in (
      (axes[0], "ttft_ms", "prefill_attention_ms",
       f"Time to first token ({result['prompt_len']} tokens)"),
      (axes[1], "tpot_loop_ms", "decode_attention_ms",
       "Time per output token (compiled loop; dots: one call per token)")):
    tot = np.array([r[total] for r in rows])
    att = np.minimum([r[attn] for r in rows], tot)
    ax.bar(x, att, color="tab:orange", label="attention alone")
    ax.bar(x, tot - att, bottom=att, color="tab:blue",
           label="rest of the step")
    for xi, r in zip(x, rows):
      sp = r["prefill_sparsity"] if total == "ttft_ms" else r[
          "decode_sparsity"]
      ax.text(xi, r[total], f"{r[total]:.3g} ms\n{sp:.0%} skipped",
              ha="center", va="bottom", fontsize=7)
    if total == "tpot_loop_ms":
      ax.plot(x, [r["tpot_ms"] for r in rows], "ko", ms=4)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.suptitle(f"{result['model']['file']} generate() on "
               f"{result['device_kind']}")
  harness.save_figure(fig, path)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  bench = harness.start(cfg, stem="generate")
  model, tok, model_record = pretrained.load_model(cfg, cfg.output_dir)
  texts = pretrained.load_texts(cfg, tok)
  prompt_len = cfg.context - cfg.new_tokens
  windows, _ = lm_eval.perplexity_windows(
      texts["eval"], prompt_len, source="documents"
      if any(d.size > prompt_len for d in texts["eval"]) else "stream",
      max_windows=max(cfg.batch_sizes))
  points = operating_points(cfg)
  print(f"model {model_record['file']}; prompt {prompt_len} tokens + "
        f"{cfg.new_tokens} new; points: "
        + "; ".join(f"{p['label']} (prefill λ {p['prefill']:.3g}, decode λ "
                    f"{p['decode']:.3g})" for p in points), flush=True)
  rows = []
  for batch in cfg.batch_sizes:
    prompts = windows[:batch, :prompt_len]
    inputs = list(analysis.capture_attention_inputs(
        model, jnp.asarray(prompts)).values())
    for point in points:
      row = {"batch": int(batch), "label": point["label"],
             "prefill_threshold": point["prefill"],
             "decode_threshold": point["decode"]}
      row.update(time_generation(model, prompts, point, cfg))
      row.update(time_attention(inputs, point, cfg))
      row["prefill_attention_share"] = row["prefill_attention_ms"] / row[
          "ttft_ms"]
      row["decode_attention_share"] = row["decode_attention_ms"] / row[
          "tpot_loop_ms"]
      rows.append(row)
      print(f"B{batch} {point['label']:<22} TTFT {row['ttft_ms']:8.2f} ms "
            f"(attention {row['prefill_attention_ms']:.2f} ms, "
            f"{row['prefill_sparsity']:.0%} skipped)  TPOT "
            f"{row['tpot_ms']:.3f} ms, loop {row['tpot_loop_ms']:.3f} ms "
            f"(attention "
            f"{row['decode_attention_ms']:.3f} ms, "
            f"{row['decode_sparsity']:.0%} skipped)"
            + (f"  cuDNN prefill attention "
               f"{row['cudnn_prefill_attention_ms']:.2f} ms"
               if "cudnn_prefill_attention_ms" in row else ""), flush=True)
    del inputs
  for row in rows:
    dense = next(r for r in rows if r["batch"] == row["batch"]
                 and r["label"] == "dense")
    row["ttft_speedup"] = dense["ttft_ms"] / row["ttft_ms"]
    row["tpot_speedup"] = dense["tpot_ms"] / row["tpot_ms"]
    row["tpot_loop_speedup"] = dense["tpot_loop_ms"] / row["tpot_loop_ms"]
  bench.result.update(config=cfg.to_dict(), model=model_record,
                      text=texts["record"]["eval"], prompt_len=prompt_len,
                      points=points, rows=rows)
  bench.finish(plot)


if __name__ == "__main__":
  app.run(main)
