"""The README's decode table from the decode study's JSON files
(`experiments/bench_decode.py`), one row per cache of the chosen pattern
and a row per real-model cache:

    python -m experiments.decode_table benchmarks/results/decode_h200.json \
        benchmarks/results/decode_h200_smollm2.json
    python -m experiments.decode_table --pattern=scattered \
        benchmarks/results/decode_h200.json

Columns: cuDNN, the Triton and Mosaic kernels' dense builds (µs and
effective TB/s), Mosaic on an FP8 cache (µs and its speedup over the bf16
dense build), and Mosaic skipping at each target sparsity (µs and speedup
over its dense build). `--detail` adds a table with every pattern, the
copy's TB/s, the skip check at λ = 0 and the sparsities reached.
"""

from __future__ import annotations

import functools
import json
from typing import Sequence

from absl import app
from absl import flags

_PATTERN = flags.DEFINE_string(
    "pattern", "sink_local", "The synthetic pattern of the main table's "
    "rows (real-model caches are always added).")
_DETAIL = flags.DEFINE_bool("detail", False, "Also print the detail table.")
_MODE = flags.DEFINE_string("mode", "anchored",
                            "Our kernel's max_mode (the study runs several).")

SYNTHETIC = ("sink_local", "scattered")
# How the README names the real-model caches.
CACHE_NAMES = {"smollm2": "SmolLM2-135M's caches"}
TARGETS = (0.3, 0.5, 0.7, 0.9)
_MOSAIC, _FP8 = "pallas_mosaic", "float8_e4m3fn"


def load_rows(paths: Sequence[str]) -> list[dict]:
  rows = []
  for path in paths:
    with open(path) as f:
      rows += json.load(f)["rows"]
  return rows


def caches(rows) -> list[tuple]:
  """(pattern, batch, seq_len, head_dim, q_heads, kv_heads) of every cache
  our kernel ran, synthetic patterns first, each in the study's order."""
  keys = dict.fromkeys(
      (r["pattern"], r["batch"], r["seq_len"], r["head_dim"], r["q_heads"],
       r["kv_heads"]) for r in rows if r["impl"] == _MOSAIC)
  return sorted(keys, key=lambda c: (
      SYNTHETIC.index(c[0]) if c[0] in SYNTHETIC else len(SYNTHETIC)))


def find(rows, cache, impl, *, fp8=False, check=False, target=None,
         mode="anchored"):
  """The row of `impl` on `cache`: its dense build (check False), its skip
  build at λ = 0 (check True, target None) or at a target sparsity; our
  kernels' rows in max_mode `mode` (the baselines' are "dense")."""
  for r in rows:
    if ((r["pattern"], r["batch"], r["seq_len"], r["head_dim"], r["q_heads"],
         r["kv_heads"]) == cache and r["impl"] == impl
        and r["mode"] in (mode, "dense")
        and (r.get("cache_dtype") == _FP8) == fp8
        and bool(r.get("skip_check")) == check
        and r.get("target_sparsity") == target):
      return r
  return None


def _label(cache) -> str:
  pattern, b, s, d, hq, hkv = cache
  shape = f"batch {b}, {s // 1024}k"
  if (d, hq, hkv) != (128, 32, 8):
    shape += f", d{d}, {hq} / {hkv} heads"
  if pattern in SYNTHETIC:
    return shape
  return f"{CACHE_NAMES.get(pattern, pattern)}: {shape}"


def _time(r) -> str:
  return f"{r['time_us']:.0f} ({r['effective_tbps']:.2f})" if r else "—"


def _speedup(base, r, sparsity=False) -> str:
  if not (base and r):
    return "—"
  text = f"{r['time_us']:.0f} ({base['time_us'] / r['time_us']:.2f}×"
  return text + (f", {100 * r['sparsity']:.0f} %)" if sparsity else ")")


def main_table(rows, pattern: str = "sink_local",
               mode: str = "anchored") -> str:
  lines = ["| shape | cuDNN | Triton dense | Mosaic dense | Mosaic FP8 cache | "
           + " | ".join(f"{100 * t:.0f} %" for t in TARGETS) + " |",
           "|---" * (5 + len(TARGETS)) + "|"]
  for cache in caches(rows):
    if cache[0] in SYNTHETIC and cache[0] != pattern:
      continue
    dense = find(rows, cache, _MOSAIC, mode=mode)
    cells = [_label(cache), _time(find(rows, cache, "cudnn")),
             _time(find(rows, cache, "pallas_triton", mode=mode)),
             _time(dense),
             _speedup(dense, find(rows, cache, _MOSAIC, fp8=True, mode=mode))]
    cells += [_speedup(dense, find(rows, cache, _MOSAIC, check=True,
                                   target=t, mode=mode)) for t in TARGETS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def detail_table(rows, mode: str = "anchored") -> str:
  lines = ["| cache | copy TB/s (read + written) | Mosaic dense "
           "| check at λ = 0 | FP8 dense | "
           + " | ".join(f"{100 * t:.0f} %" for t in TARGETS)
           + " | FP8 " + " / ".join(f"{100 * t:.0f}" for t in TARGETS)
           + " % |", "|---" * (6 + len(TARGETS)) + "|"]
  ours = functools.partial(find, rows, impl=_MOSAIC, mode=mode)
  for cache in caches(rows):
    dense, fp8 = ours(cache), ours(cache, fp8=True)
    copy, check = find(rows, cache, "copy"), ours(cache, check=True)
    cells = [(f"{cache[0]}, " if cache[0] in SYNTHETIC else "")
             + _label(cache),
             f"{2 * copy['effective_tbps']:.2f}" if copy else "—",
             _time(dense), _speedup(dense, check), _time(fp8)]
    cells += [_speedup(dense, ours(cache, check=True, target=t),
                       sparsity=True) for t in TARGETS]
    fp8_skips = [ours(cache, fp8=True, check=True, target=t)
                 for t in TARGETS]
    cells.append(" / ".join(f"{fp8['time_us'] / r['time_us']:.2f}"
                            if fp8 and r else "—" for r in fp8_skips))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("Give the decode study's JSON files.")
  rows = load_rows(argv[1:])
  print(main_table(rows, _PATTERN.value, _MODE.value))
  if _DETAIL.value:
    print()
    print(detail_table(rows, _MODE.value))


if __name__ == "__main__":
  app.run(main)
