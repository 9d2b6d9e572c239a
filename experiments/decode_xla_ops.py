r"""What XLA runs around the Hopper decode kernel, compiled without a GPU.

    pip install "jax[cuda13]==0.11.2"      # the CUDA plugin; no GPU needed
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu \
        python -m experiments.decode_xla_ops --with_fp8

XLA's GPU compiler runs ahead of time from a description of the target
(`h200_target`: an H200), so the optimized HLO of a `decode_attention`
call, and with it every kernel XLA launches before and after the Mosaic
GPU call, can be read on a machine without a GPU. Each small kernel costs
a few microseconds of a decode step (docs/decode_h200.md, "Time outside the
kernel"). Prints, per shape of `testing.DECODE_BENCH_SHAPES` (dense and
skipping builds), the instructions of the entry computation other than
parameters, bitcasts and tuple reads.
"""

from __future__ import annotations

import re

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import blasst_jax as bj
from blasst_jax import testing
from experiments import h200_target

_WITH_FP8 = flags.DEFINE_bool("with_fp8", False, "FP8 (e4m3) pages too.")
_STATS = flags.DEFINE_bool("stats", False,
                           "Return the stats too (an XLA kernel after).")
_SPLITS = flags.DEFINE_integer("num_splits", 4, "Split-K factor.")

_SKIPPED = ("parameter(", "bitcast(", "get-tuple-element(")


def entry_ops(compiled) -> list[str]:
  """The entry computation's instructions, less metadata and configs."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):].splitlines()[2:]
  ops = []
  for line in entry:
    line = re.sub(r", (metadata|backend_config|sharding)=.*", "",
                  line.strip())
    if line and line != "}" and not any(s in line for s in _SKIPPED):
      ops.append(line)
  return ops


def main(argv):
  del argv
  print(f"jax={jax.__version__}, target: an H200 (sm_90), no GPU attached")
  sds = h200_target.h200_arrays()
  caches = [jnp.bfloat16] + ([jnp.float8_e4m3fn] if _WITH_FP8.value else [])
  for shape in testing.DECODE_BENCH_SHAPES:
    b, hq, hkv, n, d = shape.bench_tuple
    for cache in caches:
      for dense in (True, False):
        def fn(q, k, v, lengths, thr, k_scale=None, v_scale=None,
               dense=dense):
          return bj.decode_attention(
              q, k, v, lengths, threshold=0.0 if dense else thr,
              num_splits=_SPLITS.value, implementation="pallas_mosaic",
              return_stats=_STATS.value, k_scale=k_scale, v_scale=v_scale)
        args = [sds((b, 1, hq, d), jnp.bfloat16), sds((b, n, hkv, d), cache),
                sds((b, n, hkv, d), cache), sds((b,), jnp.int32),
                sds((), jnp.float32)]
        if cache != jnp.bfloat16:
          args += [sds((hkv,), jnp.float32)] * 2
        ops = entry_ops(jax.jit(fn).trace(*args).lower().compile())
        kernels = [o for o in ops if " fusion(" in o or "custom-call(" in o]
        print(f"== B{b} {n // 1024}k d{d} {jnp.dtype(cache).name} "
              f"{'dense' if dense else 'skip'}: {len(kernels)} kernels")
        for op in ops:
          print("  ", op[:200])


if __name__ == "__main__":
  app.run(main)
