"""The GPU's own timeline of queued calls, from a `jax.profiler` trace.

`kernel_timeline(fn, args, calls)` queues `calls` calls of `fn` under the
profiler and returns the kernels the busiest GPU stream ran, in order, with
their start and duration (µs, from CUPTI's timestamps); `summarize` splits
that timeline into the repeating pattern of one call and gives each
kernel's median duration, the median gap before it, and the period of a
call (the kernels' time plus the gaps, what a queue of such calls costs the
GPU, without the host's start and final wait that a wall clock adds).
`host_events` gives the host's events of the same trace that recur every
call, by time a call.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import statistics
import tempfile

import jax


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str
  start_us: float
  dur_us: float


def _events_and_gpu_pids(trace) -> tuple[list, set]:
  """The trace's events, and the ids of its GPU processes."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return events, {e["pid"] for e in events
                  if e.get("ph") == "M" and e.get("name") == "process_name"
                  and "/device:GPU" in e["args"]["name"]}


def stream_kernels(trace: dict) -> list[Kernel]:
  """The complete events of the GPU stream with the most of them."""
  events, gpu_pids = _events_and_gpu_pids(trace)
  streams = {(e["pid"], e["tid"]) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"
             and e["pid"] in gpu_pids
             and e["args"]["name"].startswith("Stream")}
  by_stream = {}
  for e in events:
    if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams:
      by_stream.setdefault((e["pid"], e["tid"]), []).append(
          Kernel(e["name"], float(e["ts"]), float(e["dur"])))
  if not by_stream:
    names = sorted({e["args"]["name"] for e in events if e.get("ph") == "M"
                    and e.get("name") in ("process_name", "thread_name")})
    raise RuntimeError("the trace holds no GPU stream's kernels (no GPU, or "
                       f"no CUPTI); its processes and threads: {names}")
  kernels = max(by_stream.values(), key=len)
  return sorted(kernels, key=lambda k: k.start_us)


def host_events(trace: dict, calls: int, top: int = 8) -> list[dict]:
  """The host's events that happen once or more a call (outside the GPU's
  processes), by name: count a call, median duration, the `top` by their
  product (time a call; the median leaves out the rare long one). Where
  the host's work a call nears the GPU's period, the host sets the pace
  of queued calls."""
  events, gpu_pids = _events_and_gpu_pids(trace)
  by_name = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") not in gpu_pids:
      by_name.setdefault(e["name"], []).append(float(e["dur"]))
  rows = [{"name": name[:60], "per_call": len(durs) / calls,
           "dur_us": statistics.median(durs),
           "us_per_call": statistics.median(durs) * len(durs) / calls}
          for name, durs in by_name.items() if len(durs) >= calls]
  return sorted(rows, key=lambda r: -r["us_per_call"])[:top]


def trace(fn, args, calls: int = 20) -> dict:
  """The perfetto trace of `calls` queued calls of `fn(*args)` (after one
  warm-up)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    path, = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                      recursive=True)
    with gzip.open(path) as f:
      return json.load(f)


def kernel_timeline(fn, args, calls: int = 20) -> list[Kernel]:
  """Kernels of `calls` queued calls of `fn(*args)` (after one warm-up)."""
  return stream_kernels(trace(fn, args, calls))


def summarize(kernels: list[Kernel], calls: int) -> dict:
  """Per kernel of one call (in order): median duration and gap before it
  (the first's gap is from the previous call's last kernel); the median
  period of a call; the calls' first kernel located by the pattern's
  length (len(kernels) / calls, which must divide)."""
  per_call, rest = divmod(len(kernels), calls)
  if rest or not per_call:
    raise ValueError(f"{len(kernels)} kernels do not split into {calls} "
                     "calls of the same kernels")
  gaps = [b.start_us - (a.start_us + a.dur_us)
          for a, b in zip(kernels, kernels[1:])]
  rows = []
  for i in range(per_call):
    durs = [k.dur_us for k in kernels[i::per_call]]
    before = gaps[i - 1::per_call] if i else gaps[per_call - 1::per_call]
    rows.append({"name": kernels[i].name[:60],
                 "dur_us": statistics.median(durs),
                 "gap_before_us": statistics.median(before)})
  starts = [k.start_us for k in kernels[::per_call]]
  periods = [b - a for a, b in zip(starts, starts[1:])]
  return {"kernels": rows, "period_us": statistics.median(periods),
          "busy_us": sum(r["dur_us"] for r in rows)}


def format_summary(summary: dict) -> str:
  lines = [f"  period {summary['period_us']:.1f} us = kernels "
           f"{summary['busy_us']:.1f} + gaps "
           f"{summary['period_us'] - summary['busy_us']:.1f}"]
  for row in summary["kernels"]:
    lines.append(f"    gap {row['gap_before_us']:6.1f}  kernel "
                 f"{row['dur_us']:7.1f}  {row['name']}")
  return "\n".join(lines)


def format_host(rows: list[dict]) -> str:
  return "\n".join(
      f"    host {r['us_per_call']:7.1f} us a call ({r['per_call']:.2g} x "
      f"{r['dur_us']:.1f})  {r['name']}" for r in rows)
