r"""Prefill speed: skip-softmax kernel against cuDNN, XLA and itself dense.

Runs every implementation in the same process on the same inputs (the
sink + local-window pattern of `blasst_jax.patterns`, and optionally q/k/v
captured from every layer of a pretrained model), prints the device kind
and jax version, and writes a JSON table and a PNG beside it. Skip rows sit
at target block sparsities (λ found by bisection on each input) or at
given λ values.

    python -m experiments.bench_prefill --config=configs/bench_prefill.py
    python -m experiments.bench_prefill --config=configs/bench_prefill.py:h200

A suite split over several runs (`:h200_d128`, `:h200_d64`, `:h200_model`),
or a re-run of part of one, is joined into one table and plot without
measuring anything (`harness.merge_results`: a later file's rows replace the
earlier rows of the inputs it holds):

    python -m experiments.bench_prefill --config.output_dir=benchmarks/results \
        --config.output_name=prefill_h200 \
        --merge=benchmarks/results/prefill_h200.json,rerun/prefill_h200_d128.json

Rows: impl, pattern, causal, batch, seq_len, q_heads, kv_heads, head_dim,
dtype, threshold, target, sparsity, time_ms, tflops, dense_equiv_tflops. `tflops` counts the
FLOPs actually executed (q·kᵀ for every visited block, P·V only for kept
blocks); `dense_equiv_tflops` is dense FLOPs / time.
"""

from __future__ import annotations

import functools
import itertools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from experiments import config_file
from experiments import harness
import blasst_jax as bj
from blasst_jax import analysis
from blasst_jax import testing
from blasst_jax.kernels import pallas_mosaic
from blasst_jax.kernels import pallas_triton

KERNELS = ("pallas_triton", "pallas_mosaic")

_CONFIG = config_flags.DEFINE_config_file("config", config_file("bench_prefill"))
_MERGE = flags.DEFINE_list(
    "merge", [], "Result JSONs to join, in order, into output_dir/"
    "output_name.json (+ PNG) instead of measuring; a later file's rows "
    "replace the earlier rows of the inputs it holds.")


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


def row(impl, causal, shape, dtype, threshold, sparsity, t_ms, *, skip=True,
        pattern="sink_local", target=None):
  dense = shape.flops(causal)
  executed = dense * (1 - 0.5 * sparsity) if skip else dense
  return dict(impl=impl, pattern=pattern, target=target, causal=causal,
              batch=shape.batch,
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
  if impl.startswith("pallas_mosaic"):
    variant = cfg.mosaic_variants.get(impl[len("pallas_mosaic_"):], {})
    return cfg.mosaic_block_q, cfg.mosaic_block_kv, pallas_mosaic.MosaicConfig(
        num_stages=cfg.mosaic_num_stages, **variant)
  return cfg.block_q, cfg.block_kv, None


def implementation_of(impl):
  """"pallas_mosaic_<variant>" runs "pallas_mosaic" with other knobs."""
  return "pallas_mosaic" if impl.startswith("pallas_mosaic") else impl


def time_impls(cfg, on_gpu, q, k, v, shape, causal, *, pattern, thresholds,
               targets=()):
  """Rows of every implementation at one input: the baselines, our builds
  without the skip check and at λ = 0, then skip rows at `targets`
  (bisection, on the first of our kernels in cfg.impls) and `thresholds`."""
  rows = []
  kernels = [i for i in cfg.impls if implementation_of(i) in KERNELS
             and (on_gpu or i == "pallas_triton")]
  lams = [(thr, None) for thr in thresholds]
  for impl in cfg.impls:
    tag = f"[{pattern} {shape.name} causal={causal}] {impl}"
    if impl in ("cudnn", "xla"):
      if impl == "cudnn" and not on_gpu:
        print(f"{tag}: skipped (no GPU)")
        continue
      if impl == "xla" and shape.q_len > cfg.xla_max_seq_len:
        print(f"{tag}: skipped (seq_len > xla_max_seq_len)")
        continue
      try:
        t_ms = harness.time_ms(cfg, baseline(impl, causal), q, k, v)
      except Exception as e:  # e.g. XLA out of memory at long lengths.
        print(f"{tag}: failed: {harness.error_text(e)}")
        continue
      rows.append(row(impl, causal, shape, cfg.dtype, 0.0, 0.0, t_ms,
                      skip=False, pattern=pattern))
      print(f"{tag}: {t_ms:.3f} ms  {rows[-1]['tflops']} TFLOP/s",
            flush=True)
      continue
    if impl not in kernels and impl != "reference":
      print(f"{tag}: skipped (no GPU)")
      continue
    bq, bkv, kcfg = kernel_options(cfg, impl)
    fn = ours(cfg, causal, block_q=bq, block_kv=bkv, kernel_config=kcfg,
              implementation=implementation_of(impl))
    if impl in KERNELS:
      # λ = 0 known at trace time: the build without the skip check.
      dense_fn = jax.jit(functools.partial(
          bj.attention, threshold=0.0, causal=causal, implementation=impl,
          block_q=bq, block_kv=bkv, kernel_config=kcfg))
      t_ms = harness.time_ms(cfg, dense_fn, q, k, v)
      rows.append(row(f"{impl}_noskip", causal, shape, cfg.dtype, 0.0, 0.0,
                      t_ms, skip=False, pattern=pattern))
      print(f"{tag} built without skip check: {t_ms:.3f} ms  "
            f"{rows[-1]['tflops']} TFLOP/s", flush=True)
    if impl == (kernels or [None])[0] and targets:
      found = [testing.find_threshold(fn, (q, k, v), t, steps=cfg.bisection_steps)
               for t in targets]
      lams = [(lam, t) for (lam, _), t in zip(found, targets)] + lams
      print(f"{tag} λ for sparsity {list(targets)}: "
            f"{[f'{lam:.3g}' for lam, _ in found]}", flush=True)
    for thr, target in [(0.0, None)] + lams:
      thr_arr = jnp.float32(thr)
      _, stats = fn(q, k, v, thr_arr)
      sparsity = float(stats.total_sparsity)
      t_ms = harness.time_ms(cfg, fn, q, k, v, thr_arr)
      rows.append(row(impl, causal, shape, cfg.dtype, thr, sparsity, t_ms,
                      pattern=pattern, target=target))
      print(f"{tag} λ={thr:.3g}: sparsity {sparsity:.3f}  {t_ms:.3f} ms  "
            f"{rows[-1]['dense_equiv_tflops']} dense-equiv TFLOP/s",
            flush=True)
  return rows


def run_speed(cfg, on_gpu, save=lambda rows: None):
  """Times every implementation on the sink/local pattern; `save(rows)`
  after each shape."""
  rows = []
  for i, t in enumerate(cfg.shapes):
    shape = shape_of(t)
    q, k, v = make_inputs(cfg, shape, cfg.seed + i)
    for causal in cfg.causal:
      rows += time_impls(cfg, on_gpu, q, k, v, shape, causal,
                         pattern="sink_local", thresholds=cfg.thresholds,
                         targets=cfg.target_sparsities)
      save(rows)
  return rows


def run_real_model(cfg, on_gpu, save=lambda rows: None):
  """The same rows on q/k/v captured from a pretrained model (causal)."""
  rm = cfg.real_model
  if not rm.model_path:
    return []
  from experiments.lm import pretrained  # pylint: disable=g-import-not-at-top
  rows = []
  model = pretrained.load_bench_model(rm, cfg.dtype, cfg.seed, cfg.output_dir)
  for seq_len in rm.seq_lens:
    q, k, v = pretrained.captured_qkv(model, rm, seq_len, cfg.seed)
    b, lq, hq, d = q.shape
    shape = testing.AttentionShape(batch=b, q_len=lq, kv_len=k.shape[1],
                                   q_heads=hq, kv_heads=k.shape[2],
                                   head_dim=d)
    print(f"captured {rm.model_path}: q {q.shape} k {k.shape}", flush=True)
    rows += time_impls(cfg, on_gpu, q, k, v, shape, True,
                       pattern=rm.pattern_name, thresholds=rm.thresholds,
                       targets=cfg.target_sparsities)
    save(rows)
    del q, k, v
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
          t_ms = harness.time_ms(cfg, fn, q, k, v, thr_arr)
        except Exception as e:  # A config Triton cannot compile.
          print(f"tuning {bq}x{bkv} w{warps} s{stages} vin={vin}: failed: "
                f"{harness.error_text(e)}")
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
  kernels = [i for i in cfg.impls if implementation_of(i) in KERNELS
             and (on_gpu or i == "pallas_triton")]
  for impl, causal in itertools.product(kernels, cfg.causal):
    for thr in (0.0, cfg.check_threshold):
      bq, bkv, kcfg = kernel_options(cfg, impl)
      common = dict(threshold=thr, causal=causal, return_stats=True,
                    block_q=bq, block_kv=bkv)
      out, stats = bj.attention(q, k, v, implementation=implementation_of(impl),
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


def group_label(key) -> str:
  pattern, d, seq_len, causal = key
  size = f"{seq_len // 1024}k" if seq_len >= 1024 else str(seq_len)
  name = "" if pattern == "sink_local" else f"{pattern} "
  return f"{name}{size} d{d}" + (" causal" if causal else "")


def group_of(r):
  return (r.get("pattern", "sink_local"), r["head_dim"], r["seq_len"],
          r["causal"])


def speedups(rows, impl, base_impl):
  """{group: [(sparsity, base time / time)]} of impl's skip rows."""
  out = {}
  for g in sorted({group_of(r) for r in rows}):
    base = [r for r in rows if r["impl"] == base_impl and group_of(r) == g]
    if base:
      pts = sorted((r["sparsity"], base[0]["time_ms"] / r["time_ms"])
                   for r in rows if r["impl"] == impl and group_of(r) == g)
      out[g] = pts or None
  return {g: pts for g, pts in out.items() if pts}


def plot(result, path):
  """Speedup against our dense build and against cuDNN, over sparsity: a
  row of panels per head_dim, a colour per input, a line style per build."""
  rows = result["rows"]
  skip_impls = [i for i in sorted({r["impl"] for r in rows})
                if implementation_of(i) in KERNELS
                and not i.endswith("_noskip")]
  head_dims = sorted({r["head_dim"] for r in rows})
  fig, axes = harness.figure(len(head_dims), 2, (13, 4.5 * len(head_dims)),
                             squeeze=False)
  for axes_row, d in zip(axes, head_dims):
    groups = sorted({group_of(r) for r in rows if r["head_dim"] == d})
    for ax, (base, title) in zip(axes_row, [
        (None, "over our dense build (no skip check)"),
        ("cudnn", "over cuDNN dense attention")]):
      for n, impl in enumerate(skip_impls):
        base_impl = base or f"{implementation_of(impl)}_noskip"
        for g, pts in speedups(rows, impl, base_impl).items():
          if g[1] != d:
            continue
          ax.plot(*zip(*pts), ["-", ":", "--", "-."][n % 4], marker="o",
                  ms=3, color=f"C{groups.index(g) % 10}",
                  label=group_label(g) if n == 0 else None)
      for n, impl in enumerate(skip_impls):   # the line styles' key
        ax.plot([], [], ["-", ":", "--", "-."][n % 4], color="k", label=impl)
      ax.axhline(1.0, color="gray", lw=0.8)
      ax.set_xlabel("block sparsity (skipped / visited)")
      ax.set_ylabel("speedup")
      ax.set_title(f"head_dim {d}: speedup {title}", fontsize=10)
      ax.legend(fontsize=7, ncol=2)
  harness.save_figure(fig, path, dpi=110)


def check_key(c):
  return (c["impl"], c["causal"], c["threshold"], c["shape"])


def print_table(rows):
  """Each row's time and its speedups over our dense build and cuDNN."""
  print(f"{'impl':>22} {'input':>22} {'λ':>8} {'sparsity':>8} {'ms':>9} "
        f"{'vs own dense':>12} {'vs cuDNN':>8}")
  for r in rows:
    g = group_of(r)
    base = {i: [x["time_ms"] for x in rows
                if x["impl"] == i and group_of(x) == g]
            for i in ("cudnn", f"{implementation_of(r['impl'])}_noskip")}
    own, cud = (base[f"{implementation_of(r['impl'])}_noskip"],
                base["cudnn"])
    print(f"{r['impl']:>22} {group_label(g):>22} {r['threshold']:>8.3g} "
          f"{r['sparsity']:>8.3f} {r['time_ms']:>9.3f} "
          f"{(own[0] / r['time_ms'] if own else float('nan')):>12.3f} "
          f"{(cud[0] / r['time_ms'] if cud else float('nan')):>8.3f}")


def merge(cfg, paths):
  """Joins result files into one (`harness.merge_results`) and plots it."""
  result = harness.merge_results(paths, row_group=group_of,
                                 check_key=check_key)
  output = testing.result_path(cfg.output_dir, cfg.output_name, cfg.stem,
                               result["device_kind"])
  png = testing.save_json(result, output)
  plot(result, png)
  print(f"merged {len(paths)} results ({len(result['rows'])} rows): wrote "
        f"{output} and {png}")
  print_table(result["rows"])


def main(argv):
  del argv
  cfg = _CONFIG.value
  if _MERGE.value:
    merge(cfg, _MERGE.value)
    return
  bench = harness.start(
      cfg, pattern=dict(name="sink_local", **cfg.pattern.to_dict()),
      block_q=cfg.block_q, block_kv=cfg.block_kv,
      notes=("tflops = executed FLOPs (q·kᵀ on visited blocks, P·V "
             "on kept blocks) / time; dense_equiv_tflops = dense "
             "FLOPs / time; times are medians of "
             f"{cfg.iters} runs after {cfg.warmup} warm-ups."))
  on_gpu, result = bench.on_gpu, bench.result
  result["checks"] = run_checks(cfg, on_gpu)

  def save(rows):   # the tuning sweep, if any, runs last
    return bench.save(rows=rows, tuning=[])

  result["rows"] = run_speed(cfg, on_gpu, save)
  synthetic = result["rows"]
  result["rows"] = synthetic + run_real_model(
      cfg, on_gpu, lambda rows: save(synthetic + rows))
  result["tuning"] = run_tuning(cfg)
  print()   # the summary below stands apart from the progress lines
  bench.finish(plot)
  print_table(result["rows"])


if __name__ == "__main__":
  app.run(main)
