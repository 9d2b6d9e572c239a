r"""Decode speed: skip-softmax decode against cuDNN, XLA, jax's Pallas decode
kernel and a plain copy of the KV cache, in one process on the same cache.

    python -m experiments.bench_decode --config=configs/bench_decode.py

Rows: impl, batch, q_heads, kv_heads, seq_len, head_dim, dtype, threshold,
mode, splits, sparsity, time_us, bytes_read, effective_tbps (dense K+V bytes
/ time), read_tbps (bytes actually read / time; for "copy" bytes read +
written).
"""

from __future__ import annotations


from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from experiments import config_file
from experiments import harness
import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import testing

_CONFIG = config_flags.DEFINE_config_file("config", config_file("bench_decode"))


def time_us(cfg, fn, *args) -> float:
  """Median µs of fn(*args), `cfg.reps` calls queued per sample (a step
  takes microseconds: host dispatch would dominate one call)."""
  return 1e3 * harness.time_ms(cfg, fn, *args, reps=cfg.reps)


def make_cache(cfg, shape, seed, pattern="sink_local"):
  """The newest query and a full cache of `pattern`: "sink_local"
  (`cfg.pattern`) or "scattered" (`cfg.scattered`, relevant blocks
  scattered over the context)."""
  b, hq, hkv, s, d = shape
  common = dict(batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d,
                dtype=jnp.dtype(cfg.dtype))
  key = jax.random.PRNGKey(seed)
  if pattern == "sink_local":
    q, k, v = patterns.sink_local_qkv(key, **common, **cfg.pattern.to_dict())
  elif pattern == "scattered":
    q, k, v = patterns.scattered_qkv(key, **common, block=cfg.block_kv,
                                     **cfg.scattered.to_dict())
  else:
    raise ValueError(f"Unknown pattern {pattern!r}: use 'sink_local' or "
                     "'scattered'.")
  return q[:, -1], k, v, jnp.full((b,), s, jnp.int32)


def baselines(name):
  if name == "copy":
    return jax.jit(lambda q, k, v, lengths: (jnp.copy(k), jnp.copy(v)))
  if name == "cudnn":
    return jax.jit(lambda q, k, v, lengths: jax.nn.dot_product_attention(
        q[:, None], k, v, key_value_seq_lengths=lengths,
        implementation="cudnn"))
  if name == "xla":
    return jax.jit(lambda q, k, v, lengths: bj.reference.dense_attention(
        q[:, None], k, v, kv_lengths=lengths))
  if name == "jax_pallas":
    from jax.experimental.pallas.ops.gpu import decode_attention  # pylint: disable=g-import-not-at-top
    return jax.jit(lambda q, k, v, lengths: decode_attention.gqa(
        q, k, v, kv_seq_len=lengths))
  raise ValueError(name)


def row(impl, shape, dtype, threshold, mode, splits, sparsity, t_us,
        bytes_read, skip_check=False, pattern="sink_local", target=None,
        cache_dtype=None):
  """One timing; effective_tbps counts the dense cache in `dtype` (an FP8
  cache's rows too, so that speeds compare at equal length)."""
  b, hq, hkv, s, d = shape
  dense = 2 * b * s * hkv * d * jnp.dtype(dtype).itemsize
  return dict(impl=impl, pattern=pattern, target_sparsity=target,
              cache_dtype=cache_dtype or dtype,
              batch=b, q_heads=hq, kv_heads=hkv, seq_len=s,
              head_dim=d, dtype=dtype, threshold=threshold, mode=mode,
              splits=splits, skip_check=skip_check,
              sparsity=round(float(sparsity), 4),
              time_us=round(t_us, 2), bytes_read=float(bytes_read),
              effective_tbps=round(dense / t_us / 1e6, 3),
              read_tbps=round(float(bytes_read) / t_us / 1e6, 3))


def ours(cfg, impl, splits, max_mode, block_kv=None, kernel_config=None,
         dense=False, stats=True):
  """Jitted decode, returning (out, stats), or out alone without `stats`;
  `dense` builds the kernel without the skip check (λ is a static 0 then,
  and the threshold argument is ignored)."""
  def fn(q, k, v, lengths, thr, k_scale=None, v_scale=None):
    return bj.decode_attention(q, k, v, lengths,
                               threshold=0.0 if dense else thr,
                               block_kv=block_kv or cfg.block_kv,
                               num_splits=splits, max_mode=max_mode,
                               implementation=impl, return_stats=stats,
                               kernel_config=kernel_config, k_scale=k_scale,
                               v_scale=v_scale)
  return jax.jit(fn)


def run_split_sweep(cfg):
  """Time against the split count, dense and skipping ("anchored")."""
  out = []
  for i in cfg.split_sweep.shapes:
    shape = tuple(cfg.shapes[i])
    q, k, v, lengths = make_cache(cfg, shape, cfg.seed + i)
    for splits in cfg.split_sweep.splits:
      if splits > -(-shape[3] // cfg.block_kv):
        continue
      fns = {dense: ours(cfg, "pallas_triton", splits, cfg.split_sweep.mode,
                         dense=dense) for dense in (False, True)}
      for thr in cfg.split_sweep.thresholds:
        fn = fns[thr == 0]
        thr_arr = jnp.float32(thr)
        _, stats = fn(q, k, v, lengths, thr_arr)
        t = time_us(cfg, fn, q, k, v, lengths, thr_arr)
        r = row("pallas_triton", shape, cfg.dtype, thr, cfg.split_sweep.mode,
                splits, stats.total_sparsity, t, jnp.sum(stats.bytes_read),
                skip_check=thr != 0)
        out.append(r)
        print(f"splits s{shape[3]} b{shape[0]} splits={splits} λ={thr:g}: "
              f"sparsity {r['sparsity']:.3f} {t:.1f} us "
              f"{r['effective_tbps']} TB/s", flush=True)
  return out


def run_tuning(cfg):
  """Kernel knobs (block_kv, num_warps, num_stages, prefetch_v) on the dense
  build and on "anchored" skipping at cfg.tuning_thresholds."""
  from blasst_jax.kernels import decode_triton  # pylint: disable=g-import-not-at-top
  out = []
  for i in cfg.tuning_shapes:
    shape = tuple(cfg.shapes[i])
    q, k, v, lengths = make_cache(cfg, shape, cfg.seed + i)
    for bkv, warps, stages, prefetch in cfg.tuning:
      kernel_config = decode_triton.DecodeConfig(warps, stages, prefetch)
      fns = {dense: ours(cfg, "pallas_triton", None, "anchored", block_kv=bkv,
                         kernel_config=kernel_config, dense=dense)
             for dense in (False, True)}
      for thr in [0.0, *cfg.tuning_thresholds]:
        fn = fns[thr == 0]
        thr_arr = jnp.float32(thr)
        _, stats = fn(q, k, v, lengths, thr_arr)
        t = time_us(cfg, fn, q, k, v, lengths, thr_arr)
        r = row("pallas_triton", shape, cfg.dtype, thr, "anchored",
                bj.decode.default_num_splits(shape[0], shape[2], shape[3],
                                             bkv),
                stats.total_sparsity, t, jnp.sum(stats.bytes_read),
                skip_check=thr != 0)
        r.update(block_kv=bkv, num_warps=warps, num_stages=stages,
                 prefetch_v=prefetch)
        out.append(r)
        print(f"tuning s{shape[3]} b{shape[0]} bkv={bkv} w{warps} s{stages} "
              f"prefetch={prefetch} λ={thr:g}: sparsity {r['sparsity']:.3f} "
              f"{t:.1f} us {r['effective_tbps']} TB/s", flush=True)
  return out


def run(cfg, on_gpu, save=lambda rows: None):
  """Rows of every shape and pattern, then of the real model's caches;
  `save(rows)` after each cache."""
  rows = []
  for i, shape in enumerate(cfg.shapes):
    for pattern in cfg.patterns:
      cache = make_cache(cfg, tuple(shape), cfg.seed + i, pattern)
      rows += run_cache(cfg, on_gpu, tuple(shape), cache, pattern)
      save(rows)
  rm = cfg.real_model
  if rm.model_path:
    from experiments.lm import pretrained  # pylint: disable=g-import-not-at-top
    model = pretrained.load_bench_model(rm, cfg.dtype, cfg.seed,
                                        cfg.output_dir)
    for seq_len in rm.seq_lens:
      q, k, v = pretrained.captured_qkv(model, rm, seq_len, cfg.seed)
      q = q[:, -1]   # the newest token against every layer's cache
      shape = (q.shape[0], q.shape[1], k.shape[2], seq_len, q.shape[2])
      print(f"captured {rm.model_path}: q {q.shape} cache {k.shape}",
            flush=True)
      cache = (q, k, v, jnp.full((q.shape[0],), seq_len, jnp.int32))
      rows += run_cache(cfg, on_gpu, shape, cache, rm.pattern_name)
      save(rows)
      del q, k, v, cache
  return rows


def run_cache(cfg, on_gpu, shape, cache, pattern):
  """Rows of every implementation on one cache: the baselines, then each
  (mode, splits) of our kernels dense, at λ = 0, at the λ found for each of
  `cfg.target_sparsities` (bisection on the first kernel) and at
  `cfg.thresholds`."""
  rows = []
  q, k, v, lengths = cache
  # FP8 runs: the same cache quantized per KV head.
  k8, k_scale = bj.decode.quantize_cache(k) if cfg.fp8_impls else (k, None)
  v8, v_scale = bj.decode.quantize_cache(v) if cfg.fp8_impls else (v, None)
  dense_bytes = 2 * k.size * k.dtype.itemsize
  tag = f"[{pattern} b{shape[0]} hq{shape[1]} hkv{shape[2]} s{shape[3]}]"
  lams = None   # [(λ, target)], found once per cache
  runs = [(impl, False) for impl in cfg.impls] + [
      (impl, True) for impl in cfg.fp8_impls]
  for impl, fp8 in runs:
    cache_args = (q, k8, v8, lengths) if fp8 else (q, k, v, lengths)
    scales = (k_scale, v_scale) if fp8 else ()
    cache_dtype = "float8_e4m3fn" if fp8 else cfg.dtype
    if impl in ("copy", "cudnn", "xla", "jax_pallas"):
      if impl in ("cudnn", "jax_pallas") and not on_gpu:
        continue
      try:
        t = time_us(cfg, baselines(impl), q, k, v, lengths)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{tag} {impl}: failed: {harness.error_text(e)}")
        continue
      read = 2 * dense_bytes if impl == "copy" else dense_bytes
      rows.append(row(impl, shape, cfg.dtype, 0.0, "dense", 0, 0.0, t, read,
                      pattern=pattern))
      print(f"{tag} {impl}: {t:.1f} us  effective {rows[-1]['effective_tbps']}"
            f" TB/s  read {rows[-1]['read_tbps']} TB/s", flush=True)
      continue
    done = set()
    for mode, splits in cfg.variants:
      if impl == "pallas_mosaic" and mode == "global":
        continue   # one-pass modes only
      n_splits = splits or bj.decode.default_num_splits(
          shape[0], shape[2], shape[3], cfg.block_kv, implementation=impl)
      if (mode, n_splits) in done:   # The default may be 1 split.
        continue
      done.add((mode, n_splits))
      fns = {check: ours(cfg, impl, splits, mode, dense=not check)
             for check in (False, True)}
      # What is timed: the output alone (as a decoding model, and the
      # baselines, return it), or with its stats (and off the GPU, where
      # times say nothing, the build that returns them: no more compiles).
      timed = fns if cfg.time_stats or not on_gpu else {
          check: ours(cfg, impl, splits, mode, dense=not check, stats=False)
          for check in fns}
      if lams is None:
        found = [testing.find_threshold(fns[True], cache_args, t,
                                        steps=cfg.bisection_steps)
                 for t in cfg.target_sparsities]
        lams = [(lam, t) for (lam, _), t in zip(found, cfg.target_sparsities)]
        print(f"{tag} {impl} {mode}: λ for sparsity "
              f"{list(cfg.target_sparsities)}: "
              f"{[f'{lam:.3g}' for lam, _ in lams]}", flush=True)
      # "dense": the build without the skip check; then λ = 0 with it.
      points = ([(0.0, False, None), (0.0, True, None)]
                + [(lam, True, t) for lam, t in lams]
                + [(t, True, None) for t in cfg.thresholds])
      for thr, check, target in points:
        fn = fns[check]
        thr_arr = jnp.float32(thr)
        _, stats = fn(*cache_args, thr_arr, *scales)
        t = time_us(cfg, timed[check], *cache_args, thr_arr, *scales)
        rows.append(row(impl, shape, cfg.dtype, thr, mode, n_splits,
                        stats.total_sparsity, t,
                        jnp.sum(stats.bytes_read), skip_check=check,
                        pattern=pattern, target=target,
                        cache_dtype=cache_dtype))
        r = rows[-1]
        print(f"{tag} {impl}{' fp8' if fp8 else ''} {mode} splits={n_splits}"
              f" λ={thr:.3g} check="
              f"{check}: sparsity "
              f"{r['sparsity']:.3f} {t:.1f} us effective "
              f"{r['effective_tbps']} TB/s read {r['read_tbps']} TB/s",
              flush=True)
  return rows


def plot(result, path):
  """Top: effective TB/s against sparsity, baselines as lines. Bottom:
  speedup over our dense build, with the ceiling when K is always read."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = result["rows"]
  shapes = sorted({(r.get("pattern", "sink_local"), r["batch"], r["seq_len"])
                   for r in rows})
  fig, axes = harness.figure(2, len(shapes), (6 * len(shapes), 8.5),
                             squeeze=False)
  colors = {"copy": "k", "cudnn": "C3", "xla": "C4", "jax_pallas": "C5"}
  for col, (pattern, b, s) in enumerate(shapes):
    top, bottom = axes[0, col], axes[1, col]
    rs = [r for r in rows if r["batch"] == b and r["seq_len"] == s
          and r.get("pattern", "sink_local") == pattern]
    for r in rs:
      if r["mode"] == "dense":   # copy: its read + write rate, the ceiling.
        value = r["read_tbps"] if r["impl"] == "copy" else r["effective_tbps"]
        top.axhline(value, ls=":", lw=1, color=colors.get(r["impl"], "gray"),
                    label=f"{r['impl']} (dense)" + (
                        " read+write" if r["impl"] == "copy" else ""))
    dense_build = [r["time_us"] for r in rs
                   if r["impl"] in ("pallas_triton", "pallas_mosaic")
                   and run_label(r) == r["impl"]       # bf16 caches
                   and not r.get("skip_check", True)]
    base = min(dense_build) if dense_build else None
    keys = sorted({(run_label(r), r["mode"], r["splits"]) for r in rs
                   if r["mode"] != "dense"})
    for n, key in enumerate(keys):
      pts = sorted([r for r in rs if (run_label(r), r["mode"], r["splits"])
                    == key and r.get("skip_check", True)],
                   key=lambda r: r["sparsity"])
      label = f"{key[0]} {key[1]} splits={key[2]}"
      x = [r["sparsity"] for r in pts]
      top.plot(x, [r["effective_tbps"] for r in pts], "o-", color=f"C{n}",
               label=label)
      if base:
        bottom.plot(x, [base / r["time_us"] for r in pts], "o-",
                    color=f"C{n}", label=label)
    grid = np.linspace(0, 1, 101)
    bottom.plot(grid, 1 / (0.5 + 0.5 * (1 - grid)), "k--", lw=1,
                label="ceiling: K always read, V of kept blocks")
    bottom.axhline(1.0, color="gray", lw=0.5)
    top.set_title(f"decode {pattern} b{b} seq {s // 1024}k")
    top.set_ylabel("effective TB/s (dense K+V bytes / time)")
    bottom.set_ylabel("speedup over our dense build (fastest split count)")
    for ax in (top, bottom):
      ax.set_xlabel("block sparsity")
      ax.legend(fontsize=6)
  harness.save_figure(fig, path)


def main(argv):
  del argv
  cfg = _CONFIG.value
  bench = harness.start(
      cfg, pattern=dict(name="sink_local", **cfg.pattern.to_dict()),
      scattered=cfg.scattered.to_dict(), block_kv=cfg.block_kv,
      time_stats=cfg.time_stats,
      notes=("effective_tbps = dense K+V bytes / time; read_tbps = "
             "bytes read / time (copy: read + written); jax_pallas "
             "includes the K/V transposes its gqa wrapper makes; "
             "time_stats false: our calls timed returning the output "
             "alone, their stats from an untimed call."))
  on_gpu = bench.on_gpu
  rows = run(cfg, on_gpu, lambda rows: bench.save(rows=rows))
  bench.result.update(tuning=run_tuning(cfg) if on_gpu else [],
                      split_sweep=run_split_sweep(cfg) if on_gpu else [],
                      rows=rows)
  bench.finish(plot)
  print_summary(rows)


def run_label(r) -> str:
  """An implementation and, for FP8 caches, its cache dtype."""
  fp8 = r.get("cache_dtype", r["dtype"]) != r["dtype"]
  return r["impl"] + (" fp8" if fp8 else "")


def print_summary(rows):
  """Per cache: TB/s of the dense builds and baselines, then each skipping
  row's sparsity and speedup over its own implementation's dense build
  (FP8 rows: over the same kernel's dense build on the bf16 cache too)."""
  caches = sorted({(r["pattern"], r["batch"], r["seq_len"], r["head_dim"])
                   for r in rows})
  for key in caches:
    rs = [r for r in rows
          if (r["pattern"], r["batch"], r["seq_len"], r["head_dim"]) == key]
    dense = {}   # fastest dense build (any split count) per label
    for r in rs:
      if (r["mode"] == "dense" or not r["skip_check"]) and (
          run_label(r) not in dense or r["time_us"] < dense[run_label(r)]["time_us"]):
        dense[run_label(r)] = r
    print(f"\n{key[0]} b{key[1]} s{key[2]} d{key[3]}: " + ", ".join(
        f"{name} {r['effective_tbps']:.2f}" for name, r in dense.items())
          + " TB/s (dense)")
    for r in rs:
      if r["mode"] == "dense":
        continue
      base, wide = dense.get(run_label(r)), dense.get(r["impl"])
      speedup = base["time_us"] / r["time_us"] if base else float("nan")
      line = (f"  {run_label(r):>18} {r['mode']:>8} λ={r['threshold']:<9.3g} "
              f"check={str(r['skip_check']):5} sparsity {r['sparsity']:.3f}"
              f"  {r['time_us']:8.1f} us  x{speedup:.2f} own dense")
      if wide is not None and wide is not base:
        line += f", x{wide['time_us'] / r['time_us']:.2f} its bf16 dense"
      print(line)


if __name__ == "__main__":
  app.run(main)
