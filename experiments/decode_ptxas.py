r"""Registers and spills of the Hopper decode kernel's builds, compiled for
an H200 without a GPU.

    pip install "jax[cuda13]==0.11.2"      # the CUDA plugin and its ptxas
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu \
        python -m experiments.decode_ptxas --set=fp8 --shape_ids=0,3 \
        --caches=bfloat16,float8_e4m3fn

XLA compiles the Mosaic GPU call ahead of time (`h200_target`), and
Mosaic GPU runs ptxas on it then; with MOSAIC_GPU_DUMP_PTXAS set, ptxas
reports each build's registers a thread, stack frame and spilled bytes.
A spill in the block loop is a local-memory round trip on the decision's
path. The builds are `experiments.ab_decode_mosaic`'s sets (`--set`) on
its shapes (`--shape_ids`), dense (λ = 0) and skipping, on the page dtypes
`--caches`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import blasst_jax as bj
from experiments import ab_decode_mosaic
from experiments import h200_target

_SET = flags.DEFINE_enum("set", "schedule", list(ab_decode_mosaic.BUILDS),
                         "Which set of `ab_decode_mosaic` builds.")
_SHAPE_IDS = flags.DEFINE_list(
    "shape_ids", ["0"], "Indices into `ab_decode_mosaic.SHAPES`.")
_CACHES = flags.DEFINE_list(
    "caches", ["bfloat16"], "Page dtypes: bfloat16 and / or float8_e4m3fn.")

_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                     r"(\d+) bytes spill loads")


@contextlib.contextmanager
def captured_output(out: list):
  """What this process writes to its stdout and stderr file descriptors
  (ptxas' report comes from C++), appended to `out` as one string."""
  sys.stdout.flush()
  sys.stderr.flush()
  with tempfile.TemporaryFile() as tmp:
    saved = [os.dup(1), os.dup(2)]
    os.dup2(tmp.fileno(), 1)
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      for fd in saved:
        os.close(fd)
      tmp.seek(0)
      out.append(tmp.read().decode(errors="replace"))


def ptxas_report(text: str) -> dict:
  """{"registers", "stack", "spill_stores", "spill_loads"} of the kernel
  ptxas reported in `text` (the one with the most registers, if several:
  ptxas reports each function's frame and spills, then its registers)."""
  used = [int(n) for n in _USED.findall(text)]
  if not used:
    raise ValueError("No ptxas report in the output: is "
                     "MOSAIC_GPU_DUMP_PTXAS set, and jax's CUDA plugin "
                     "installed?")
  frames = [tuple(map(int, m)) for m in _SPILLS.findall(text)]
  frames = frames if len(frames) == len(used) else [(0, 0, 0)] * len(used)
  registers, (stack, stores, loads) = max(zip(used, frames))
  return dict(registers=registers, stack=stack, spill_stores=stores,
              spill_loads=loads)


def compile_report(sds, shape, cache, dense: bool, block_kv: int,
                   config, layout: str | None = None) -> dict:
  """ptxas' report of one `decode_attention` build on `shape`
  (`ab_decode_mosaic.SHAPES`' batch, q_heads, kv_heads, seq_len,
  head_dim); with `layout` ("NHD" or "HND") of `paged_decode_attention`
  on the cache's pages through a page table."""
  b, hq, hkv, n, d = shape
  options = dict(implementation="pallas_mosaic", kernel_config=config)
  def attend(q, k, v, lengths, threshold, *table_and_scales):
    if layout:
      table, *table_and_scales = table_and_scales
    call = dict(options, threshold=0.0 if dense else threshold,
                **dict(zip(("k_scale", "v_scale"), table_and_scales)))
    if not layout:
      return bj.decode_attention(q, k, v, lengths, block_kv=block_kv,
                                 **call)
    return bj.paged_decode_attention(q, k, v, table, lengths,
                                     kv_layout=layout, **call)
  cache_shape = (b, n, hkv, d)
  if layout:   # the pool's pages, one table row a sequence
    cache_shape = (b * n // block_kv, block_kv, hkv, d)
    if layout == "HND":
      cache_shape = (cache_shape[0], hkv, block_kv, d)
  args = [sds((b, 1, hq, d), jnp.bfloat16), sds(cache_shape, cache),
          sds(cache_shape, cache), sds((b,), jnp.int32),
          sds((), jnp.float32)]
  if layout:
    args.append(sds((b, n // block_kv), jnp.int32))
  if cache == jnp.float8_e4m3fn:
    args += [sds((hkv,), jnp.float32)] * 2
  out = []
  with captured_output(out):
    jax.jit(attend).trace(*args).lower().compile()
  return ptxas_report(out[0])


def main(argv):
  del argv
  # Read by Mosaic GPU's compiler, which loads with the CUDA plugin below.
  os.environ.setdefault("MOSAIC_GPU_DUMP_PTXAS", "1")
  print(f"jax={jax.__version__}, target: an H200 (sm_90), no GPU attached")
  sds = h200_target.h200_arrays()
  caches = [jnp.dtype(c) for c in _CACHES.value]
  for i in _SHAPE_IDS.value:
    b, hq, hkv, n, d, shape_bkv, _ = ab_decode_mosaic.SHAPES[int(i)]
    for name, build in ab_decode_mosaic.BUILDS[_SET.value].items():
      bkv, config = build[:2]
      layout = ab_decode_mosaic.build_options(build).get("layout")
      for cache in caches:
        for dense in (True, False):
          r = compile_report(sds, (b, hq, hkv, n, d), cache, dense,
                             bkv or shape_bkv, config, layout)
          print(f"b{b} s{n} h{hq}/{hkv} d{d} p{bkv or shape_bkv} "
                f"{jnp.dtype(cache).name:13s} {'dense' if dense else 'skip':5s}"
                f" {name:18s} {r['registers']:3d} registers, "
                f"{r['spill_stores']} / {r['spill_loads']} bytes spilled "
                f"(stores / loads)", flush=True)


if __name__ == "__main__":
  app.run(main)
