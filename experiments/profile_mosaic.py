r"""Runs the Hopper kernel once per variant, for a profiler to read.

Each variant is compiled, warmed up, then run once, so that

    ncu --clock-control none -k regex:blasst_prefill_mosaic \
        --launch-skip-before-match 0 --section SpeedOfLight \
        python -m experiments.profile_mosaic --seq_len=16384

reports one launch per line of this script's output, in the same order.
`--cudnn` runs cuDNN's attention once first, to set beside them:

    ncu --clock-control none -k regex:"blasst_prefill_mosaic|sdpa|fmha|flash" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis python -m experiments.profile_mosaic \
        --cudnn --head_dim=64 --batch=16 --heads=9 --kv_heads=3 \
        --seq_len=8192 --causal --variants=dense,0

`--trace=DIR` instead builds each variant with the kernel's own timeline
(`MosaicConfig(trace_dir=..., trace_events=...)`): every warpgroup records
the clock around its named regions (barrier waits, the vote, the softmax).
The script sums the regions per warpgroup role and prints, per variant, the
mean cycles a program's warpgroup spends in each, and in each per block, and
writes the table to DIR/summary.json. Keep the grid small (the trace is a
host-side JSON per call), e.g. `--batch=1 --heads=4 --seq_len=8192`.

Variants: 'dense' (the build without the skip check) or a λ, with optional
':'-separated knobs: 'v_if_kept' (copy_v_if_kept=True; 'stream_v' for
False, the default), 'pingpong' (overlap_qk=False: two tensor-core turns a
block), 'overlap' / 'no_overlap' (overlap_dense=True, the default / False:
the dense build on the overlapped loop or on the ping-pong), 'c<N>'
(cluster_q=N: K/V multicast to N programs along q), 'k<N>'
(extra_k_stages=N), 'w<N>' (compute_wgs=N), 'm<N>' (memory_registers=N),
'e<N>' (exp2_fma_cols=N: N columns of each score tile exponentiated on
the FMA pipe), 'kv<N>' (block_kv=N; default `default_block_kv`),
'raster_q', 'vote2' (one_barrier_vote=False: the two-barrier reduction).
With --time, cuDNN's time on the same inputs is printed first; with
--rounds=N as well, every build is timed again in N interleaved rounds:

    python -m experiments.profile_mosaic --time --rounds=7 \
        --variants=dense,0,1e-2
"""

from __future__ import annotations

import collections
import glob
import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import config as config_lib
from blasst_jax import testing
from blasst_jax.kernels import pallas_mosaic

_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16384, "q_len = kv_len.")
_HEADS = flags.DEFINE_integer("heads", 16, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 0, "KV heads (0: = heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal mask.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["dense", "0", "1e-2", "1e-1", "0.9"],
    "Variants, in order: 'dense' or a λ, with ':'-separated knobs "
    "(v_if_kept, stream_v, pingpong, overlap, no_overlap, c<N>, k<N>, "
    "w<N>, m<N>, e<N>, kv<N>, raster_q, vote2).")
_TRACE = flags.DEFINE_string(
    "trace", "", "Directory: record the kernel's timeline and sum it.")
_TRACE_EVENTS = flags.DEFINE_integer(
    "trace_events", 1200, "Named regions a warpgroup may record (--trace).")
_TIME = flags.DEFINE_bool("time", False, "Also print the median time.")
_CUDNN = flags.DEFINE_bool(
    "cudnn", False, "Run cuDNN's attention on the same inputs once before "
    "the variants (a launch for a profiler to compare).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "With --time and > 1: after the launches, time cuDNN and "
    "every variant again in this many interleaved rounds and print each "
    "one's median over the rounds with its spread (an A/B of a few percent "
    "needs it: clocks and neighbours drift between a script's variants).")


def roles(compute_wgs: int) -> tuple[str, ...]:
  return tuple(f"compute{w}" for w in range(compute_wgs)) + ("memory",)


def parse_variant(text: str, trace_dir: str):
  """'1e-2:pingpong:k0' -> (λ, skip_enabled, MosaicConfig, block_kv)."""
  head, *knobs = text.split(":")
  kwargs = {}
  block_kv = pallas_mosaic.default_block_kv(_HEAD_DIM.value)
  for knob in knobs:
    if knob.startswith("kv") and knob[2:].isdigit():
      block_kv = int(knob[2:])
    elif knob in ("stream_v", "v_if_kept"):
      kwargs["copy_v_if_kept"] = knob == "v_if_kept"
    elif knob == "pingpong":
      kwargs["overlap_qk"] = False
    elif knob in ("overlap", "no_overlap"):
      kwargs["overlap_dense"] = knob == "overlap"
    elif knob == "vote2":
      kwargs["one_barrier_vote"] = False
    elif knob.startswith("c") and knob[1:].isdigit():
      kwargs["cluster_q"] = int(knob[1:])
    elif knob == "raster_q":
      kwargs["raster"] = "q"
    elif knob.startswith("k") and knob[1:].isdigit():
      kwargs["extra_k_stages"] = int(knob[1:])
    elif knob.startswith("w") and knob[1:].isdigit():
      kwargs["compute_wgs"] = int(knob[1:])
    elif knob.startswith("m") and knob[1:].isdigit():
      kwargs["memory_registers"] = int(knob[1:])
    elif knob.startswith("e") and knob[1:].isdigit():
      kwargs["exp2_fma_cols"] = int(knob[1:])
    else:
      raise ValueError(f"Unknown knob {knob!r} in variant {text!r}.")
  if trace_dir:
    # The trace buffer takes shared memory the auto-sized K ring would use.
    kwargs.setdefault("extra_k_stages", 0)
    kwargs.update(trace_dir=trace_dir, trace_events=_TRACE_EVENTS.value)
  dense = head == "dense"
  return (0.0 if dense else float(head)), not dense, (
      pallas_mosaic.MosaicConfig(**kwargs)), block_kv


def summarize_trace(path: str, compute_wgs: int) -> dict:
  """Mean cycles per program in each named region, per warpgroup role."""
  names = roles(compute_wgs)
  role_of = lambda tid: names[(tid - 1) % len(names)]  # pylint: disable=g-long-lambda
  with open(path) as f:
    events = json.load(f)["traceEvents"]
  totals = collections.defaultdict(lambda: collections.defaultdict(float))
  counts = collections.defaultdict(lambda: collections.defaultdict(int))
  spans = collections.defaultdict(list)
  open_at = {}
  first_last = {}
  for e in events:
    tid, name, ts = e["tid"], e["name"], e["ts"] * 1e3   # cycles
    role = role_of(tid)
    lo, hi = first_last.get(tid, (ts, ts))
    first_last[tid] = (min(lo, ts), max(hi, ts))
    if e["ph"] == "B":
      open_at[(tid, name)] = ts
    else:
      totals[role][name] += ts - open_at.pop((tid, name))
      counts[role][name] += 1
  for tid, (lo, hi) in first_last.items():
    spans[role_of(tid)].append(hi - lo)
  n_tids = collections.Counter(role_of(t) for t in first_last)
  out = {}
  for role in names:
    n = max(1, n_tids[role])
    out[role] = {
        "programs": n_tids[role],
        "span_cycles": float(np.mean(spans[role])) if spans[role] else 0.0,
        "regions": {name: {"cycles": totals[role][name] / n,
                           "count": counts[role][name] / n,
                           "per_event": totals[role][name]
                                        / max(1, counts[role][name])}
                    for name in sorted(totals[role])},
    }
  return out


def print_summary(label: str, summary: dict) -> None:
  print(f"  trace {label}")
  for role, info in summary.items():
    if not isinstance(info, dict) or "regions" not in info:
      continue
    span = max(info["span_cycles"], 1.0)
    print(f"    {role}: {info['span_cycles']:.0f} cycles from first to last "
          f"event ({info['programs']} warpgroups)")
    for name, r in sorted(info["regions"].items(),
                          key=lambda kv: -kv[1]["cycles"]):
      print(f"      {name:10s} {r['cycles']:10.0f} cycles "
            f"{100 * r['cycles'] / span:5.1f}%  x{r['count']:.0f} "
            f"({r['per_event']:.0f} each)")


def interleaved_rounds(timed: dict, rounds: int, time_ms) -> dict:
  """{name: [ms per round]}: every (fn, args) of `timed` timed once per
  round by time_ms(fn, *args), round after round, so that a drift of the
  machine's speed reaches every build alike."""
  samples = {name: [] for name in timed}
  for _ in range(rounds):
    for name, (fn, args) in timed.items():
      samples[name].append(time_ms(fn, *args))
  return samples


def print_rounds(timed: dict, rounds: int) -> None:
  samples = interleaved_rounds(
      timed, rounds, lambda fn, *args: testing.median_time_ms(
          fn, *args, warmup=1, iters=10))
  print(f"interleaved, {rounds} rounds: median ms (min-max)", flush=True)
  for name, ms in samples.items():
    print(f"  {name}: {np.median(ms):.3f} ({min(ms):.3f}-{max(ms):.3f})",
          flush=True)


def main(argv):
  del argv
  shape = testing.AttentionShape(_BATCH.value, _SEQ_LEN.value, _SEQ_LEN.value,
                                 _HEADS.value, _KV_HEADS.value or _HEADS.value,
                                 _HEAD_DIM.value)
  q, k, v = shape.inputs(jax.random.PRNGKey(0), pattern="sink_local",
                         dtype=jnp.bfloat16, sharpness=(10., 14., 18., 22.))
  kv_lengths = jnp.full((shape.batch,), shape.kv_len, jnp.int32)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__} {shape.name} "
        f"causal={_CAUSAL.value}", flush=True)
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=_CAUSAL.value, implementation="cudnn"))
  if _CUDNN.value:
    jax.block_until_ready(cudnn(q, k, v))
    print("launch: cudnn", flush=True)
  if _TIME.value:
    t = testing.median_time_ms(cudnn, q, k, v, warmup=3, iters=10)
    print(f"cudnn {t:.3f} ms", flush=True)
  timed = {"cudnn": (cudnn, (q, k, v))} if _TIME.value else {}
  summaries = {}
  for text in _VARIANTS.value:
    trace_dir = ""
    if _TRACE.value:
      trace_dir = os.path.join(_TRACE.value, text.replace(":", "_"))
      os.makedirs(trace_dir, exist_ok=True)
    threshold, skip, config, block_kv = parse_variant(text, trace_dir)
    log_thr = config_lib.log_threshold(
        jnp.full((shape.batch,), threshold, jnp.float32))
    fn = jax.jit(lambda q, k, v, lt, skip=skip, config=config,
                 block_kv=block_kv: pallas_mosaic.attention_forward(
                     q, k, v, kv_lengths, lt, causal=_CAUSAL.value,
                     sm_scale=shape.head_dim ** -0.5, skip_enabled=skip,
                     block_kv=block_kv, config=config))
    out = jax.block_until_ready(fn(q, k, v, log_thr))
    sparsity = float(jnp.sum(out[2])) / max(1, float(jnp.sum(out[3])))
    # Skipped blocks and an output digest: builds that agree show both equal.
    digest = float(jnp.abs(out[0].astype(jnp.float32)).sum())
    line = (f"launch: {text} sparsity={sparsity:.3f} "
            f"skipped={int(jnp.sum(out[2]))} |out|={digest:.6e}")
    if _TIME.value:
      line += (f" {testing.median_time_ms(fn, q, k, v, log_thr, warmup=3, iters=10):.3f}"
               " ms")
    print(line, flush=True)
    if _TIME.value:
      timed[text] = (fn, (q, k, v, log_thr))
    if trace_dir:
      newest = max(glob.glob(os.path.join(trace_dir, "*-trace.json")),
                   key=os.path.getmtime)
      summaries[text] = dict(sparsity=sparsity, **summarize_trace(
          newest, config.resolved(shape.head_dim, skip).compute_wgs))
      print_summary(text, summaries[text])
  if _ROUNDS.value > 1 and timed:
    print_rounds(timed, _ROUNDS.value)
  if _TRACE.value:
    with open(os.path.join(_TRACE.value, "summary.json"), "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, shape=shape.name,
                     causal=_CAUSAL.value, variants=summaries), f, indent=1)


if __name__ == "__main__":
  app.run(main)
