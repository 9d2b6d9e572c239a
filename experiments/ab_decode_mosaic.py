"""Interleaved A/B rounds of Mosaic decode builds (`MosaicDecodeConfig`s and
page sizes) on the decode study's sink/local caches: every build is timed
once per round, rounds alternate builds, and medians over rounds are
printed, so that drifts of the GPU's clocks hit all builds alike. λ = 0 is
the dense build. Outputs are compared with the first build's (max |Δ| and
sparsity).

    python -m experiments.ab_decode_mosaic --builds=transposed
    python -m experiments.ab_decode_mosaic --builds=rings --shapes=0,1,3
    python -m experiments.ab_decode_mosaic --builds=merge
    python -m experiments.ab_decode_mosaic --builds=v_issue --shapes=0 \
        --thresholds=1.25e-4,2.2e-4,3.9e-4,9.1e-4
    python -m experiments.ab_decode_mosaic --builds=schedule --rounds=3
    python -m experiments.ab_decode_mosaic --builds=fp8 --fp8 --rounds=3
    python -m experiments.ab_decode_mosaic --builds=waves --shapes=0,1 \
        --scores=scattered
    python -m experiments.ab_decode_mosaic --builds=persistent --shapes=0,1

Build sets: "transposed" (the 64-row build, the transposed one with two and
one compute warpgroups), "rings" (the transposed build's K / V ring depths
and page sizes, with a copy of the cache for scale), "k_depth" (K rings of
2, 4 and 8 pages of 64 keys beside the default V ring: does a skipping
build, whose K copies are the only ones in flight, want more of them?),
"merge" (the split-K merge by XLA after the call, and in the kernel),
"v_issue" (V copied by the memory warpgroup as it reads the decisions, or by
the compute warpgroups that keep the blocks: the default V ring, as many V
slots as warpgroups, one and two compute warpgroups), "wgs" (one and two
compute warpgroups, at the shape's pages and at 128 keys), "schedule" (block
maxima handed between the compute warpgroups, Pallas' store barriers left
out, and both), "fp8" (with `--fp8`: K widened in shared memory; the
default, for FP8 pages K widened in registers and the memory warpgroup's
registers handed to the compute warpgroups; each of those two alone; the
default with the "schedule" options), "fp8_pages" (with `--fp8 --shapes=3`:
FP8 pages at head_dim 64 of 64 and 128 keys, one and two compute warpgroups,
where a page of 64 keys is 4 KiB), "page_size" (with `--shapes=3`, head_dim
64: pages of 128 and of 256 keys, bf16 or with `--fp8`), "ahead" (one or two
blocks decided ahead of the one accumulated, with pages of 64 and 128 keys),
"wgs3" (three compute warpgroups against the default, pages of 64 and 128
keys, the default K ring of six pages and one of three; FP8 K widened in
shared memory, which the registers of three at head_dim 128 need),
"table" (a contiguous cache, whose pages the kernel computes, against the
same cache through a page table), "layout" (pages holding each token's KV
heads side by side, NHD, or each head's rows in one run, HND, through the
same page table), "waves" (the split count that fills the GPU's SMs once,
twice and four times: skipping leaves the programs of diffuse heads most of
the V bytes, and programs in several waves let the block scheduler even the
load)
"persistent" (a persistent kernel of a program per SM walking the
items, `MosaicDecodeConfig.programs`, over splits that fill the SMs once,
twice and four times, beside the grid of one and four waves),
"persistent_probe" (what the persistent kernel's further rounds cost:
without the in-kernel merge, with pages of 64 keys and a deeper K ring),
"parts" (the split-K merge's parts: one a compute warpgroup, or one a split,
the program's warpgroups combined first, `merge_warpgroups`; at one and four
waves of splits, and persistent), "order" (the persistent kernel's items
split-major, `MosaicDecodeConfig.split_major`, every head's merge in the
last rounds, or split-minor, a round holding whole heads; beside the grid
of four waves) and
"semaphores" (the merge's semaphores in the control block, or from
`pl.get_global`, which adds the XLA kernel that zeroes them before every
call).
With `--trace`, each build's GPU timeline too (`gpu_timeline`): the
kernels' own durations, without the host's start and wait.
Every build also runs its skip check at λ = 0 ("λ=0 check": the skip
build, a traced zero) besides the dense build (λ=0); `--fp8` runs them on
FP8 pages.
"""
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import testing
from blasst_jax.kernels import decode_mosaic
from blasst_jax.ops.decode import base as decode_base
from experiments import gpu_timeline

Config = decode_mosaic.MosaicDecodeConfig
# The persistent builds' programs: an H100's or H200's SMs (fewer SMs cut
# them to theirs).
SMS = 132
# name: {build name: (block_kv or None for the shape's, config[, options])}
# Options (`build_options`): "layout", "NHD" or "HND": through
# `paged_decode_attention` with the contiguous cache's page table, which the
# kernel copies into shared memory, over the cache as pages [pages, block,
# heads, d] or, made once before timing, [pages, heads, block, d]; "waves":
# the split count times this (default 1: the splits fill one wave of the
# GPU's SMs).
BUILDS = {
    "transposed": {
        "rows64": (None, Config(transposed=False)),
        "T2": (None, Config(transposed=True)),
        "T1": (None, Config(transposed=True, compute_wgs=1)),
    },
    "rings": {
        "T2 p128 k4v2": (128, Config()),
        "T2 p128 k2v4": (128, Config(k_stages=2, v_stages=4)),
        "T2 p64 k4v2": (64, Config()),
        "T2 p64 k4v4": (64, Config(k_stages=4, v_stages=4)),
        "T2 p64 k8v4": (64, Config(k_stages=8, v_stages=4)),
        "T2 p64 k6v6": (64, Config(k_stages=6, v_stages=6)),
        "T1 p64 k6v6": (64, Config(k_stages=6, v_stages=6, compute_wgs=1)),
    },
    "k_depth": {
        "p64 k2v4": (64, Config(k_stages=2, v_stages=4)),
        "p64 k4v4": (64, Config(k_stages=4, v_stages=4)),
        "p64 k8v4": (64, Config(k_stages=8, v_stages=4)),
        "p128 k2v4": (128, Config(k_stages=2, v_stages=4)),
    },
    "merge": {
        "XLA merge": (None, Config(merge_in_kernel=False)),
        "in-kernel merge": (None, Config()),
    },
    "v_issue": {
        "memory wg": (None, Config(compute_issues_v=False)),
        "compute": (None, Config()),
        "compute vC": (None, Config(v_stages=2)),
        "compute T1": (None, Config(compute_wgs=1)),
        "compute T2": (None, Config(compute_wgs=2)),
    },
    "wgs": {
        "default": (None, Config()),
        "T1": (None, Config(compute_wgs=1)),
        "T2": (None, Config(compute_wgs=2)),
        "default p128": (128, Config()),
        "T1 p128": (128, Config(compute_wgs=1)),
        "memory wg p128": (128, Config(compute_issues_v=False)),
    },
    "schedule": {
        "default": (None, Config()),
        "block max": (None, Config(hand_over_block_max=True)),
        "no auto barriers": (None, Config(auto_barriers=False)),
        "both": (None, Config(hand_over_block_max=True, auto_barriers=False)),
    },
    "fp8": {
        "widened": (None, Config(fp8_k_in_registers=False,
                                 split_registers=False)),
        "default": (None, Config()),
        "K regs": (None, Config(split_registers=False)),
        "split regs": (None, Config(fp8_k_in_registers=False)),
        "default, both": (None, Config(hand_over_block_max=True,
                                       auto_barriers=False)),
    },
    "fp8_pages": {
        "p64": (64, Config()),
        "p64 T2": (64, Config(compute_wgs=2)),
        "p128": (128, Config()),
        "p128 T1": (128, Config(compute_wgs=1)),
    },
    "page_size": {
        "p128": (128, Config()),
        "p256": (256, Config()),
    },
    "ahead": {
        "p64": (64, Config()),
        "ahead 2 p64": (64, Config(decide_ahead=2)),
        "p128": (128, Config()),
        "ahead 2 p128": (128, Config(decide_ahead=2)),
    },
    "wgs3": {
        "p64": (64, Config()),
        "p64 T3": (64, Config(compute_wgs=3)),
        "p128": (128, Config()),
        "p128 T3": (128, Config(compute_wgs=3)),
        "p128 T3 k3": (128, Config(compute_wgs=3, k_stages=3)),
        "p128 T3 K smem": (128, Config(compute_wgs=3,
                                       fp8_k_in_registers=False)),
    },
    "table": {
        "contiguous": (None, Config()),
        "paged": (None, Config(), {"layout": "NHD"}),
    },
    "layout": {
        "NHD pages": (None, Config(), {"layout": "NHD"}),
        "HND pages": (None, Config(), {"layout": "HND"}),
    },
    "waves": {
        "1 wave": (None, Config()),
        "2 waves": (None, Config(), {"waves": 2}),
        "4 waves": (None, Config(), {"waves": 4}),
    },
    "persistent": {
        "1 wave": (None, Config()),
        "4 waves": (None, Config(), {"waves": 4}),
        "P 1 wave": (None, Config(programs=SMS)),
        "P 2 waves": (None, Config(programs=SMS), {"waves": 2}),
        "P 4 waves": (None, Config(programs=SMS), {"waves": 4}),
    },
    "persistent_probe": {
        "1 wave": (None, Config()),
        "P 1 wave": (None, Config(programs=SMS)),
        "P 4 waves": (None, Config(programs=SMS), {"waves": 4}),
        "P 4 waves, XLA merge": (None, Config(programs=SMS,
                                              merge_in_kernel=False),
                                 {"waves": 4}),
        "4 waves, XLA merge": (None, Config(merge_in_kernel=False),
                               {"waves": 4}),
        "P 4 waves p64": (64, Config(programs=SMS), {"waves": 4}),
    },
    "parts": {
        "a part a wg": (None, Config(merge_warpgroups=False)),
        "a part a split": (None, Config(merge_warpgroups=True)),
        "4 waves, a wg": (None, Config(merge_warpgroups=False),
                          {"waves": 4}),
        "4 waves, a split": (None, Config(merge_warpgroups=True),
                             {"waves": 4}),
        "P 4 waves, a split": (None, Config(programs=SMS,
                                            merge_warpgroups=True),
                               {"waves": 4}),
    },
    "order": {
        "4 waves": (None, Config(), {"waves": 4}),
        "P 4 waves, split-minor": (None, Config(programs=SMS,
                                                split_major=False),
                                   {"waves": 4}),
        "P 4 waves": (None, Config(programs=SMS), {"waves": 4}),
        "P 1 wave": (None, Config(programs=SMS)),
    },
    "semaphores": {
        "control block": (None, Config()),
        "global semaphores": (None, Config(global_semaphores=True)),
    },
}
def build_options(build) -> dict:
  """The options dict of a BUILDS entry ({} where it has none)."""
  return build[2] if len(build) > 2 else {}


# (batch, q_heads, kv_heads, seq_len, head_dim, block_kv, λs besides 0)
SHAPES = [(8, 32, 8, 32768, 128, 128, (1e-3, 1e-2)),
          (1, 32, 8, 131072, 128, 128, (1e-3,)),
          (64, 32, 8, 4096, 128, 128, (1e-3,)),
          (120, 9, 3, 8192, 64, 64, (1e-2, 0.1)),
          (1, 32, 8, 524288, 128, 128, (1e-3,))]

_BUILDS = flags.DEFINE_enum("builds", "transposed", list(BUILDS),
                            "Which set of builds.")
_SHAPES = flags.DEFINE_list("shapes", [], "Indices into SHAPES (all: empty).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_THRESHOLDS = flags.DEFINE_list(
    "thresholds", [], "λs besides 0 for every shape (empty: each shape's).")
_SCORES = flags.DEFINE_enum(
    "scores", "sink_local", ["sink_local", "scattered"],
    "Score pattern of the caches: sink + local window, or with relevant "
    "blocks scattered over the context (`patterns.scattered_qkv`).")
_FP8 = flags.DEFINE_bool(
    "fp8", False, "FP8 (e4m3) pages with per-head scales instead of bf16 "
    "(TB/s-eff still counts the bf16 cache's bytes).")
_BLOCK_KV = flags.DEFINE_integer(
    "block_kv", 0, "Keys a page for the builds that leave it to the shape "
    "(0: the shape's, SHAPES).")
_TRACE = flags.DEFINE_bool(
    "trace", False, "Also print each build's GPU timeline of 20 queued "
    "calls (jax.profiler): its kernels' median durations and the gaps, so "
    "that the Mosaic kernel's own time compares without the call's rest.")


def main(argv):
  del argv
  print(f"device_kind={jax.devices()[0].device_kind} jax={jax.__version__}",
        flush=True)
  builds = BUILDS[_BUILDS.value]
  ids = [int(i) for i in _SHAPES.value] or range(len(SHAPES))
  for i in ids:
    b, hq, hkv, s, d, shape_bkv, lams = SHAPES[i]
    shape_bkv = _BLOCK_KV.value or shape_bkv
    make_qkv = (patterns.sink_local_qkv if _SCORES.value == "sink_local"
                else patterns.scattered_qkv)
    q, k, v = make_qkv(
        jax.random.PRNGKey(0), batch=b, seq_len=s, q_heads=hq, kv_heads=hkv,
        head_dim=d, dtype=jnp.bfloat16, sharpness=(10., 14., 18., 22.))
    q, n = q[:, -1], jnp.full((b,), s, jnp.int32)
    dense_bytes = 2 * k.size * k.dtype.itemsize
    tag = f"b{b} s{s} h{hq}/{hkv} d{d}" + (
        " scattered" if _SCORES.value == "scattered" else "")
    scales = {}
    if _FP8.value:
      k, scales["k_scale"] = bj.decode.quantize_cache(k)
      v, scales["v_scale"] = bj.decode.quantize_cache(v)
      tag += " fp8"
    if _THRESHOLDS.value:
      lams = [float(t) for t in _THRESHOLDS.value]
    # The cache as each build reads it, made once before timing:
    # contiguous, or pages (NHD a reshape, HND a transposed copy).
    caches = {}
    for name, build in builds.items():
      bkv, layout = build[0], build_options(build).get("layout")
      caches[name] = (k, v)
      if layout:
        caches[name] = [decode_base.as_nhd(
            x.reshape(-1, bkv or shape_bkv, *x.shape[2:]), layout)
                        for x in (k, v)]
    fns = {}
    for lam in (0.0, "0 check", *lams):
      for name, build in builds.items():
        bkv, cfg = build[:2]
        bkv = bkv or shape_bkv
        extra = build_options(build)
        layout = extra.get("layout")
        splits = extra.get("waves", 1) * bj.decode.default_num_splits(
            b, hkv, s, bkv, implementation="pallas_mosaic")
        kv = caches[name]
        # A static 0.0 builds the dense kernel (no skip check); "0 check"
        # passes a traced zero: the skip build, skipping nothing.
        def attend(q, k, v, n, t, cfg=cfg, bkv=bkv, layout=layout,
                   splits=splits):
          options = dict(threshold=t, max_mode="anchored",
                         implementation="pallas_mosaic", return_stats=True,
                         kernel_config=cfg, num_splits=splits, **scales)
          if not layout:
            return bj.decode_attention(q, k, v, n, block_kv=bkv, **options)
          table = decode_base.page_table_array(
              decode_base.ContiguousPages(b, s // bkv))
          return bj.paged_decode_attention(q, k, v, table, n,
                                           kv_layout=layout, **options)
        if lam == "0 check":
          fn = functools.partial(jax.jit(attend), t=jnp.float32(0.0))
        else:
          fn = jax.jit(functools.partial(attend, t=lam))
        out, stats = fn(q, *kv, n)
        fns[lam, name] = (functools.partial(fn, q, *kv, n),
                          float(stats.total_sparsity),
                          np.asarray(out, np.float32))
    first = next(iter(builds))
    for (lam, name), (_, sparsity, out) in fns.items():
      if name != first:
        _, sparsity0, out0 = fns[lam, first]
        print(f"  check {tag} λ={lam} {name}: max|Δ| vs {first} "
              f"{np.max(np.abs(out - out0)):.3g}, sparsity {sparsity:.4f} vs "
              f"{sparsity0:.4f}", flush=True)
    copy = jax.jit(lambda k, v: (jnp.copy(k), jnp.copy(v)))
    times = {key: [] for key in fns}
    copy_times = []
    for _ in range(_ROUNDS.value):
      copy_times.append(1e3 * testing.median_time_ms(copy, k, v, warmup=1,
                                                     iters=10, reps=5))
      for (lam, name), (fn, _, _) in fns.items():
        times[lam, name].append(1e3 * testing.median_time_ms(
            fn, warmup=1, iters=10, reps=5))
    t_copy = np.median(copy_times)
    print(f"{tag}: copy of K and V {t_copy:.1f} us "
          f"({2 * dense_bytes / t_copy / 1e6:.2f} TB/s read + written)")
    for (lam, name), (_, sparsity, _) in fns.items():
      t = np.median(times[lam, name])
      print(f"{tag} λ={lam} sparsity {sparsity:.3f} {name:14s} {t:8.1f} us "
            f"(min {min(times[lam, name]):.1f}) "
            f"{dense_bytes / t / 1e6:.2f} TB/s-eff", flush=True)
    if _TRACE.value:
      for (lam, name), (fn, _, _) in fns.items():
        calls = 20
        summary = gpu_timeline.summarize(
            gpu_timeline.kernel_timeline(fn, (), calls), calls)
        longest = max(summary["kernels"], key=lambda r: r["dur_us"])
        print(f"{tag} λ={lam} {name:14s} timeline: period "
              f"{summary['period_us']:.1f} us, kernels "
              f"{summary['busy_us']:.1f} ({len(summary['kernels'])}), the "
              f"longest {longest['dur_us']:.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
