r"""Context-parallel scaling of skip-softmax prefill and decode.

    python -m experiments.bench_multigpu --config=configs/bench_multigpu.py

For each shape and λ: one device's `bj.attention` / `bj.decode_attention`
and cuDNN's dense attention (the baselines), then `bj.sharding` with the
sequence on a context axis of n devices, for every n in
`config.device_counts` that the machine has ("measured": communication
included). On fewer devices than `config.modeled_device_counts`, the
script also times the slowest device's share of an n-device run alone on
one device ("modeled": its attention work, no all-gather, no merge across
devices): the compute bound of the scaling, and the load imbalance of the
causal layouts.

Rows: phase, mode (measured/modeled), impl, devices, shape fields,
threshold, share_max, load_balance, sparsity, time_ms, speedup (one
device's `bj` time of the same λ / time_ms).
"""

from __future__ import annotations


from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from experiments import config_file
from experiments import harness
import blasst_jax as bj
from blasst_jax import patterns
from blasst_jax import _progress as progress
from blasst_jax import sharding
from blasst_jax import testing

_CONFIG = config_flags.DEFINE_config_file("config", config_file("bench_multigpu"))
AXIS = "context"


def time_ms(cfg, fn, *args, decode: bool = False) -> float:
  """Median ms of fn(*args); NaN (and the error printed) if it fails, so
  one unsupported variant does not end the run."""
  try:
    if decode:
      return testing.median_time_ms(fn, *args, warmup=cfg.decode_warmup,
                                    iters=cfg.decode_iters,
                                    reps=cfg.decode_reps)
    return harness.time_ms(cfg, fn, *args)
  except Exception as e:  # pylint: disable=broad-except
    print(f"FAILED: {harness.error_text(e, 300)}", flush=True)
    return float("nan")


def stats_of(fn, *args) -> float:
  """Block sparsity of fn(*args)'s stats (NaN if the call fails)."""
  try:
    return sparsity_of(fn(*args)[1])
  except Exception:  # pylint: disable=broad-except
    return float("nan")


def sparsity_of(stats) -> float:
  return float(jnp.sum(stats.skipped_blocks)) / max(
      float(jnp.sum(stats.visited_blocks)), 1.0)


def kernel_options(cfg) -> dict:
  opts = dict(implementation=cfg.implementation)
  if cfg.interpret:
    opts["interpret"] = True
  return opts


def prefill_options(cfg) -> dict:
  return dict(kernel_options(cfg), block_q=cfg.prefill_block_q,
              block_kv=cfg.prefill_block_kv)


def prefill_inputs(cfg, shape):
  b, s, hq, hkv, d = shape
  make = jax.jit(lambda key: patterns.sink_local_qkv(   # fused: no f32 copies
      key, batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d,
      dtype=jnp.dtype(cfg.dtype), **cfg.pattern.to_dict()))
  return make(jax.random.PRNGKey(cfg.seed))


def decode_inputs(cfg, shape):
  """The newest token's q [b, hq, d], full caches, lengths."""
  b, hq, hkv, s, d = shape
  make = jax.jit(lambda key: patterns.sink_local_qkv(
      key, batch=b, seq_len=1, kv_len=s, q_start=s - 1, q_heads=hq,
      kv_heads=hkv, head_dim=d, dtype=jnp.dtype(cfg.dtype),
      **cfg.pattern.to_dict()))
  q, k, v = make(jax.random.PRNGKey(cfg.seed))
  return q[:, 0], k, v, jnp.full((b,), s, jnp.int32)


def context_mesh(n: int):
  return jax.make_mesh((n,), (AXIS,), devices=jax.devices()[:n])


def measured_counts(cfg) -> list[int]:
  """Device counts run for real: those the machine has."""
  return [n for n in cfg.device_counts if n <= len(jax.devices())]


def modeled_counts(cfg) -> list[int]:
  """Device counts modeled on one device: those not run for real."""
  return [n for n in cfg.modeled_device_counts
          if n not in measured_counts(cfg)]


def prefill_variants(cfg, n: int):
  """(share_max, load_balance) pairs that apply to n devices."""
  seen = []
  for share, balance in cfg.prefill_variants:
    balance = bool(balance) and n > 1      # one device: nothing to balance
    if (share, balance) not in seen:
      seen.append((share, balance))
  return seen


def run_prefill(cfg, shape, on_gpu):
  b, s, hq, hkv, d = shape
  q, k, v = prefill_inputs(cfg, shape)
  base = dict(phase="prefill", batch=b, seq_len=s, q_heads=hq, kv_heads=hkv,
              head_dim=d)
  rows = []
  if on_gpu:
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"))
    rows.append(dict(base, mode="measured", impl="cudnn", devices=1,
                     threshold=0.0, sparsity=0.0,
                     time_ms=time_ms(cfg, cudnn, q, k, v)))
  for thr in cfg.prefill_thresholds:
    one = jax.jit(lambda q, k, v, thr=thr: bj.attention(
        q, k, v, causal=True, threshold=thr, return_stats=True,
        **prefill_options(cfg)))
    t_one = time_ms(cfg, one, q, k, v)
    rows.append(dict(base, mode="measured", impl="bj", devices=1,
                     threshold=thr, sparsity=stats_of(one, q, k, v),
                     time_ms=t_one, speedup=1.0))
    for n in measured_counts(cfg):
      for share, balance in prefill_variants(cfg, n):
        fn = jax.jit(lambda q, k, v, n=n, thr=thr, share=share,
                     balance=balance: sharding.attention(
                         q, k, v, mesh=context_mesh(n), context_axis=AXIS,
                         causal=True, threshold=thr, return_stats=True,
                         share_max=share, load_balance=balance,
                         **prefill_options(cfg)))
        t = time_ms(cfg, fn, q, k, v)
        rows.append(dict(base, mode="measured", impl="bj.sharding",
                         devices=n, threshold=thr, share_max=share,
                         load_balance=balance,
                         sparsity=stats_of(fn, q, k, v), time_ms=t,
                         speedup=t_one / t))
    for n in modeled_counts(cfg):
      for share, balance in prefill_variants(cfg, n):
        t = modeled_prefill_ms(cfg, q, k, v, n, thr, share, balance)
        rows.append(dict(base, mode="modeled", impl="bj.sharding",
                         devices=n, threshold=thr, share_max=share,
                         load_balance=balance, time_ms=t,
                         speedup=t_one / t))
  return rows


def modeled_prefill_ms(cfg, q, k, v, n, thr, share, balance) -> float:
  """The slowest device's attention in an n-device causal prefill: the
  query chunks it owns against the key chunks before them."""
  b, s = q.shape[:2]
  m = 2 * n if balance else n
  ks, vs, qs = (sharding.sequence_chunks(x, m) for x in (k, v, q))
  lengths = jnp.full((b,), s, jnp.int32)
  # λ = 0: the kernels without the skip check, as `bj.sharding` builds.
  thr_rows = jnp.full((b,), thr, jnp.float32) if thr else 0.0
  # Contiguous: device n-1 attends all n parts. Balanced: every device the
  # same number of tiles; devices 0 and n-1 are timed, the slower kept.
  owned = ([[n - 1]] if not balance else [[0, m - 1], [n - 1, n]])
  times = []
  for chunk_ids in owned:
    def work(qs, ks, vs, chunk_ids=tuple(chunk_ids)):
      return [sharding.attend_query_chunk(
          qs[c], c, ks, vs, lengths, thr_rows, causal=True, share_max=share,
          **prefill_options(cfg))[0] for c in chunk_ids]
    times.append(time_ms(cfg, jax.jit(work), qs, ks, vs))
  return max(times)


def run_decode(cfg, shape, on_gpu):
  b, hq, hkv, s, d = shape
  q, k, v, lengths = decode_inputs(cfg, shape)
  base = dict(phase="decode", batch=b, q_heads=hq, kv_heads=hkv, seq_len=s,
              head_dim=d)
  opts = dict(block_kv=cfg.block_kv, max_mode=cfg.decode_max_mode,
              **kernel_options(cfg))
  # The whole sequence's anchors, which the devices share (modeled rows).
  anchors = jax.jit(lambda q, k, lengths: sharding.anchor_max_in_part(
      q, k, lengths, 0, block_kv=cfg.block_kv))(q, k, lengths)
  rows = []
  if on_gpu:
    cudnn = jax.jit(lambda q, k, v, lengths: jax.nn.dot_product_attention(
        q[:, None], k, v, key_value_seq_lengths=lengths,
        implementation="cudnn"))
    rows.append(dict(base, mode="measured", impl="cudnn", devices=1,
                     threshold=0.0, sparsity=0.0,
                     time_ms=time_ms(cfg, cudnn, q, k, v, lengths,
                                     decode=True)))
  for thr in cfg.decode_thresholds:
    one = jax.jit(lambda q, k, v, lengths, thr=thr: bj.decode_attention(
        q, k, v, lengths, threshold=thr, return_stats=True, **opts))
    t_one = time_ms(cfg, one, q, k, v, lengths, decode=True)
    rows.append(dict(base, mode="measured", impl="bj", devices=1,
                     threshold=thr,
                     sparsity=stats_of(one, q, k, v, lengths),
                     time_ms=t_one, speedup=1.0))
    share = thr > 0
    for n in measured_counts(cfg):
      fn = jax.jit(lambda q, k, v, lengths, n=n, thr=thr, share=share:
                   sharding.decode_attention(
                       q, k, v, lengths, mesh=context_mesh(n),
                       context_axis=AXIS, threshold=thr, return_stats=True,
                       share_max=share, **opts))
      t = time_ms(cfg, fn, q, k, v, lengths, decode=True)
      rows.append(dict(base, mode="measured", impl="bj.sharding", devices=n,
                       threshold=thr, share_max=share,
                       sparsity=stats_of(fn, q, k, v, lengths),
                       time_ms=t, speedup=t_one / t))
    for n in modeled_counts(cfg):
      # Every device decodes max_len / n positions; the last part holds the
      # newest keys (the least skipping): timed with the shared anchors.
      part = s // n
      mode = "split" if share else cfg.decode_max_mode
      part_fn = jax.jit(lambda q, k, v, a, thr=thr, mode=mode:
                        bj.decode_attention(
                            q, k, v, jnp.full((b,), part, jnp.int32),
                            threshold=jnp.full((b,), thr) if thr else 0.0,
                            initial_max=a,
                            **{**opts, "max_mode": mode}))
      t = time_ms(cfg, part_fn, q, k[:, -part:], v[:, -part:],
                  anchors if share else None, decode=True)
      rows.append(dict(base, mode="modeled", impl="bj.sharding", devices=n,
                       threshold=thr, share_max=share, time_ms=t,
                       speedup=t_one / t))
  return rows


def variant_label(r) -> str:
  if r["phase"] == "decode":
    return "shared anchors" if r.get("share_max") else "own max per part"
  return ({(False, False): "own max, contiguous",
           (False, True): "own max, balanced",
           (True, False): "shared max, contiguous",
           (True, True): "shared max, balanced"}[
               (bool(r.get("share_max")), bool(r.get("load_balance")))])


def plot(result, path):
  """Speedup over one device's `bj` against the device count: one panel per
  (phase, λ), a colour per variant, a line style per sequence length."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  rows = [r for r in result["rows"] if r["impl"] == "bj.sharding"]
  panels = sorted({(r["phase"], r["threshold"]) for r in rows},
                  key=lambda p: (p[0] != "prefill", p[1]))
  if not panels:
    return
  lengths = sorted({r["seq_len"] for r in rows}, reverse=True)
  styles = dict(zip(lengths, ["-", "--", ":", "-."] * 4))
  labels = sorted({variant_label(r) for r in rows})
  colors = dict(zip(labels,
                    matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]))
  fig, axes = harness.figure(1, len(panels), (4.6 * len(panels), 4.2),
                             squeeze=False)
  for ax, (phase, thr) in zip(axes[0], panels):
    mine = [r for r in rows if r["phase"] == phase and r["threshold"] == thr]
    for label in labels:
      for seq_len in lengths:
        line = sorted((r["devices"], r["speedup"], r["mode"]) for r in mine
                      if variant_label(r) == label
                      and r["seq_len"] == seq_len)
        if not line:
          continue
        ax.plot([x[0] for x in line], [x[1] for x in line],
                styles[seq_len], color=colors[label],
                label=f"{label}, {seq_len // 1024}k")
        for devices, speedup, mode in line:
          ax.plot(devices, speedup, "o", color=colors[label],
                  mfc="white" if mode == "modeled" else colors[label])
    counts = sorted({r["devices"] for r in mine})
    ax.plot(counts, counts, color="gray", lw=0.8, label="linear")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices (hollow: modeled)")
    ax.set_ylabel("speedup over one device's bj")
    ax.set_title(f"{phase}, λ = {thr:g}")
    ax.legend(fontsize=6)
  fig.suptitle(f"Context parallelism, {result['device_kind']} "
               f"({result['num_devices']} present), jax "
               f"{result['jax_version']}; modeled = the slowest device's "
               "share timed alone", fontsize=9)
  harness.save_figure(fig, path)


def main(argv):
  del argv
  cfg = _CONFIG.value
  bench = harness.start(cfg, num_devices=len(jax.devices()), dtype=cfg.dtype,
                        rows=[])
  print(f"devices: {len(jax.devices())}", flush=True)
  work = [(run_prefill, shape) for shape in cfg.prefill_shapes
          if "prefill" in cfg.phases] + [
              (run_decode, shape) for shape in cfg.decode_shapes
              if "decode" in cfg.phases]
  with progress.ProgressBar(len(work), "shapes") as bar:
    for run_shape, shape in work:
      bench.result["rows"] += run_shape(cfg, tuple(shape), bench.on_gpu)
      bench.save()
      bar.update()
  for r in bench.result["rows"]:
    extra = "".join(f" {key}={r[key]}" for key in ("share_max",
                                                   "load_balance") if key in r)
    speed = f" {r['speedup']:.2f}x" if "speedup" in r else ""
    sparsity = (f" sparsity {r['sparsity']:.3f}" if "sparsity" in r else "")
    print(f"{r['phase']} {r['seq_len']} {r['mode']} {r['impl']} "
          f"n={r['devices']} λ={r['threshold']:g}{extra}{sparsity}: "
          f"{r['time_ms']:.2f} ms{speed}", flush=True)
  bench.finish(plot)


if __name__ == "__main__":
  app.run(main)
