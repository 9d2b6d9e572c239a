r"""Runs one dense backward once, for a hardware profiler to time its kernels.

The variant is compiled and warmed up, then run once between
cudaProfilerStart/Stop, so that

    ncu --profile-from-start off --clock-control none --cache-control none \
        --metrics gpu__time_duration.sum --csv --print-units base \
        --page raw python -m experiments.profile_backward --variant=cudnn \
        > cudnn.csv
    python -m experiments.profile_backward --summarize=cudnn.csv

lists every kernel of that backward (XLA's prologue passes included) with
its duration. Variants: `cudnn` (jax.nn.dot_product_attention's vjp; its
forward kernel is listed too), `mosaic` (the Hopper backward's default),
`mosaic_fused` and `mosaic_two_kernel` (either dQ strategy).
"""

from __future__ import annotations

import csv
import ctypes
import glob
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from blasst_jax import patterns
from blasst_jax.kernels import pallas_mosaic
from blasst_jax.kernels import pallas_mosaic_bwd

_VARIANT = flags.DEFINE_enum(
    "variant", "mosaic", ["cudnn", "mosaic", "mosaic_fused",
                          "mosaic_two_kernel"], "The backward to run.")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "q_len = kv_len (causal).")
_HEADS = flags.DEFINE_integer("heads", 16, "Query = key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "64 or 128.")
_SUMMARIZE = flags.DEFINE_string(
    "summarize", None, "Print the kernels of an ncu --csv --page raw "
    "report (gpu__time_duration.sum in ns) and exit.")

_FUSE_DQ = {"mosaic": None, "mosaic_fused": True, "mosaic_two_kernel": False}


def summarize(path: str) -> list[tuple[str, float]]:
  """(kernel name, microseconds) per launch in an ncu raw CSV report."""
  with open(path, newline="") as f:
    rows = [r for r in csv.reader(f) if len(r) > 5]
  if not rows:
    raise ValueError(f"{path} holds no ncu CSV rows: was the profiler run "
                     "with --csv --page raw?")
  header = rows[0]
  name_at = header.index("Kernel Name")
  time_at = header.index("gpu__time_duration.sum")
  launches = []
  for row in rows[1:]:
    try:
      launches.append((row[name_at],
                       float(row[time_at].replace(",", "")) / 1e3))
    except ValueError:   # the units row
      continue
  return launches


def _cudart():
  names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
  names += [f for p in sys.path if p for f in glob.glob(
      os.path.join(p, "nvidia", "**", "libcudart.so*"), recursive=True)]
  for name in names:
    try:
      return ctypes.CDLL(name)
    except OSError:
      continue
  raise OSError("libcudart not found: cannot mark the profiled range.")


def _backward(variant, q, k, v, d_out):
  """A jitted (q, k, v, d_out) -> grads for the variant, dense and causal."""
  b, s, h, d = q.shape
  if variant == "cudnn":
    attend = lambda q, k, v: jax.nn.dot_product_attention(  # pylint: disable=g-long-lambda
        q, k, v, is_causal=True, implementation="cudnn")
    return jax.jit(lambda q, k, v, g: jax.vjp(attend, q, k, v)[1](g))
  kv_lengths = jnp.full((b,), s, jnp.int32)
  out, lse = pallas_mosaic.attention_forward(
      q, k, v, kv_lengths, jnp.full((b,), -jnp.inf), causal=True,
      sm_scale=d ** -0.5, skip_enabled=False)[:2]
  keep = jnp.ones((b, h, s // 64, s // 128), bool)
  config = pallas_mosaic_bwd.MosaicBwdConfig(fuse_dq=_FUSE_DQ[variant])
  return jax.jit(lambda q, k, v, g: pallas_mosaic_bwd.attention_backward(
      q, k, v, out, lse, g, kv_lengths, keep, causal=True,
      sm_scale=d ** -0.5, block_q=64, block_kv=128, config=config))


def main(argv):
  del argv
  if _SUMMARIZE.value:
    launches = summarize(_SUMMARIZE.value)
    for name, us in launches:
      print(f"{us:10.1f} us  {name[:100]}")
    print(f"{sum(us for _, us in launches) / 1e3:10.3f} ms  total")
    return
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(0), batch=_BATCH.value, seq_len=_SEQ_LEN.value,
      q_heads=_HEADS.value, kv_heads=_HEADS.value, head_dim=_HEAD_DIM.value,
      dtype=jnp.bfloat16, sharpness=(2.0, 10.0, 20.0), sink_tokens=4,
      window=256)
  d_out = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.bfloat16)
  step = _backward(_VARIANT.value, q, k, v, d_out)
  for _ in range(2):
    jax.block_until_ready(step(q, k, v, d_out))
  cudart = _cudart()
  cudart.cudaProfilerStart()
  jax.block_until_ready(step(q, k, v, d_out))
  cudart.cudaProfilerStop()
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__} "
        f"{_VARIANT.value}: batch {_BATCH.value}, {_SEQ_LEN.value} tokens, "
        f"{_HEADS.value} heads, head_dim {_HEAD_DIM.value}, causal",
        flush=True)


if __name__ == "__main__":
  app.run(main)
