"""Shapes, inputs, timing and result files shared by the test suite and the
benchmarks."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from blasst_jax import patterns


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """One attention problem: q [batch, q_len, q_heads, head_dim],
  k/v [batch, kv_len, kv_heads, head_dim]."""

  batch: int
  q_len: int
  kv_len: int
  q_heads: int
  kv_heads: int
  head_dim: int

  @property
  def name(self) -> str:
    """A file-name-safe label, e.g. "b2_q128_kv128_h2x2_d32"."""
    return (f"b{self.batch}_q{self.q_len}_kv{self.kv_len}_h{self.q_heads}"
            f"x{self.kv_heads}_d{self.head_dim}")

  def flops(self, causal: bool) -> float:
    """4·B·Hq·Sq·Skv·D, halved for causal (as every FA benchmark counts)."""
    f = 4.0 * self.batch * self.q_heads * self.q_len * self.kv_len * self.head_dim
    return f / 2 if causal else f

  def inputs(self, key, *, pattern: str = "sink_local", dtype=jnp.float32,
             **pattern_kwargs):
    """(q, k, v) with a named score pattern: "sink_local" or "random".

    Args:
      key: PRNG key.
      pattern: "sink_local" (`patterns.sink_local_qkv`) or "random"
        (`patterns.random_qkv`).
      dtype: dtype of the arrays.
      **pattern_kwargs: passed to the pattern function.

    Returns:
      q [batch, q_len, q_heads, head_dim], k and v [batch, kv_len,
      kv_heads, head_dim].

    Raises:
      ValueError: for an unknown `pattern`.
    """
    common = dict(batch=self.batch, seq_len=self.q_len, kv_len=self.kv_len,
                  q_heads=self.q_heads, kv_heads=self.kv_heads,
                  head_dim=self.head_dim, dtype=dtype)
    if pattern == "sink_local":
      return patterns.sink_local_qkv(key, **common, **pattern_kwargs)
    if pattern == "random":
      return patterns.random_qkv(key, **common, **pattern_kwargs)
    raise ValueError(f"Unknown pattern {pattern!r}; use 'sink_local' or "
                     "'random'.")


# Small problems every implementation is tested on (CPU, interpret mode):
# odd lengths, q_len != kv_len, MHA/GQA/MQA, head_dim not a power of two.
CPU_TEST_SHAPES = (
    AttentionShape(batch=2, q_len=128, kv_len=128, q_heads=2, kv_heads=2, head_dim=32),
    AttentionShape(batch=1, q_len=100, kv_len=200, q_heads=4, kv_heads=2, head_dim=32),
    AttentionShape(batch=2, q_len=77, kv_len=77, q_heads=4, kv_heads=1, head_dim=16),
    AttentionShape(batch=1, q_len=96, kv_len=160, q_heads=3, kv_heads=3, head_dim=40),
)

# Prefill benchmark problems (H100, bf16, head_dim 128): batch·heads keep the
# GPU full at every length.
PREFILL_BENCH_SHAPES = (
    AttentionShape(batch=8, q_len=4096, kv_len=4096, q_heads=16, kv_heads=16, head_dim=128),
    AttentionShape(batch=4, q_len=8192, kv_len=8192, q_heads=16, kv_heads=16, head_dim=128),
    AttentionShape(batch=2, q_len=16384, kv_len=16384, q_heads=16, kv_heads=16, head_dim=128),
)


def median_time_ms(fn, *args, warmup: int, iters: int, reps: int = 1) -> float:
  """Median wall time of one `fn(*args)` call in ms, synchronised on the
  device. With `reps > 1`, each sample queues `reps` calls before waiting, so
  host dispatch overlaps device work (for calls of ~100 µs)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) * 1e3 / reps)
  return statistics.median(samples)


def find_threshold(fn, args, target: float, *, steps: int):
  """(λ, sparsity): bisection on log10 λ in [-8, 0] for the block sparsity
  `target` through `fn(*args, λ)`, which returns (out, stats) with a
  `stats.total_sparsity`; the probe nearest the target."""
  lo, hi, best = -8.0, 0.0, None
  for _ in range(steps):
    mid = (lo + hi) / 2
    sparsity = float(fn(*args, jnp.float32(10.0 ** mid))[1].total_sparsity)
    if best is None or abs(sparsity - target) < abs(best[1] - target):
      best = (10.0 ** mid, sparsity)
    lo, hi = (mid, hi) if sparsity < target else (lo, mid)
  return best


def announce_device() -> tuple[dict, bool]:
  """Prints the device kind and jax version (a benchmark's first line).

  Returns:
    ({"device_kind", "jax_version"} for the result file, whether it is a GPU).
  """
  device = jax.devices()[0]
  print(f"device_kind={device.device_kind} platform={device.platform} "
        f"jax={jax.__version__}", flush=True)
  return (dict(device_kind=device.device_kind, jax_version=jax.__version__),
          device.platform == "gpu")


def device_tag(device_kind: str) -> str:
  """A short file-name tag of a device kind: "NVIDIA H200" -> "h200",
  "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
  words = device_kind.lower().replace("nvidia", "").split()
  return words[0] if words else "unknown"


def result_path(output_dir: str, output_name: str, stem: str,
                device_kind: str) -> str:
  """`output_dir/NAME.json`, NAME = output_name or f"{stem}_{device_tag}"
  (results are named by the device they were measured on)."""
  name = output_name or f"{stem}_{device_tag(device_kind)}"
  return os.path.join(output_dir, name + ".json")


def save_json(result: dict, output: str) -> str:
  """Writes `result` to `output` as JSON (making its folder); returns the
  path of the PNG that goes beside it."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=1)
  return os.path.splitext(output)[0] + ".png"
