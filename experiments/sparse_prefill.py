r"""Sparse prefill: dense, skip-softmax, XAttention selection, and both.

    python -m experiments.sparse_prefill --config=configs/sparse_prefill.py:all

For each method of the config, on the same (q, k, v): the XAttention mask
(if any; its estimate timed on its own), attention with the method's λ and
mask, and per head and overall: mask sparsity (blocks the mask removes of
those the causal mask allows), skip sparsity (skipped / visited), combined
sparsity, and the relative L2 error against dense attention. On a GPU also
the time of the estimate, of the attention and of cuDNN's dense attention
in the same process, the estimate alone per stride (XLA and the fused kernel
with each tuning), and which methods lie on the error/speed Pareto front.
Writes JSON (+ PNG) to --config.output.
"""

from __future__ import annotations

import dataclasses

from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import config_file
from experiments import harness
import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import xattention
from blasst_jax.kernels import xattention_triton

_CONFIG = config_flags.DEFINE_config_file("config", config_file("sparse_prefill"))


def make_inputs(cfg):
  b, s, hq, hkv, d = cfg.shape
  return patterns.sink_local_qkv(
      jax.random.PRNGKey(cfg.seed), batch=b, seq_len=s, q_heads=hq,
      kv_heads=hkv, head_dim=d, dtype=jnp.dtype(cfg.dtype),
      **cfg.pattern.to_dict())


def dense_output(cfg, q, k, v, on_gpu):
  if on_gpu:
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=cfg.causal, implementation="cudnn"))(q, k, v)
  return bj.reference.dense_attention(q, k, v, causal=cfg.causal)


def rel_error_per_head(out, dense):
  """||out - dense|| / ||dense|| per q head (f32), over batch and tokens."""
  o, r = out.astype(jnp.float32), dense.astype(jnp.float32)
  num = jnp.sqrt(jnp.sum((o - r) ** 2, axis=(0, 1, 3)))
  return num / jnp.maximum(jnp.sqrt(jnp.sum(r ** 2, axis=(0, 1, 3))), 1e-30)


def run_method(cfg, method, q, k, v, dense, on_gpu):
  estimate = None
  if method.xattention_threshold is not None:
    estimate = jax.jit(lambda q, k: xattention.select_blocks(
        q, k, block_size=cfg.block_size, stride=cfg.stride,
        threshold=method.xattention_threshold, causal=cfg.causal,
        keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal))
  lam = method.skip_threshold

  def attend(q, k, v, mask):
    # Tiles follow the mask's blocks (the Hopper kernel cuts them into its
    # 64 x 128 tiles); the implementation is the default unless configured.
    return bj.attention(q, k, v, causal=cfg.causal,
                        threshold=lam if lam else 0.0, block_mask=mask,
                        implementation=cfg.implementation, return_stats=True)
  attend = jax.jit(attend)
  mask = estimate(q, k) if estimate else None
  out, stats = attend(q, k, v, mask)
  visited = np.asarray(stats.visited_blocks, np.float64)     # [b, hq]
  skipped = np.asarray(stats.skipped_blocks, np.float64)
  masked = (np.asarray(stats.masked_blocks, np.float64)
            if stats.masked_blocks is not None else np.zeros_like(visited))
  allowed = np.maximum(visited + masked, 1)
  err = np.asarray(rel_error_per_head(out, dense))
  row = dict(
      method=method.name, xattention_threshold=method.xattention_threshold,
      skip_threshold=lam,
      mask_sparsity=float(masked.sum() / allowed.sum()),
      skip_sparsity=float(skipped.sum() / np.maximum(visited.sum(), 1)),
      combined_sparsity=float((masked + skipped).sum() / allowed.sum()),
      rel_error=float(np.sqrt(np.mean(err ** 2))),
      per_head=dict(
          mask_sparsity=(masked.sum(0) / allowed.sum(0)).round(4).tolist(),
          skip_sparsity=(skipped.sum(0) / np.maximum(visited.sum(0), 1))
          .round(4).tolist(),
          combined_sparsity=((masked + skipped).sum(0) / allowed.sum(0))
          .round(4).tolist(),
          rel_error=err.tolist()))
  if on_gpu:
    row["attention_ms"] = harness.time_ms(cfg, attend, q, k, v, mask)
    row["estimate_ms"] = (harness.time_ms(cfg, estimate, q, k)
                          if estimate else 0.0)
    row["total_ms"] = row["attention_ms"] + row["estimate_ms"]
  return row


def time_estimates(cfg, q, k):
  """The block-score estimate alone: XLA and each kernel tuning, per stride
  (GPU). Returns rows of {stride, implementation, config, ms}."""
  rows = []
  for stride in cfg.estimate.strides:
    options = [("xla", None)] + [
        ("pallas_triton", xattention_triton.EstimateConfig(*c))
        for c in cfg.estimate.kernel_configs]
    for implementation, config in options:
      fn = jax.jit(lambda q, k, i=implementation, c=config, s=stride:
                   xattention.block_scores(
                       q, k, block_size=cfg.block_size, stride=s,
                       causal=cfg.causal, implementation=i, config=c))
      try:
        ms = harness.time_ms(cfg, fn, q, k)
      except Exception as e:  # pylint: disable=broad-except
        print(f"estimate stride {stride} {implementation} {config}: "
              f"failed: {harness.error_text(e)}", flush=True)
        continue
      rows.append(dict(stride=stride, implementation=implementation,
                       config=None if config is None else list(
                           dataclasses.astuple(config)), ms=ms))
      print(f"estimate stride {stride} {implementation} {config or ''}: "
            f"{ms:.3f} ms", flush=True)
  return rows


def pareto(rows):
  """Names of the methods no other method beats on both speed (incl. the
  estimate) and error."""
  front = []
  for r in rows:
    dominated = any(
        o is not r and o["total_ms"] <= r["total_ms"]
        and o["rel_error"] <= r["rel_error"]
        and (o["total_ms"] < r["total_ms"] or o["rel_error"] < r["rel_error"])
        for o in rows)
    if not dominated:
      front.append(r["method"])
  return front


def family(name: str) -> str:
  return name.split(" ")[0]


def plot(result, path):
  rows = result["rows"]
  fig, axes = harness.figure(1, 4, (21, 4.5))
  names = [r["method"] for r in rows]
  x = np.arange(len(rows))
  axes[0].bar(x - 0.2, [r["mask_sparsity"] for r in rows], 0.4,
              label="removed by the XAttention mask")
  axes[0].bar(x + 0.2, [r["combined_sparsity"] for r in rows], 0.4,
              label="combined (mask + skipped)")
  axes[0].set_xticks(x, names, rotation=60, ha="right", fontsize=6)
  axes[0].set_ylabel("fraction of causal blocks")
  axes[0].legend(fontsize=7)
  for r in rows:
    axes[1].plot(r["per_head"]["combined_sparsity"],
                 np.maximum(r["per_head"]["rel_error"], 1e-8), "o",
                 label=r["method"])
  axes[1].set_yscale("log")
  axes[1].set_xlabel("combined block sparsity (per head)")
  axes[1].set_ylabel("relative L2 error vs dense")
  axes[1].legend(fontsize=7)
  if "cudnn_ms" in result:
    speed = [result["cudnn_ms"] / r["total_ms"] for r in rows]
    attn = [result["cudnn_ms"] / r["attention_ms"] for r in rows]
    axes[2].bar(x - 0.2, speed, 0.4, label="incl. the mask estimate")
    axes[2].bar(x + 0.2, attn, 0.4, label="attention only")
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[2].set_xticks(x, names, rotation=60, ha="right", fontsize=6)
    axes[2].set_ylabel("speed vs cuDNN dense")
    axes[2].legend(fontsize=7)
    for fam, marker in (("dense", "s"), ("blasst", "o"), ("xattention", "^"),
                        ("combined", "D")):
      pts = [r for r in rows if family(r["method"]) == fam]
      axes[3].plot([max(r["rel_error"], 1e-6) for r in pts],
                   [result["cudnn_ms"] / r["total_ms"] for r in pts], marker,
                   label=fam, ls="none")
    for r in rows:
      if r["method"] in result.get("pareto", ()):
        axes[3].annotate(r["method"], (max(r["rel_error"], 1e-6),
                                       result["cudnn_ms"] / r["total_ms"]),
                         fontsize=5)
    axes[3].set_xscale("log")
    axes[3].axhline(1.0, color="gray", lw=0.8)
    axes[3].set_xlabel("relative L2 error vs dense")
    axes[3].set_ylabel("speed vs cuDNN (incl. estimate)")
    axes[3].set_title("error / speed (Pareto front labelled)", fontsize=8)
    axes[3].legend(fontsize=7)
  else:
    for ax in axes[2:]:
      ax.set_axis_off()
    axes[2].text(0.5, 0.5, "speed: GPU only", ha="center")
  b, s, hq, hkv, d = result["shape"]
  fig.suptitle(f"sparse prefill b{b} s{s} hq{hq} hkv{hkv} d{d} "
               f"{result['device_kind']}")
  harness.save_figure(fig, path)


def main(argv):
  del argv
  cfg = _CONFIG.value
  bench = harness.start(cfg, shape=list(cfg.shape), dtype=cfg.dtype,
                        causal=cfg.causal, implementation=cfg.implementation,
                        block_size=cfg.block_size, stride=cfg.stride,
                        pattern=cfg.pattern.to_dict(), rows=[])
  on_gpu, result = bench.on_gpu, bench.result
  q, k, v = make_inputs(cfg)
  dense = dense_output(cfg, q, k, v, on_gpu)
  if on_gpu:
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=cfg.causal, implementation="cudnn"))
    result["cudnn_ms"] = harness.time_ms(cfg, cudnn, q, k, v)
    print(f"cuDNN dense: {result['cudnn_ms']:.3f} ms", flush=True)
  for method in cfg.methods:
    row = run_method(cfg, method, q, k, v, dense, on_gpu)
    timing = (f" estimate {row['estimate_ms']:.3f} ms attention "
              f"{row['attention_ms']:.3f} ms ({result['cudnn_ms'] / row['total_ms']:.2f}x "
              "cuDNN)" if on_gpu else "")
    bench.add(row, f"{method.name}: mask {row['mask_sparsity']:.3f} skip "
              f"{row['skip_sparsity']:.3f} combined "
              f"{row['combined_sparsity']:.3f} rel_error "
              f"{row['rel_error']:.2e}{timing}")
  if on_gpu:
    result["pareto"] = pareto(result["rows"])
    print("error/speed Pareto front: " + "; ".join(result["pareto"]))
    result["estimate"] = time_estimates(cfg, q, k)
    dense_ms = [r["attention_ms"] for r in result["rows"]
                if r["method"] == "dense"]
    for r in result["estimate"]:
      r["fraction_of_cudnn"] = r["ms"] / result["cudnn_ms"]
      if dense_ms:
        r["fraction_of_dense"] = r["ms"] / dense_ms[0]
  bench.finish(plot)


if __name__ == "__main__":
  app.run(main)
