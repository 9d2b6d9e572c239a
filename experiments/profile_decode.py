r"""Runs the decode kernel once per variant, for a hardware profiler to read.

    ncu --clock-control none -k regex:blasst_decode \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        python -m experiments.profile_decode --batch=1 --seq_len=131072 \
        --variants=dense:anchored,1e-3:anchored

Each variant ("λ:max_mode[:splits]", λ "dense" for the build without the
skip check) is compiled and run once (the profiler replays the launch); the
output prints one line per profiled call, in order.
"""

from __future__ import annotations


from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import blasst_jax as bj
from blasst_jax import patterns

_BATCH = flags.DEFINE_integer("batch", 1, "Sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 131072, "Cache length (all full).")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["dense:split", "1e-3:anchored", "1e-3:global"],
    "λ:max_mode[:splits] to run, in order.")


def main(argv):
  del argv
  b, s = _BATCH.value, _SEQ_LEN.value
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(0), batch=b, seq_len=s, q_heads=_Q_HEADS.value,
      kv_heads=_KV_HEADS.value, head_dim=128, dtype=jnp.bfloat16,
      sharpness=(10.0, 14.0, 18.0, 22.0), sink_tokens=4, window=64)
  q, lengths = q[:, -1], jnp.full((b,), s, jnp.int32)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__} b{b} s{s} "
        f"hq{_Q_HEADS.value} hkv{_KV_HEADS.value}", flush=True)
  for variant in _VARIANTS.value:
    thr, mode, *splits = variant.split(":")
    threshold = 0.0 if thr == "dense" else jnp.float32(float(thr))
    fn = jax.jit(lambda q, k, v, mode=mode, threshold=threshold,
                 splits=splits: bj.decode_attention(
                     q, k, v, lengths, threshold=threshold, max_mode=mode,
                     num_splits=int(splits[0]) if splits else None,
                     return_stats=True))
    _, stats = jax.block_until_ready(fn(q, k, v))
    print(f"launch: {variant} sparsity={float(stats.total_sparsity):.3f}",
          flush=True)


if __name__ == "__main__":
  app.run(main)
