"""Quick sweep of the Hopper decode kernel's knobs (compute warpgroups, page
size, K ring depth) against the Triton kernel, cuDNN and a copy of the
cache, on the decode study's shapes, with bf16 and FP8 caches. Exploration
only: the study is experiments/bench_decode.py.

    python -m experiments.sweep_decode_mosaic OUT.json [SHAPE_INDEX ...]
    python -m experiments.sweep_decode_mosaic --splits OUT.json [SHAPE_INDEX ...]
    python -m experiments.sweep_decode_mosaic --registers OUT.json [SHAPE_INDEX ...]

With --splits: the Mosaic and Triton kernels' time against the split-K
count (dense, and λ = 1e-3 anchored), against `decode.default_num_splits`.
With --registers: one compute warpgroup against two, with and without
setmaxnreg handing them the memory warpgroup's registers
(`MosaicDecodeConfig.split_registers`), bf16 and FP8 caches.
"""
import json
import sys

import jax
import jax.numpy as jnp

import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import testing
from blasst_jax.kernels import decode_mosaic

SHAPES = [(8, 32, 8, 32768, 128), (1, 32, 8, 131072, 128),
          (64, 32, 8, 4096, 128), (120, 9, 3, 8192, 64)]
# (block_kv, MosaicDecodeConfig kwargs)
KNOBS = [(128, dict(compute_wgs=1)), (128, dict(compute_wgs=2)),
         (64, dict(compute_wgs=1)), (64, dict(compute_wgs=2))]


def main(out_path, shape_ids, mode=""):
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  t_us = lambda fn, *a: 1e3 * testing.median_time_ms(  # pylint: disable=g-long-lambda
      fn, *a, warmup=3, iters=10, reps=10)
  rows = []
  for i in shape_ids:
    b, hq, hkv, s, d = SHAPES[i]
    q, k, v = patterns.sink_local_qkv(
        jax.random.PRNGKey(0), batch=b, seq_len=s, q_heads=hq, kv_heads=hkv,
        head_dim=d, dtype=jnp.bfloat16, sharpness=(10., 14., 18., 22.))
    q, lengths = q[:, -1], jnp.full((b,), s, jnp.int32)
    k8, ks = bj.decode.quantize_cache(k)
    v8, vs = bj.decode.quantize_cache(v)
    dense_bytes = 2 * k.size * 2
    tag = f"b{b} s{s} h{hq}/{hkv} d{d}"
    copy = t_us(jax.jit(lambda k, v: (jnp.copy(k), jnp.copy(v))), k, v)
    cudnn = t_us(jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
        q[:, None], k, v, key_value_seq_lengths=n, implementation="cudnn")),
                 q, k, v, lengths)
    print(f"{tag} copy {2 * dense_bytes / copy / 1e6:.2f} TB/s (r+w), cudnn "
          f"{dense_bytes / cudnn / 1e6:.2f} TB/s", flush=True)
    rows.append(dict(tag=tag, impl="copy", us=copy))
    rows.append(dict(tag=tag, impl="cudnn", us=cudnn))

    def run(impl, bkv, thr, dense, cfg=None, fp8=False, splits=None):
      cache = (k8, v8) if fp8 else (k, v)
      scales = dict(k_scale=ks, v_scale=vs) if fp8 else {}
      fn = jax.jit(lambda q, k, v, n, t: bj.decode_attention(
          q, k, v, n, threshold=0.0 if dense else t, block_kv=bkv,
          max_mode="anchored", implementation=impl, return_stats=True,
          kernel_config=cfg, num_splits=splits, **scales))
      try:
        _, st = fn(q, *cache, lengths, jnp.float32(thr))
        t = t_us(fn, q, *cache, lengths, jnp.float32(thr))
      except Exception as e:  # pylint: disable=broad-except
        print(f"{tag} {impl} bkv{bkv} {cfg}: FAILED {type(e).__name__}: "
              f"{str(e)[:400]}", flush=True)
        return
      sp = float(st.total_sparsity)
      print(f"{tag} {impl}{' fp8' if fp8 else ''} bkv{bkv} {cfg} "
            f"splits={splits} λ={thr:g} "
            f"dense={dense}: sparsity {sp:.3f} {t:.1f} us "
            f"{dense_bytes / t / 1e6:.2f} TB/s", flush=True)
      rows.append(dict(tag=tag, impl=impl, fp8=fp8, bkv=bkv, cfg=str(cfg),
                       splits=splits, thr=thr, dense=dense, sparsity=sp,
                       us=t))

    if mode == "--splits":
      blocks = -(-s // 128)
      print(f"{tag} default splits: " + ", ".join(
          f"{impl} "
          f"{bj.decode.default_num_splits(b, hkv, s, 128, implementation=impl)}"
          for impl in ("pallas_mosaic", "pallas_triton")), flush=True)
      for splits in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 33, 48}):
        if splits * bj.decode.MIN_BLOCKS_PER_SPLIT > blocks:
          continue
        for impl in ("pallas_mosaic", "pallas_triton"):
          run(impl, 128, 0.0, True, splits=splits)
          run(impl, 128, 1e-3, False, splits=splits)
    elif mode == "--registers":
      run_registers(run)
    else:
      run_knobs(run)
    with open(out_path, "w") as f:
      json.dump(rows, f, indent=0)


def run_knobs(run):
  """The knob sweep of one shape: `run(impl, block_kv, λ, dense, config,
  fp8)` times one build."""
  run("pallas_triton", 128, 0.0, True)
  run("pallas_triton", 128, 1e-3, False)
  for bkv, knobs in KNOBS:
    cfg = decode_mosaic.MosaicDecodeConfig(**knobs)
    run("pallas_mosaic", bkv, 0.0, True, cfg)
    for thr in (0.0, 1e-3, 1e-2):
      run("pallas_mosaic", bkv, thr, False, cfg)
  for wgs in (1, 2):
    cfg = decode_mosaic.MosaicDecodeConfig(compute_wgs=wgs)
    run("pallas_mosaic", 128, 0.0, True, cfg, fp8=True)
    run("pallas_mosaic", 128, 1e-3, False, cfg, fp8=True)


def run_registers(run):
  """One compute warpgroup, two at launch's registers, two with the memory
  warpgroup's handed over (`run` as in `run_knobs`)."""
  for knobs in (dict(compute_wgs=1), dict(compute_wgs=2),
                dict(compute_wgs=2, split_registers=True)):
    cfg = decode_mosaic.MosaicDecodeConfig(**knobs)
    run("pallas_mosaic", 128, 0.0, True, cfg)
    for thr in (1e-3, 1e-2):
      run("pallas_mosaic", 128, thr, False, cfg)
    run("pallas_mosaic", 128, 0.0, True, cfg, fp8=True)


if __name__ == "__main__":
  args = sys.argv[1:]
  sweep_mode = args[0] if args[0].startswith("--") else ""
  args = args[bool(sweep_mode):]
  main(args[0], [int(a) for a in args[1:]] or range(len(SHAPES)), sweep_mode)
