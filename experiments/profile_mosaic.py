r"""Runs the Hopper kernel once per λ, for a hardware profiler to read.

Each variant is compiled, warmed up outside the profiled range, then run once
inside `jax.profiler.TraceAnnotation`-free straight code, so that

    ncu --clock-control none -k regex:blasst_prefill_mosaic \
        --launch-skip-before-match 0 --section SpeedOfLight \
        python experiments/profile_mosaic.py --seq_len=16384

reports one launch per line of this script's output, in the same order
(one variant per process, `--variants=1e-2`, if the profiler struggles with
several compilations in one process).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from blasst_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from blasst_jax import testing
from blasst_jax.kernels import pallas_mosaic

_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16384, "q_len = kv_len.")
_HEADS = flags.DEFINE_integer("heads", 16, "Query = key/value heads.")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal mask.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["dense", "0", "1e-2", "1e-1", "0.9"],
    "λ values to run, in order; 'dense' is the build without the skip check; "
    "'<λ>:stream_v' streams every V block (MosaicConfig(copy_v_if_kept="
    "False)).")


def main(argv):
  del argv
  shape = testing.AttentionShape(_BATCH.value, _SEQ_LEN.value, _SEQ_LEN.value,
                                 _HEADS.value, _HEADS.value, 128)
  q, k, v = shape.inputs(jax.random.PRNGKey(0), pattern="sink_local",
                         dtype=jnp.bfloat16, sharpness=(10., 14., 18., 22.))
  kv_lengths = jnp.full((shape.batch,), shape.kv_len, jnp.int32)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__} {shape.name} "
        f"causal={_CAUSAL.value}", flush=True)
  variants = [(0.0, False, True) if t == "dense" else
              (float(t.split(":")[0]), True, not t.endswith(":stream_v"))
              for t in _VARIANTS.value]
  for threshold, skip, copy_v_if_kept in variants:
    config = pallas_mosaic.MosaicConfig(copy_v_if_kept=copy_v_if_kept)
    log_thr = config_lib.log_threshold(
        jnp.full((shape.batch,), threshold, jnp.float32))
    fn = jax.jit(lambda q, k, v, lt, skip=skip: pallas_mosaic.attention_forward(
        q, k, v, kv_lengths, lt, causal=_CAUSAL.value,
        sm_scale=shape.head_dim ** -0.5, skip_enabled=skip, config=config))
    out = jax.block_until_ready(fn(q, k, v, log_thr))
    sparsity = float(jnp.sum(out[2])) / max(1, float(jnp.sum(out[3])))
    print(f"launch: λ={threshold:g} skip_check={skip} "
          f"copy_v_if_kept={copy_v_if_kept} sparsity={sparsity:.3f}",
          flush=True)


if __name__ == "__main__":
  app.run(main)
