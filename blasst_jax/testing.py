"""Shapes, inputs, checks, timing and result files shared by the test suite
and the benchmarks.

The problem lists live here once: the test suites (tests/test_base.py and
its subclasses) draw their shapes from the `*_TEST_SHAPES` tuples, the
benchmark configs (configs/bench_*.py) from the `*_BENCH_SHAPES` ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import config as config_lib
from blasst_jax import patterns
from blasst_jax.ops import base as ops_base


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

  @property
  def bench_tuple(self) -> tuple[int, int, int, int, int]:
    """(batch, seq_len, q_heads, kv_heads, head_dim), the prefill benchmark
    configs' row (q_len = kv_len)."""
    if self.q_len != self.kv_len:
      raise ValueError(f"{self.name}: benchmark rows have q_len == kv_len.")
    return (self.batch, self.q_len, self.q_heads, self.kv_heads,
            self.head_dim)

  @classmethod
  def from_bench_tuple(cls, t) -> "AttentionShape":
    b, s, hq, hkv, d = t
    return cls(batch=b, q_len=s, kv_len=s, q_heads=hq, kv_heads=hkv,
               head_dim=d)


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  """One decode step: q [batch, q_heads, head_dim] (the newest token) against
  caches k/v [batch, max_len, kv_heads, head_dim]."""

  batch: int
  q_heads: int
  kv_heads: int
  max_len: int
  head_dim: int

  @property
  def name(self) -> str:
    """A file-name-safe label, e.g. "b3_h8x2_kv320_d32"."""
    return (f"b{self.batch}_h{self.q_heads}x{self.kv_heads}_kv{self.max_len}"
            f"_d{self.head_dim}")

  @property
  def group(self) -> int:
    return self.q_heads // self.kv_heads

  def cache_bytes(self, itemsize: int) -> int:
    """Bytes of K and V that a dense step over full caches reads."""
    return (2 * self.batch * self.max_len * self.kv_heads * self.head_dim
            * itemsize)

  def inputs(self, key, *, dtype=jnp.float32, window: int = 16,
             sharpness=(16.0, 24.0), **pattern_kwargs):
    """(q, k, v): the last position's query and caches with sink + local
    scores (`patterns.sink_local_qkv`)."""
    q, k, v = patterns.sink_local_qkv(
        key, batch=self.batch, seq_len=self.max_len, q_heads=self.q_heads,
        kv_heads=self.kv_heads, head_dim=self.head_dim, window=window,
        sharpness=sharpness, dtype=dtype, **pattern_kwargs)
    return q[:, -1], k, v

  @property
  def bench_tuple(self) -> tuple[int, int, int, int, int]:
    """(batch, q_heads, kv_heads, seq_len, head_dim), the decode benchmark
    configs' row."""
    return (self.batch, self.q_heads, self.kv_heads, self.max_len,
            self.head_dim)


# ------------------------------------------------------------ test shapes
# Small problems every implementation is tested on (CPU, interpret mode):
# odd lengths, q_len != kv_len, MHA/GQA/MQA, head_dim not a power of two.
CPU_TEST_SHAPES = (
    AttentionShape(batch=2, q_len=128, kv_len=128, q_heads=2, kv_heads=2, head_dim=32),
    AttentionShape(batch=1, q_len=100, kv_len=200, q_heads=4, kv_heads=2, head_dim=32),
    AttentionShape(batch=2, q_len=77, kv_len=77, q_heads=4, kv_heads=1, head_dim=16),
    AttentionShape(batch=1, q_len=96, kv_len=160, q_heads=3, kv_heads=3, head_dim=40),
)

# Property tests (hypothesis) draw from these (every shape is a compilation):
# one token, tails shorter than a tile, q_len above and below kv_len,
# MHA/GQA/MQA, a head_dim that is not a power of two.
PROPERTY_TEST_SHAPES = (
    AttentionShape(batch=1, q_len=1, kv_len=23, q_heads=2, kv_heads=1, head_dim=16),
    AttentionShape(batch=2, q_len=17, kv_len=1, q_heads=2, kv_heads=2, head_dim=32),
    AttentionShape(batch=2, q_len=40, kv_len=64, q_heads=4, kv_heads=2, head_dim=24),
    AttentionShape(batch=1, q_len=70, kv_len=90, q_heads=2, kv_heads=1, head_dim=32),
    AttentionShape(batch=2, q_len=70, kv_len=23, q_heads=1, kv_heads=1, head_dim=16),
    AttentionShape(batch=1, q_len=64, kv_len=64, q_heads=2, kv_heads=2, head_dim=16),
)
# The Hopper kernel's CPU problems (race-checked interpret mode is slow):
# its 64 x 64 wgmma tiles, head_dim 64, bf16; ragged ends, q_len < kv_len;
# the second, which most checks run, GQA with four q tiles (causal skips
# need four: a tile's local window reaches into the block before it), the
# last of them padded, and a padded last KV block. An odd q tile count (a
# program with one tile) runs in tests/test_mosaic_interpret.py's pipeline
# checks.
MOSAIC_CPU_TEST_SHAPES = (
    AttentionShape(batch=2, q_len=128, kv_len=320, q_heads=1, kv_heads=1, head_dim=64),
    AttentionShape(batch=2, q_len=200, kv_len=264, q_heads=2, kv_heads=1, head_dim=64),
)

# The gradient suite (GradientTestBase) on 16 x 16 tiles in f32: finite
# differences without masks and causal with ragged lengths (odd lengths, GQA,
# q_len != kv_len); comparisons with other gradients (GQA, head_dim 24, which
# the Triton kernels pad to 32); the training step.
GRADIENT_FD_SHAPES = (AttentionShape(1, 53, 61, 2, 1, 16),
                      AttentionShape(2, 93, 93, 2, 1, 16))
GRADIENT_TEST_SHAPE = AttentionShape(2, 61, 77, 4, 2, 24)
GRADIENT_TRAIN_SHAPE = AttentionShape(2, 111, 111, 4, 2, 16)
# The same on 64 x 64 tiles in bf16 (the Hopper kernels, race-checked on CPU;
# compiled kernels): odd lengths, GQA, head_dim 64; five causal q tiles, so
# that some skip a block between the sink and their local window.
GRADIENT_WIDE_TEST_SHAPE = AttentionShape(2, 141, 205, 4, 2, 64)
GRADIENT_WIDE_CAUSAL_SHAPE = AttentionShape(2, 300, 300, 4, 2, 64)
GRADIENT_WIDE_TRAIN_SHAPE = AttentionShape(2, 300, 300, 4, 2, 64)

# Compiled on a GPU (tests/test_gpu*.py): long enough for many tiles per
# program, one ragged length, GQA/MQA, every head_dim the kernels take.
GPU_TEST_SHAPES = (
    AttentionShape(batch=2, q_len=2048, kv_len=2048, q_heads=8, kv_heads=8, head_dim=128),
    AttentionShape(batch=1, q_len=1000, kv_len=3000, q_heads=8, kv_heads=2, head_dim=128),
    AttentionShape(batch=2, q_len=777, kv_len=777, q_heads=4, kv_heads=1, head_dim=64),
    AttentionShape(batch=1, q_len=512, kv_len=640, q_heads=2, kv_heads=2, head_dim=256),
)

# Decode on CPU: GQA with groups of 4 and 2, MQA; kv_lengths are drawn per
# test (full, ragged, a single token).
DECODE_CPU_TEST_SHAPES = (
    DecodeShape(batch=3, q_heads=8, kv_heads=2, max_len=320, head_dim=32),
    DecodeShape(batch=3, q_heads=8, kv_heads=1, max_len=320, head_dim=32),
    DecodeShape(batch=2, q_heads=6, kv_heads=3, max_len=224, head_dim=16),
)

# FP8 caches (per-head scales 10x apart).
DECODE_FP8_TEST_SHAPES = (
    DecodeShape(batch=2, q_heads=8, kv_heads=2, max_len=256, head_dim=64),
)

# The Hopper decode kernel's CPU problems: 64-key pages, head_dim 64, at
# most 384 keys (three 64-key pages per split) so the race-checked
# interpreter stays within seconds.
MOSAIC_DECODE_CPU_TEST_SHAPES = (
    DecodeShape(batch=2, q_heads=8, kv_heads=2, max_len=256, head_dim=64),
    DecodeShape(batch=2, q_heads=8, kv_heads=1, max_len=384, head_dim=64),
)

GPU_DECODE_TEST_SHAPES = (
    DecodeShape(batch=4, q_heads=32, kv_heads=8, max_len=8192, head_dim=128),
    DecodeShape(batch=4, q_heads=9, kv_heads=3, max_len=8192, head_dim=64),
)

# ------------------------------------------------------- benchmark shapes
# Prefill benchmark problems (bf16): batch·heads·q_len/128 >= 8192 tiles, so
# every shape fills 132 SMs.
PREFILL_BENCH_SHAPES = tuple(AttentionShape.from_bench_tuple(t) for t in (
    (8, 4096, 16, 16, 128), (4, 8192, 16, 16, 128), (2, 16384, 16, 16, 128),
    (1, 32768, 16, 16, 128), (1, 65536, 16, 16, 128)))
# The H200 study adds GQA at head_dim 64 (SmolLM2-like 18 x 6 heads).
PREFILL_H200_BENCH_SHAPES = PREFILL_BENCH_SHAPES + tuple(
    AttentionShape.from_bench_tuple(t) for t in (
        (4, 8192, 18, 6, 64), (2, 16384, 18, 6, 64), (1, 32768, 18, 6, 64)))
PREFILL_QUICK_BENCH_SHAPES = (PREFILL_BENCH_SHAPES[1],
                              PREFILL_H200_BENCH_SHAPES[5])
PREFILL_TUNING_SHAPE = PREFILL_BENCH_SHAPES[1]
# Correctness slice of a prefill benchmark: small enough for the oracle.
PREFILL_CHECK_SHAPE = AttentionShape.from_bench_tuple((1, 4096, 4, 4, 128))
PREFILL_SMOKE_BENCH_SHAPES = (
    AttentionShape.from_bench_tuple((1, 256, 2, 1, 32)),)
PREFILL_SMOKE_CHECK_SHAPE = AttentionShape.from_bench_tuple((1, 128, 2, 1, 32))

# Decode benchmark problems (bf16, full caches): Llama-style 32 x 8 heads.
DECODE_BENCH_SHAPES = (
    DecodeShape(batch=8, q_heads=32, kv_heads=8, max_len=32768, head_dim=128),
    DecodeShape(batch=1, q_heads=32, kv_heads=8, max_len=131072, head_dim=128),
    DecodeShape(batch=64, q_heads=32, kv_heads=8, max_len=4096, head_dim=128),
)
DECODE_H200_BENCH_SHAPES = DECODE_BENCH_SHAPES + (
    DecodeShape(batch=1, q_heads=32, kv_heads=8, max_len=524288, head_dim=128),)
DECODE_SMOKE_BENCH_SHAPES = (
    DecodeShape(batch=2, q_heads=4, kv_heads=2, max_len=256, head_dim=32),)


# ------------------------------------------------------------ test checks
def key_for(*parts) -> jax.Array:
  """A distinct PRNG key per test case, the same in every run."""
  return jax.random.PRNGKey(zlib.crc32(repr(parts).encode()) % 2**31)


# Natural-log distance from log λ under which kernel and oracle may disagree
# on a skip decision (rounding of the scores).
NEAR_TIE = {jnp.float32: 1e-3, jnp.bfloat16: 5e-2, jnp.float16: 2e-2}
OUT_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def assert_close(actual, expected, dtype, scale=1.0):
  """Equal within `OUT_TOL[dtype] * scale` (absolute and relative), no NaN."""
  tol = OUT_TOL[dtype] * scale
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  assert not np.any(np.isnan(a)), "NaN in output"
  np.testing.assert_allclose(a, e, atol=tol, rtol=tol)


def assert_lse_close(lse, expected, *, atol, rtol):
  """Log-sum-exp equal to `expected` wherever `expected` is finite, and -inf
  where it is -inf (rows that kept no key)."""
  finite = jnp.isfinite(expected)
  np.testing.assert_allclose(np.asarray(jnp.where(finite, lse, 0)),
                             np.asarray(jnp.where(finite, expected, 0)),
                             atol=atol, rtol=rtol)
  empty = np.asarray(expected == -jnp.inf)
  assert np.all(np.asarray(lse)[empty] == -np.inf), "lse of an empty row"


def near_tie_tiles(result, threshold, tol) -> jax.Array:
  """bool, `result.block_gap` less its last axis: a visited block sits near
  log λ ([batch, q_heads, n_q_tiles] for prefill, [batch, kv_heads] for a
  decode result)."""
  gap = result.block_gap
  lam = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (gap.shape[0],))
  log_thr = config_lib.log_threshold(lam).reshape((-1,) + (1,) * (gap.ndim - 1))
  near = result.visited_mask & (jnp.abs(result.block_gap - log_thr) < tol)
  return jnp.any(near, axis=-1)


def assert_skips_match(skipped_per_tile, result, threshold, dtype):
  """Per-tile skip counts equal the oracle's except at near-ties."""
  expected = jnp.sum(result.skip_mask, axis=-1)
  differ = np.asarray(skipped_per_tile != expected)
  near = np.asarray(near_tie_tiles(result, threshold, NEAR_TIE[dtype]))
  bad = differ & ~near
  assert not bad.any(), (
      f"{bad.sum()} tiles disagree with the oracle away from a near-tie: "
      f"kernel {np.asarray(skipped_per_tile)[bad][:8]}, oracle "
      f"{np.asarray(expected)[bad][:8]}")


def assert_skip_mask_matches(skip_mask, skipped_per_tile, result, threshold,
                             dtype):
  """A kernel's recorded skip mask: consistent with its per-tile counts and
  equal to the oracle's blocks except in near-tie tiles."""
  np.testing.assert_array_equal(np.asarray(jnp.sum(skip_mask, axis=-1)),
                                np.asarray(skipped_per_tile))
  near = np.asarray(near_tie_tiles(result, threshold, NEAR_TIE[dtype]))
  bad = np.asarray(skip_mask != result.skip_mask) & ~near[..., None]
  assert not bad.any(), f"{bad.sum()} blocks differ away from a near-tie"


def program_mask(key, shape, causal) -> jax.Array:
  """A block mask, bool `shape` = [batch, q_heads, n_q_tiles, n_kv_blocks]
  (n_q_tiles >= 3), with what a block-list walk must get right: neighbouring
  tiles (the two tiles of a Hopper program) select different blocks, tile 1
  selects one block (its diagonal under causal), tile 2 of the first
  (batch, head) none; the sink block is kept elsewhere."""
  single = 1 if causal else shape[-1] - 1
  mask = jax.random.bernoulli(key, 0.6, shape).at[..., 0].set(True)
  mask = mask.at[:, :, 1].set(False).at[:, :, 1, single].set(True)
  return mask.at[0, 0, 2].set(False)


def lower_for_h100(fn, *specs):
  """`fn` traced on `specs` and lowered for CUDA under an abstract H100 (a
  CUDA lowering check on a machine without a GPU)."""
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                 num_cores=132, platform="cuda")
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
      abstract_device=h100)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))


@dataclasses.dataclass(frozen=True)
class Fp8Cache:
  """A bf16 query and an FP8 cache whose KV heads differ 10x in magnitude,
  quantized per head (`fp8_cache`)."""

  q: jax.Array
  k8: jax.Array
  v8: jax.Array
  k_scale: jax.Array
  v_scale: jax.Array

  def dequantized(self):
    return (self.k8.astype(jnp.float32) * self.k_scale[:, None],
            self.v8.astype(jnp.float32) * self.v_scale[:, None])


def fp8_cache(key, shape: DecodeShape) -> Fp8Cache:
  """`shape.inputs` with the cache quantized to FP8 per KV head."""
  from blasst_jax import decode  # pylint: disable=g-import-not-at-top
  q, k, v = shape.inputs(key)
  # Keys of head h are 10^h larger and its queries 10^h smaller: the scales
  # differ, the scores keep the pattern's range.
  mag = 10.0 ** jnp.arange(shape.kv_heads)
  k = k * mag[None, None, :, None]
  q = q / jnp.repeat(mag, shape.group)[None, :, None]
  k8, k_scale = decode.quantize_cache(k)
  v8, v_scale = decode.quantize_cache(v)
  return Fp8Cache(q.astype(jnp.bfloat16), k8, v8, k_scale, v_scale)


def paged_cache(k, v, page: int, *, extra_pages: int = 3, seed: int = 1):
  """(pool_k, pool_v, page_table): the contiguous caches [batch, max_len,
  kv_heads, head_dim] scattered page by page over a shuffled, larger pool
  whose unused pages hold NaN (which must never leak into an output)."""
  b, max_len, hkv, d = k.shape
  per_seq = max_len // page
  perm = jax.random.permutation(jax.random.PRNGKey(seed),
                                b * per_seq + extra_pages)
  table = perm[: b * per_seq].reshape(b, per_seq).astype(jnp.int32)
  nan_pool = jnp.full((b * per_seq + extra_pages, page, hkv, d), jnp.nan,
                      jnp.float32)

  def scatter(cache):
    pool = nan_pool.at[table].set(
        cache.astype(jnp.float32).reshape(b, per_seq, page, hkv, d))
    return pool.astype(cache.dtype)

  return scatter(k), scatter(v), table


def median_time_ms(fn, *args, warmup: int, iters: int, reps: int = 1,
                   until_issued: bool = False) -> float:
  """Median wall time of one `fn(*args)` call in ms, synchronised on the
  device. With `reps > 1`, each sample queues `reps` calls before waiting, so
  host dispatch overlaps device work (for calls of ~100 µs). `until_issued`:
  the host's time to issue a call, the sample's clock stopped before the
  wait (where it nears the device's time a call, the host sets the pace)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    issued = time.perf_counter()
    jax.block_until_ready(out)
    end = issued if until_issued else time.perf_counter()
    samples.append((end - t0) * 1e3 / reps)
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
          ops_base.on_gpu(device.platform))


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
