"""Quick tile sweep of the Mosaic kernel against cuDNN."""
import functools
import jax, jax.numpy as jnp
import blasst_jax as bj
from blasst_jax import config as config_lib, testing
from blasst_jax.kernels import pallas_mosaic, pallas_triton

t_ms = functools.partial(testing.median_time_ms, warmup=3, iters=15)

print(jax.devices()[0].device_kind, jax.__version__)
for b, s in [(4, 8192), (2, 16384)]:
  shape = testing.AttentionShape(b, s, s, 16, 16, 128)
  q, k, v = shape.inputs(jax.random.PRNGKey(0), dtype=jnp.bfloat16, sharpness=(10., 14., 18., 22.))
  kvl = jnp.full((b,), s, jnp.int32)
  for causal in (False, True):
    fl = shape.flops(causal)
    cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
    tc = t_ms(cud, q, k, v)
    print(f"{s} causal={causal} cudnn {tc:.3f} ms {fl / tc / 1e9:.0f} TFLOP/s", flush=True)
    for bq, bkv, st in [(64, 128, 2), (64, 64, 3), (64, 128, 3)]:
      for thr in (0.0, 1e-3, 1e-2):
        lt = config_lib.log_threshold(jnp.full((b,), thr, jnp.float32))
        fn = jax.jit(lambda q, k, v, lt: pallas_mosaic.attention_forward(
            q, k, v, kvl, lt, causal=causal, sm_scale=128 ** -0.5, block_q=bq, block_kv=bkv,
            config=pallas_mosaic.MosaicConfig(num_stages=st), skip_enabled=thr > 0))
        try:
          out = fn(q, k, v, lt)
          sp = float(jnp.sum(out[2])) / max(1, float(jnp.sum(out[3])))
          tm = t_ms(fn, q, k, v, lt)
          print(f"  mosaic {bq}x{bkv} st{st} λ={thr:g}: sparsity {sp:.3f} {tm:.3f} ms {fl / tm / 1e9:.0f} dense-eq TFLOP/s ({tc / tm:.2f}x cuDNN)", flush=True)
        except Exception as e:
          print(f"  mosaic {bq}x{bkv} st{st} λ={thr:g}: FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
