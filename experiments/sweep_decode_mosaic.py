"""Quick sweep of the Hopper decode kernel's knobs (page size, K ring depth,
split count) against the Triton kernel, cuDNN and a copy of the cache, on
the decode study's shapes; then FP8 pages against bf16 through the kernel's
partials. Exploration only: the study is experiments/bench_decode.py.

    python -m experiments.sweep_decode_mosaic OUT.json
"""
import json
import sys
import jax, jax.numpy as jnp
import blasst_jax as bj
from blasst_jax import patterns, testing
from blasst_jax.kernels import decode_mosaic

print(jax.devices()[0].device_kind, jax.__version__, flush=True)
t_us = lambda fn, *a: 1e3 * testing.median_time_ms(fn, *a, warmup=3, iters=10, reps=10)
rows = []
for (b, hq, hkv, s, d) in [(8, 32, 8, 32768, 128), (1, 32, 8, 131072, 128), (64, 32, 8, 4096, 128), (120, 9, 3, 8192, 64)]:
  q, k, v = patterns.sink_local_qkv(jax.random.PRNGKey(0), batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d, dtype=jnp.bfloat16, sharpness=(10., 14., 18., 22.))
  q = q[:, -1]; L = jnp.full((b,), s, jnp.int32)
  dense_bytes = 2 * k.size * 2
  tag = f"b{b} s{s} h{hq}/{hkv} d{d}"
  base = {}
  base["copy"] = t_us(jax.jit(lambda k, v: (jnp.copy(k), jnp.copy(v))), k, v)
  base["cudnn"] = t_us(jax.jit(lambda q, k, v, L: jax.nn.dot_product_attention(q[:, None], k, v, key_value_seq_lengths=L, implementation="cudnn")), q, k, v, L)
  for name, t in base.items():
    print(f"{tag} {name}: {t:.1f} us {dense_bytes / t / 1e6 * (2 if name == 'copy' else 1):.2f} TB/s", flush=True)
  def run(impl, bkv, thr, dense, splits=None, cfg=None, mode="anchored"):
    fn = jax.jit(lambda q, k, v, L, t: bj.decode_attention(q, k, v, L, threshold=0.0 if dense else t, block_kv=bkv, num_splits=splits, max_mode=mode, implementation=impl, return_stats=True, kernel_config=cfg))
    try:
      _, st = fn(q, k, v, L, jnp.float32(thr))
      t = t_us(fn, q, k, v, L, jnp.float32(thr))
    except Exception as e:
      print(f"{tag} {impl} bkv{bkv} {cfg}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True); return None
    sp = float(st.total_sparsity)
    print(f"{tag} {impl} bkv{bkv} splits={splits} {mode} {cfg} λ={thr:g} dense={dense}: sparsity {sp:.3f} {t:.1f} us {dense_bytes / t / 1e6:.2f} TB/s", flush=True)
    rows.append(dict(tag=tag, impl=impl, bkv=bkv, splits=splits, mode=mode, cfg=str(cfg), thr=thr, dense=dense, sparsity=sp, us=t))
    return t
  run("pallas_triton", 128, 0.0, True)
  run("pallas_triton", 128, 1e-3, False)
  for bkv in (128, 64):
    for cfg in [None, decode_mosaic.MosaicDecodeConfig(k_stages=2)]:
      run("pallas_mosaic", bkv, 0.0, True, cfg=cfg)
      run("pallas_mosaic", bkv, 0.0, False, cfg=cfg)
      for thr in (1e-4, 1e-3, 1e-2):
        run("pallas_mosaic", bkv, thr, False, cfg=cfg)
  for splits in (2, 4, 8, 16, 33):
    run("pallas_mosaic", 128, 0.0, True, splits=splits)
from blasst_jax import config as config_lib
for (b, hq, hkv, s, d) in [(8, 32, 8, 32768, 128), (1, 32, 8, 131072, 128)]:
  q, k, v = patterns.sink_local_qkv(jax.random.PRNGKey(0), batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d, dtype=jnp.float32, sharpness=(10., 14., 18., 22.))
  q = q[:, -1].astype(jnp.bfloat16); L = jnp.full((b,), s, jnp.int32)
  ks = jnp.abs(k).max(axis=(0, 1, 3)) / 448.0; vs = jnp.abs(v).max(axis=(0, 1, 3)) / 448.0
  tag = f"fp8 b{b} s{s} h{hq}/{hkv} d{d}"
  for dt in ("bf16", "fp8"):
    for bkv in (128, 64):
      if dt == "fp8":
        kc = (k / ks[None, None, :, None]).astype(jnp.float8_e4m3fn); vc = (v / vs[None, None, :, None]).astype(jnp.float8_e4m3fn)
        extra = (ks, vs)
      else:
        kc, vc, extra = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), ()
      pages = s // bkv
      kp = kc.reshape(b * pages, bkv, hkv, d); vp = vc.reshape(b * pages, bkv, hkv, d)
      table = jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
      splits = bj.decode.default_num_splits(b, hkv, s, bkv)
      for thr in (0.0, 1e-3, 1e-2):
        fn = jax.jit(lambda q, kp, vp, t, *e, skip=thr > 0: decode_mosaic.decode_partials(q.reshape(b, hkv, hq // hkv, d), kp, vp, table, L, config_lib.log_threshold(jnp.full((b,), t, jnp.float32)), *e, group=hq // hkv, sm_scale=d ** -0.5, num_splits=splits, max_mode="anchored", skip_enabled=skip))
        try:
          res = fn(q, kp, vp, jnp.float32(thr), *extra)
          sp = float(jnp.sum(res[3])) / max(1, float(jnp.sum(res[4])))
          t = t_us(fn, q, kp, vp, jnp.float32(thr), *extra)
        except Exception as e:
          print(f"{tag} {dt} bkv{bkv} λ={thr:g}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True); continue
        print(f"{tag} {dt} bkv{bkv} partials λ={thr:g}: sparsity {sp:.3f} {t:.1f} us bf16-equivalent {2 * k.size * 2 / t / 1e6:.2f} TB/s", flush=True)
        rows.append(dict(tag=tag, impl="partials_" + dt, bkv=bkv, thr=thr, sparsity=sp, us=t))
json.dump(rows, open(sys.argv[1], "w"), indent=0)
