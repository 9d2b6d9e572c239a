r"""Decode speed: skip-softmax decode against cuDNN, XLA, jax's Pallas decode
kernel and a plain copy of the KV cache, in one process on the same cache.

    python experiments/bench_decode.py --config=configs/bench_decode.py

Rows: impl, batch, q_heads, kv_heads, seq_len, head_dim, dtype, threshold,
mode, splits, sparsity, time_us, bytes_read, effective_tbps (dense K+V bytes
/ time), read_tbps (bytes actually read / time; for "copy" bytes read +
written).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import blasst_jax as bj  # pylint: disable=g-import-not-at-top
from blasst_jax import patterns
from blasst_jax import testing

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_decode.py")


def time_us(fn, *args, warmup: int, iters: int, reps: int) -> float:
  return 1e3 * testing.median_time_ms(fn, *args, warmup=warmup, iters=iters,
                                      reps=reps)


def make_cache(cfg, shape, seed):
  b, hq, hkv, s, d = shape
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(seed), batch=b, seq_len=s, q_heads=hq, kv_heads=hkv,
      head_dim=d, dtype=jnp.dtype(cfg.dtype), **cfg.pattern.to_dict())
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
        bytes_read):
  b, hq, hkv, s, d = shape
  dense = 2 * b * s * hkv * d * jnp.dtype(dtype).itemsize
  return dict(impl=impl, batch=b, q_heads=hq, kv_heads=hkv, seq_len=s,
              head_dim=d, dtype=dtype, threshold=threshold, mode=mode,
              splits=splits, sparsity=round(float(sparsity), 4),
              time_us=round(t_us, 2), bytes_read=float(bytes_read),
              effective_tbps=round(dense / t_us / 1e6, 3),
              read_tbps=round(float(bytes_read) / t_us / 1e6, 3))


def ours(cfg, impl, splits, shared_max, block_kv=None, kernel_config=None):
  def fn(q, k, v, lengths, thr):
    return bj.decode_attention(q, k, v, lengths, threshold=thr,
                               block_kv=block_kv or cfg.block_kv,
                               num_splits=splits, shared_max=shared_max,
                               implementation=impl, return_stats=True,
                               kernel_config=kernel_config)
  return jax.jit(fn)


def run_tuning(cfg):
  """Dense one-pass kernel over (block_kv, num_warps, num_stages)."""
  from blasst_jax.kernels import decode_triton  # pylint: disable=g-import-not-at-top
  out = []
  for i in cfg.tuning_shapes:
    shape = tuple(cfg.shapes[i])
    q, k, v, lengths = make_cache(cfg, shape, cfg.seed + i)
    for bkv, warps, stages in cfg.tuning:
      fn = ours(cfg, "pallas_triton", None, False, block_kv=bkv,
                kernel_config=decode_triton.DecodeConfig(warps, stages))
      t = time_us(fn, q, k, v, lengths, jnp.float32(0.0), warmup=cfg.warmup,
                  iters=cfg.iters, reps=cfg.reps)
      r = row("pallas_triton", shape, cfg.dtype, 0.0, "one_pass",
              bj.decode.default_num_splits(shape[0], shape[2], shape[3], bkv),
              0.0, t, 2 * k.size * k.dtype.itemsize)
      r.update(block_kv=bkv, num_warps=warps, num_stages=stages)
      out.append(r)
      print(f"tuning s{shape[3]} b{shape[0]} bkv={bkv} w{warps} s{stages}: "
            f"{t:.1f} us {r['effective_tbps']} TB/s", flush=True)
  return out


def run(cfg, on_gpu):
  rows = []
  for i, shape in enumerate(cfg.shapes):
    shape = tuple(shape)
    q, k, v, lengths = make_cache(cfg, shape, cfg.seed + i)
    dense_bytes = 2 * k.size * k.dtype.itemsize
    tag = f"[b{shape[0]} hq{shape[1]} hkv{shape[2]} s{shape[3]}]"
    for impl in cfg.impls:
      if impl in ("copy", "cudnn", "xla", "jax_pallas"):
        if impl in ("cudnn", "jax_pallas") and not on_gpu:
          continue
        try:
          t = time_us(baselines(impl), q, k, v, lengths, warmup=cfg.warmup,
                      iters=cfg.iters, reps=cfg.reps)
        except Exception as e:  # pylint: disable=broad-except
          print(f"{tag} {impl}: failed: {type(e).__name__}: {str(e)[:200]}")
          continue
        read = 2 * dense_bytes if impl == "copy" else dense_bytes
        rows.append(row(impl, shape, cfg.dtype, 0.0, "dense", 0, 0.0, t, read))
        print(f"{tag} {impl}: {t:.1f} us  effective {rows[-1]['effective_tbps']}"
              f" TB/s  read {rows[-1]['read_tbps']} TB/s", flush=True)
        continue
      modes = [(s, False) for s in cfg.splits] + [(None, True)]
      for splits, shared in modes:
        fn = ours(cfg, impl, splits, shared)
        n_splits = splits or bj.decode.default_num_splits(
            shape[0], shape[2], shape[3], cfg.block_kv)
        mode = "shared_max" if shared else "one_pass"
        for thr in [0.0, *cfg.thresholds]:
          thr_arr = jnp.float32(thr)
          _, stats = fn(q, k, v, lengths, thr_arr)
          t = time_us(fn, q, k, v, lengths, thr_arr, warmup=cfg.warmup,
                      iters=cfg.iters, reps=cfg.reps)
          rows.append(row(impl, shape, cfg.dtype, thr, mode, n_splits,
                          stats.total_sparsity, t,
                          jnp.sum(stats.bytes_read)))
          r = rows[-1]
          print(f"{tag} {impl} {mode} splits={n_splits} λ={thr:g}: sparsity "
                f"{r['sparsity']:.3f} {t:.1f} us effective "
                f"{r['effective_tbps']} TB/s read {r['read_tbps']} TB/s",
                flush=True)
  return rows


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shapes = sorted({(r["batch"], r["seq_len"]) for r in rows})
  fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5),
                           squeeze=False)
  for ax, (b, s) in zip(axes[0], shapes):
    rs = [r for r in rows if r["batch"] == b and r["seq_len"] == s]
    for r in rs:
      if r["mode"] == "dense":
        ax.axhline(r["effective_tbps"], ls=":", lw=1,
                   color={"copy": "k", "cudnn": "C3", "xla": "C4",
                          "jax_pallas": "C5"}.get(r["impl"], "gray"),
                   label=f"{r['impl']} (dense)")
    for n, key in enumerate(sorted({(r["impl"], r["mode"], r["splits"])
                                    for r in rs if r["mode"] != "dense"})):
      pts = sorted([r for r in rs if (r["impl"], r["mode"], r["splits"])
                    == key], key=lambda r: r["sparsity"])
      ax.plot([r["sparsity"] for r in pts],
              [r["effective_tbps"] for r in pts], "o-", color=f"C{n}",
              label=f"{key[0]} {key[1]} splits={key[2]}")
    ax.set_title(f"decode b{b} seq {s // 1024}k")
    ax.set_xlabel("block sparsity")
    ax.set_ylabel("effective TB/s (dense K+V bytes / time)")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  cfg = _CONFIG.value
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  print(f"device_kind={device.device_kind} jax={jax.__version__}", flush=True)
  rows = run(cfg, on_gpu)
  tuning = run_tuning(cfg) if on_gpu else []
  result = dict(tuning=tuning, device_kind=device.device_kind, jax_version=jax.__version__,
                pattern=dict(name="sink_local", **cfg.pattern.to_dict()),
                block_kv=cfg.block_kv, rows=rows,
                notes=("effective_tbps = dense K+V bytes / time; read_tbps = "
                       "bytes read / time (copy: read + written); jax_pallas "
                       "includes the K/V transposes its gqa wrapper makes."))
  os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
  with open(cfg.output, "w") as f:
    json.dump(result, f, indent=1)
  png = os.path.splitext(cfg.output)[0] + ".png"
  plot(rows, png)
  print(f"wrote {cfg.output} and {png}")


if __name__ == "__main__":
  app.run(main)
