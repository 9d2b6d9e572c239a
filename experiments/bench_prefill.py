r"""Prefill speed: skip-softmax kernel against cuDNN, XLA and itself dense.

Runs every implementation in the same process on the same inputs (the
sink + local-window pattern of `blasst_jax.patterns`), prints the device kind
and jax version, and writes a JSON table and a PNG beside it.

    python experiments/bench_prefill.py --config=configs/bench_prefill.py

Rows: impl, causal, batch, seq_len, q_heads, kv_heads, head_dim, dtype,
threshold, sparsity, time_ms, tflops, dense_equiv_tflops. `tflops` counts the
FLOPs actually executed (q·kᵀ for every visited block, P·V only for kept
blocks); `dense_equiv_tflops` is dense FLOPs / time.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import blasst_jax as bj  # pylint: disable=g-import-not-at-top
from blasst_jax import analysis
from blasst_jax import testing
from blasst_jax.kernels import pallas_mosaic
from blasst_jax.kernels import pallas_triton

KERNELS = ("pallas_triton", "pallas_mosaic")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_prefill.py")


def shape_of(t) -> testing.AttentionShape:
  b, s, hq, hkv, d = t
  return testing.AttentionShape(batch=b, q_len=s, kv_len=s, q_heads=hq,
                                kv_heads=hkv, head_dim=d)


def make_inputs(cfg, shape, seed):
  return shape.inputs(jax.random.PRNGKey(seed), pattern="sink_local",
                      dtype=jnp.dtype(cfg.dtype), **cfg.pattern.to_dict())


def ours(cfg, causal, *, block_q, block_kv, kernel_config, implementation):
  """jit-ed call of bj.attention with a traced λ (one compile per shape)."""
  def fn(q, k, v, thr):
    return bj.attention(q, k, v, threshold=thr, causal=causal,
                        implementation=implementation, return_stats=True,
                        block_q=block_q, block_kv=block_kv,
                        kernel_config=kernel_config)
  return jax.jit(fn)


def baseline(name, causal):
  impl = {"cudnn": "cudnn", "xla": "xla"}[name]
  return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation=impl))


def row(impl, causal, shape, dtype, threshold, sparsity, t_ms, *, skip=True):
  dense = shape.flops(causal)
  executed = dense * (1 - 0.5 * sparsity) if skip else dense
  return dict(impl=impl, causal=causal, batch=shape.batch,
              seq_len=shape.q_len, q_heads=shape.q_heads,
              kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype=dtype,
              threshold=threshold, sparsity=round(float(sparsity), 4),
              time_ms=round(t_ms, 4), tflops=round(executed / t_ms / 1e9, 2),
              dense_equiv_tflops=round(dense / t_ms / 1e9, 2))


def kernel_options(cfg, impl):
  """(block_q, block_kv, kernel_config) of one of our implementations."""
  if impl == "pallas_triton":
    return cfg.block_q, cfg.block_kv, pallas_triton.TritonConfig(
        cfg.num_warps, cfg.num_stages, cfg.load_v_in_branch)
  if impl == "pallas_mosaic":
    return cfg.mosaic_block_q, cfg.mosaic_block_kv, pallas_mosaic.MosaicConfig(
        num_stages=cfg.mosaic_num_stages)
  return cfg.block_q, cfg.block_kv, None


def run_speed(cfg, on_gpu, save=lambda rows: None):
  """Times every implementation; `save(rows)` after each shape."""
  rows = []
  for i, t in enumerate(cfg.shapes):
    shape = shape_of(t)
    q, k, v = make_inputs(cfg, shape, cfg.seed + i)
    for causal in cfg.causal:
      for impl in cfg.impls:
        tag = f"[{shape.name} causal={causal}] {impl}"
        if impl in ("cudnn", "xla"):
          if impl == "cudnn" and not on_gpu:
            print(f"{tag}: skipped (no GPU)")
            continue
          if impl == "xla" and shape.q_len > cfg.xla_max_seq_len:
            print(f"{tag}: skipped (seq_len > xla_max_seq_len)")
            continue
          try:
            t_ms = testing.median_time_ms(baseline(impl, causal), q, k, v,
                           warmup=cfg.warmup, iters=cfg.iters)
          except Exception as e:  # e.g. XLA out of memory at long lengths.
            print(f"{tag}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
          rows.append(row(impl, causal, shape, cfg.dtype, 0.0, 0.0, t_ms,
                          skip=False))
          print(f"{tag}: {t_ms:.3f} ms  {rows[-1]['tflops']} TFLOP/s",
                flush=True)
          continue
        if impl == "pallas_mosaic" and not on_gpu:
          print(f"{tag}: skipped (no GPU)")
          continue
        bq, bkv, kcfg = kernel_options(cfg, impl)
        fn = ours(cfg, causal, block_q=bq, block_kv=bkv, kernel_config=kcfg,
                  implementation=impl)
        if impl in KERNELS:
          # λ = 0 known at trace time: the build without the skip check.
          dense_fn = jax.jit(functools.partial(
              bj.attention, threshold=0.0, causal=causal, implementation=impl,
              block_q=bq, block_kv=bkv, kernel_config=kcfg))
          t_ms = testing.median_time_ms(dense_fn, q, k, v, warmup=cfg.warmup, iters=cfg.iters)
          rows.append(row(f"{impl}_noskip", causal, shape, cfg.dtype,
                          0.0, 0.0, t_ms, skip=False))
          print(f"{tag} built without skip check: {t_ms:.3f} ms  "
                f"{rows[-1]['tflops']} TFLOP/s", flush=True)
        for thr in [0.0, *cfg.thresholds]:
          thr_arr = jnp.float32(thr)
          _, stats = fn(q, k, v, thr_arr)
          sparsity = float(stats.total_sparsity)
          t_ms = testing.median_time_ms(fn, q, k, v, thr_arr, warmup=cfg.warmup,
                         iters=cfg.iters)
          rows.append(row(impl, causal, shape, cfg.dtype, thr, sparsity, t_ms))
          print(f"{tag} λ={thr:g}: sparsity {sparsity:.3f}  {t_ms:.3f} ms  "
                f"{rows[-1]['dense_equiv_tflops']} dense-equiv TFLOP/s",
                flush=True)
    save(rows)
  return rows


def run_tuning(cfg):
  if not cfg.run_tuning or not cfg.tuning:
    return []
  shape = shape_of(cfg.tuning_shape)
  q, k, v = make_inputs(cfg, shape, cfg.seed)
  out = []
  for causal in cfg.causal:
    for bq, bkv, warps, stages, vin in cfg.tuning:
      kcfg = pallas_triton.TritonConfig(warps, stages, vin)
      fn = ours(cfg, causal, block_q=bq, block_kv=bkv, kernel_config=kcfg,
                implementation="pallas_triton")
      for thr in (0.0, cfg.thresholds[2]):
        thr_arr = jnp.float32(thr)
        try:
          _, stats = fn(q, k, v, thr_arr)
          t_ms = testing.median_time_ms(fn, q, k, v, thr_arr, warmup=cfg.warmup,
                         iters=cfg.iters)
        except Exception as e:  # A config Triton cannot compile.
          print(f"tuning {bq}x{bkv} w{warps} s{stages} vin={vin}: failed: "
                f"{type(e).__name__}: {str(e)[:200]}")
          continue
        r = row("pallas_triton", causal, shape, cfg.dtype, thr,
                float(stats.total_sparsity), t_ms)
        r.update(block_q=bq, block_kv=bkv, num_warps=warps,
                 num_stages=stages, load_v_in_branch=vin)
        out.append(r)
        print(f"tuning causal={causal} {bq}x{bkv} w{warps} s{stages} "
              f"vin={vin} λ={thr:g}: sparsity {r['sparsity']:.3f} "
              f"{t_ms:.3f} ms {r['dense_equiv_tflops']} TFLOP/s", flush=True)
  return out


def run_checks(cfg, on_gpu):
  """Kernel against the oracle (outputs and skip counts) and cuDNN."""
  shape = shape_of(cfg.check_shape)
  q, k, v = make_inputs(cfg, shape, cfg.seed + 100)
  checks = []
  kernels = [i for i in cfg.impls if i in KERNELS
             and (on_gpu or i == "pallas_triton")]
  for impl, causal in itertools.product(kernels, cfg.causal):
    for thr in (0.0, cfg.thresholds[min(2, len(cfg.thresholds) - 1)]):
      bq, bkv, kcfg = kernel_options(cfg, impl)
      common = dict(threshold=thr, causal=causal, return_stats=True,
                    block_q=bq, block_kv=bkv)
      out, stats = bj.attention(q, k, v, implementation=impl,
                                kernel_config=kcfg, **common)
      ref, ref_stats = bj.attention(q, k, v, implementation="reference",
                                    **common)
      dense = bj.reference.dense_attention(q, k, v, causal=causal)
      c = dict(impl=impl, causal=causal, threshold=thr, shape=shape.name,
               sparsity=float(stats.total_sparsity),
               oracle_sparsity=float(ref_stats.total_sparsity),
               skip_count_mismatch=int(jnp.sum(jnp.abs(
                   stats.skipped_blocks - ref_stats.skipped_blocks))),
               **{f"vs_oracle_{k_}": float(v_) for k_, v_ in
                  analysis.error_summary(out, ref).items()},
               **{f"vs_dense_{k_}": float(v_) for k_, v_ in
                  analysis.error_summary(out, dense).items()})
      if on_gpu:
        cud = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                           implementation="cudnn")
        c.update({f"vs_cudnn_{k_}": float(v_) for k_, v_ in
                  analysis.error_summary(out, cud).items()})
      checks.append(c)
      print("check", {k_: (round(v_, 6) if isinstance(v_, float) else v_)
                      for k_, v_ in c.items()}, flush=True)
  return checks


DENSE_LABELS = {
    "pallas_triton": "pallas_triton, λ=0 (skip check on)",
    "pallas_triton_noskip": "pallas_triton, built without check",
    "pallas_mosaic": "pallas_mosaic, λ=0 (skip check on)",
    "pallas_mosaic_noskip": "pallas_mosaic, built without check"}


def seq_label(seq_len: int, causal: bool) -> str:
  size = f"{seq_len // 1024}k" if seq_len >= 1024 else str(seq_len)
  return size + (" causal" if causal else "")


def plot(rows, path):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from blasst_jax import plotting  # pylint: disable=g-import-not-at-top
  kernels = [k_ for k_ in KERNELS if any(r["impl"] == k_ for r in rows)]
  fig = Figure(figsize=(6.5 * (1 + len(kernels)), 5))
  axes = fig.subplots(1, 1 + len(kernels))
  axes = list(np.atleast_1d(axes))
  ax = axes[0]
  groups = sorted({(r["seq_len"], r["causal"]) for r in rows})
  impls = sorted({r["impl"] for r in rows})
  width = 0.8 / max(1, len(impls) + 2)
  for n, impl in enumerate(impls):
    xs, ys = [], []
    for g, (s, c) in enumerate(groups):
      dense = [r for r in rows if r["impl"] == impl and r["seq_len"] == s
               and r["causal"] == c and r["threshold"] == 0.0]
      if dense:
        xs.append(g + n * width)
        ys.append(dense[0]["dense_equiv_tflops"])
    ax.bar(xs, ys, width, color=f"C{n}",
           label=DENSE_LABELS.get(impl, f"{impl} (dense)"))
  for n, kernel in enumerate(kernels):
    best = []
    for g, (s, c) in enumerate(groups):
      sk = [r for r in rows if r["impl"] == kernel and r["seq_len"] == s
            and r["causal"] == c and 0.5 <= r["sparsity"] <= 0.8]
      best.append(max(sk, key=lambda r: r["sparsity"]) if sk else None)
    ax.bar([g + (len(impls) + n) * width for g, b in enumerate(best) if b],
           [b["dense_equiv_tflops"] for b in best if b], width,
           color=f"C{len(impls) + n}", label=f"{kernel}, 50-80% sparse (dense-equiv)")
  ax.set_xticks([g + 0.4 for g in range(len(groups))])
  ax.set_xticklabels([seq_label(s, c) for s, c in groups])
  ax.set_ylabel("TFLOP/s (dense-equivalent)")
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08),
            ncol=2)
  ax.set_title("Prefill forward")
  for ax, kernel in zip(axes[1:], kernels):
    for s, c in groups:
      pts = [r for r in rows if r["impl"] == kernel
             and r["seq_len"] == s and r["causal"] == c]
      dense = [r for r in pts if r["threshold"] == 0.0]
      cud = [r for r in rows if r["impl"] == "cudnn" and r["seq_len"] == s
             and r["causal"] == c]
      if not dense:
        continue
      base = cud[0]["time_ms"] if cud else dense[0]["time_ms"]
      pts = sorted(pts, key=lambda r: r["sparsity"])
      ax.plot([r["sparsity"] for r in pts],
              [base / r["time_ms"] for r in pts], "--" if c else "-",
              marker="o", ms=3,
              label=seq_label(s, c))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("block sparsity (skipped / visited)")
    ax.set_ylabel("speedup over cuDNN dense (own dense off GPU)")
    ax.set_title(f"{kernel}: speedup vs sparsity (λ sweep)\n"
                 "sink + local-window scores")
    ax.legend(fontsize=7, ncol=2)
  plotting.save_figure(fig, path, dpi=120)


def main(argv):
  del argv
  cfg = _CONFIG.value
  header, on_gpu = testing.announce_device()
  output = testing.result_path(cfg.output_dir, cfg.output_name, cfg.stem,
                               header["device_kind"])
  result = dict(**header,
                pattern=dict(name="sink_local", **cfg.pattern.to_dict()),
                block_q=cfg.block_q, block_kv=cfg.block_kv,
                notes=("tflops = executed FLOPs (q·kᵀ on visited blocks, P·V "
                       "on kept blocks) / time; dense_equiv_tflops = dense "
                       "FLOPs / time; times are medians of "
                       f"{cfg.iters} runs after {cfg.warmup} warm-ups."))
  result["checks"] = run_checks(cfg, on_gpu)

  def save(rows, tuning=()):
    result.update(rows=rows, tuning=list(tuning))
    return testing.save_json(result, output)

  result["rows"] = run_speed(cfg, on_gpu, save)
  png = save(result["rows"], run_tuning(cfg))
  plot(result["rows"], png)
  print(f"\nwrote {output} and {png}")
  print(f"{'impl':>14} {'causal':>6} {'seq':>6} {'λ':>7} {'sparsity':>8} "
        f"{'ms':>9} {'TFLOP/s':>8} {'dense-eq':>8}")
  for r in result["rows"]:
    print(f"{r['impl']:>14} {str(r['causal']):>6} {r['seq_len']:>6} "
          f"{r['threshold']:>7g} {r['sparsity']:>8.3f} {r['time_ms']:>9.3f} "
          f"{r['tflops']:>8.1f} {r['dense_equiv_tflops']:>8.1f}")


if __name__ == "__main__":
  app.run(main)
