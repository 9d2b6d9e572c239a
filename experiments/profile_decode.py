r"""Runs the decode kernel once per variant, for a hardware profiler to read.

    ncu --clock-control none -k regex:blasst_decode \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        python -m experiments.profile_decode --batch=1 --seq_len=131072 \
        --variants=dense:anchored,1e-3:anchored

Each variant ("λ:max_mode[:splits]", λ "dense" for the build without the
skip check) is compiled and run once (the profiler replays the launch); the
output prints one line per profiled call, in order (with `--nostats`, each
variant's first call, with the stats, comes before the profiled one). With
`--wall`, each variant's call is also timed (median µs, 10 and 100 calls
queued per sample, and the host's time to issue a call), for the time
outside the kernels: run it without the profiler, and under

    ncu --clock-control none --metrics gpu__time_duration.sum python -m \
        experiments.profile_decode --batch=8 --seq_len=32768

for every kernel of a call (the query's fusion before it, the stats after).
With `--trace`, the GPU's own timeline of 20 queued calls (`jax.profiler`):
each kernel's duration, the gap before it and the period of a call.
`--head_dim` and `--fp8` (an FP8 cache with per-head scales) give the other
caches of the study, e.g. SmolLM2's shape: `--batch=120 --seq_len=8192
--q_heads=9 --kv_heads=3 --head_dim=64 --fp8`.
"""

from __future__ import annotations

import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import testing
from experiments import gpu_timeline

_BATCH = flags.DEFINE_integer("batch", 1, "Sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 131072, "Cache length (all full).")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_FP8 = flags.DEFINE_bool(
    "fp8", False, "FP8 (e4m3) cache with per-head scales "
    "(`decode.quantize_cache`) instead of bf16.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["dense:split", "1e-3:anchored", "1e-3:global"],
    "λ:max_mode[:splits] to run, in order.")
_WALL = flags.DEFINE_bool(
    "wall", False, "Also time each variant's call (median µs of 10 and of "
    "100 queued calls, and the host's time to issue one).")
_STATS = flags.DEFINE_bool(
    "stats", True, "The profiled and timed call returns the stats too (a few "
    "small XLA kernels after the kernel); --nostats: the output alone, as "
    "the study times it (the sparsity printed comes from a call before).")
_TRACE = flags.DEFINE_bool(
    "trace", False, "Also print the GPU timeline of 20 queued calls: each "
    "kernel's median duration and the gap before it (jax.profiler).")


def main(argv):
  del argv
  b, s = _BATCH.value, _SEQ_LEN.value
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(0), batch=b, seq_len=s, q_heads=_Q_HEADS.value,
      kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value, dtype=jnp.bfloat16,
      sharpness=(10.0, 14.0, 18.0, 22.0), sink_tokens=4, window=64)
  q, lengths = q[:, -1], jnp.full((b,), s, jnp.int32)
  scales = {}
  if _FP8.value:
    k, scales["k_scale"] = bj.decode.quantize_cache(k)
    v, scales["v_scale"] = bj.decode.quantize_cache(v)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__} b{b} s{s} "
        f"hq{_Q_HEADS.value} hkv{_KV_HEADS.value} d{_HEAD_DIM.value}"
        + (" fp8" if _FP8.value else ""), flush=True)
  for variant in _VARIANTS.value:
    thr, mode, *splits = variant.split(":")
    threshold = 0.0 if thr == "dense" else jnp.float32(float(thr))
    def attend(q, k, v, stats, mode=mode, threshold=threshold,
               splits=splits):
      return bj.decode_attention(
          q, k, v, lengths, threshold=threshold, max_mode=mode,
          num_splits=int(splits[0]) if splits else None, return_stats=stats,
          **scales)
    with_stats = jax.jit(functools.partial(attend, stats=True))
    _, stats = jax.block_until_ready(with_stats(q, k, v))
    sparsity = float(stats.total_sparsity)
    fn = with_stats
    if not _STATS.value:
      fn = jax.jit(functools.partial(attend, stats=False))
      jax.block_until_ready(fn(q, k, v))
    wall = ""
    if _WALL.value:
      us = {reps: 1e3 * testing.median_time_ms(fn, q, k, v, warmup=3,
                                               iters=20, reps=reps)
            for reps in (10, 100)}
      issue = 1e3 * testing.median_time_ms(fn, q, k, v, warmup=1, iters=20,
                                           reps=10, until_issued=True)
      wall = (f" wall={us[10]:.1f}us (100 queued: {us[100]:.1f}; the host "
              f"issues a call in {issue:.1f})")
    print(f"launch: {variant} sparsity={sparsity:.3f}{wall}", flush=True)
    if _TRACE.value:
      calls = 20
      trace = gpu_timeline.trace(fn, (q, k, v), calls)
      print(gpu_timeline.format_summary(gpu_timeline.summarize(
          gpu_timeline.stream_kernels(trace), calls)), flush=True)
      print(gpu_timeline.format_host(gpu_timeline.host_events(trace, calls)),
            flush=True)


if __name__ == "__main__":
  app.run(main)
