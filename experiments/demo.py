r"""Skip-softmax on realistic score patterns: sparsity and error against λ.

Builds q/k/v whose scores mix an attention sink, a local window and noise,
one head per sharpness, sweeps λ, prints a table per head (block sparsity,
max/mean error against dense attention, dropped softmax mass) and writes a
plot.

    python -m experiments.demo --config=configs/demo.py
    python -m experiments.demo --config=configs/demo.py --config.seq_len=4096
"""

from __future__ import annotations

import json
import os
import time

from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import config_file
import blasst_jax as bj
from blasst_jax import analysis
from blasst_jax import patterns

_CONFIG = config_flags.DEFINE_config_file("config", config_file("demo"))


def make_inputs(cfg, seq_len):
  heads = len(cfg.sharpness)
  return patterns.sink_local_qkv(
      jax.random.PRNGKey(cfg.seed), batch=cfg.batch, seq_len=seq_len,
      q_heads=heads, kv_heads=heads, head_dim=cfg.head_dim,
      sharpness=tuple(cfg.sharpness), sink_tokens=cfg.sink_tokens,
      window=cfg.window, noise=cfg.noise)


def sweep(cfg, q, k, v):
  """Per λ and head: sparsity, errors against dense, dropped mass."""
  blocks = dict(block_q=cfg.block_q, block_kv=cfg.block_kv)
  dense = bj.reference.dense_attention(q, k, v, causal=cfg.causal)

  # q, k, v are arguments, not closed-over constants: XLA would otherwise
  # constant-fold the score matmuls at compile time.
  @jax.jit
  def one(q, k, v, threshold):
    r = bj.reference.blockwise_attention(q, k, v, threshold=threshold,
                                         causal=cfg.causal, **blocks)
    if cfg.implementation != "reference":
      out, stats = bj.attention(q, k, v, threshold=threshold,
                                causal=cfg.causal, return_stats=True,
                                implementation=cfg.implementation, **blocks)
    else:
      out, stats = r.out, r.stats
    err = jnp.abs(out.astype(jnp.float32) - dense.astype(jnp.float32))
    mass = analysis.dropped_attention_mass(q, k, r.skip_mask,
                                           causal=cfg.causal, **blocks)
    return dict(sparsity=stats.sparsity.mean(0),            # [heads]
                max_err=err.max(axis=(0, 1, 3)),
                mean_err=err.mean(axis=(0, 1, 3)),
                mass_mean=mass.mean(axis=(0, 2)),
                mass_max=mass.max(axis=(0, 2)),
                skip_mask=r.skip_mask[0], visited_mask=r.visited_mask[0])

  results = []
  for i, thr in enumerate(cfg.thresholds):
    t0 = time.time()
    r = jax.device_get(one(q, k, v, jnp.float32(thr)))
    results.append((thr, r))
    print(f"  [{i + 1}/{len(cfg.thresholds)}] λ={thr:g}  overall sparsity "
          f"{float(np.mean(r['sparsity'])):.3f}  ({time.time() - t0:.1f} s)",
          flush=True)
  return results


def print_tables(cfg, results):
  for h, beta in enumerate(cfg.sharpness):
    print(f"\nhead {h} (sharpness {beta:g})")
    print(f"{'λ':>8} {'sparsity':>9} {'max err':>10} {'mean err':>10} "
          f"{'mass mean':>10} {'mass max':>10}")
    for thr, r in results:
      print(f"{thr:>8g} {r['sparsity'][h]:>9.3f} {r['max_err'][h]:>10.2e} "
            f"{r['mean_err'][h]:>10.2e} {r['mass_mean'][h]:>10.2e} "
            f"{r['mass_max'][h]:>10.2e}")


def kernel_check(cfg):
  """The Pallas kernel makes the oracle's skip decisions (interpret on CPU)."""
  q, k, v = make_inputs(cfg, cfg.kernel_check_seq_len)
  common = dict(threshold=cfg.kernel_check_threshold, causal=cfg.causal,
                block_q=cfg.block_q, block_kv=cfg.block_kv,
                return_stats=True)
  out, stats = bj.attention(q, k, v, implementation="pallas_triton", **common)
  ref, ref_stats = bj.attention(q, k, v, implementation="reference", **common)
  same = bool(jnp.all(stats.skipped_blocks == ref_stats.skipped_blocks))
  err = float(jnp.max(jnp.abs(out - ref)))
  print(f"\nPallas kernel ({jax.default_backend()}, λ="
        f"{cfg.kernel_check_threshold:g}, seq {cfg.kernel_check_seq_len}): "
        f"sparsity {float(stats.total_sparsity):.3f}, same skip counts as "
        f"the oracle: {same}, max |kernel - oracle| = {err:.2e}")


def plot(cfg, results, path):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from blasst_jax import plotting  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  lams = np.array([t for t, _ in results])
  pos = lams > 0
  fig = Figure(figsize=(11, 8.5))
  axes = fig.subplots(2, 2)
  for h, beta in enumerate(cfg.sharpness):
    sp = np.array([r["sparsity"][h] for _, r in results])
    me = np.array([r["max_err"][h] for _, r in results])
    mass = np.array([r["mass_mean"][h] for _, r in results])
    label = f"head {h}, sharpness {beta:g}"
    axes[0, 0].semilogx(lams[pos], sp[pos], "o-", label=label)
    axes[0, 1].loglog(lams[pos], np.maximum(me[pos], 1e-8), "o-", label=label)
    axes[1, 0].semilogy(sp[pos], np.maximum(mass[pos], 1e-12), "o-",
                        label=label)
  axes[0, 0].set(xlabel="threshold λ", ylabel="block sparsity",
                 title="Sparsity against λ")
  axes[0, 1].set(xlabel="threshold λ", ylabel="max |out - dense|",
                 title="Error against λ")
  axes[1, 0].set(xlabel="block sparsity", ylabel="mean dropped softmax mass",
                 title="What skipping costs")
  for ax in axes.flat[:3]:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  thr, r = min(results, key=lambda x: abs(x[0] - cfg.heatmap_threshold))
  h = len(cfg.sharpness) - 1
  # 0: not visited (masked), 1: computed, 2: skipped.
  state = r["visited_mask"][h].astype(int) + r["skip_mask"][h].astype(int)
  cmap = colors.ListedColormap(["white", "tab:blue", "black"])
  axes[1, 1].imshow(state, cmap=cmap, vmin=0, vmax=2,
                    interpolation="nearest")
  axes[1, 1].set(xlabel="kv block", ylabel="q tile",
                 title=f"Head {h}, λ={thr:g}: skipped (black), computed "
                 "(blue)")
  fig.suptitle(f"Skip-softmax on sink + local-window scores: seq "
               f"{cfg.seq_len}, blocks {cfg.block_q}x{cfg.block_kv}, "
               f"{'causal' if cfg.causal else 'non-causal'}")
  plotting.save_figure(fig, path)


def main(argv):
  del argv
  cfg = _CONFIG.value
  t0 = time.time()
  print(f"blasst_jax demo on {jax.devices()[0].device_kind}, jax "
        f"{jax.__version__}: seq {cfg.seq_len}, {len(cfg.sharpness)} heads, "
        f"blocks {cfg.block_q}x{cfg.block_kv}, causal={cfg.causal}")
  q, k, v = make_inputs(cfg, cfg.seq_len)
  print(f"λ sweep ({cfg.implementation}):")
  results = sweep(cfg, q, k, v)
  print_tables(cfg, results)
  if cfg.kernel_check_threshold > 0:
    kernel_check(cfg)
  os.makedirs(cfg.output_dir, exist_ok=True)
  png = os.path.join(cfg.output_dir, "demo_sparsity_error.png")
  plot(cfg, results, png)
  table = [dict(threshold=float(t), **{k_: np.asarray(v_).tolist() for k_, v_
                                       in r.items() if k_ not in ("skip_mask", "visited_mask")})
           for t, r in results]
  with open(os.path.join(cfg.output_dir, "demo_sweep.json"), "w") as f:
    json.dump(dict(config=cfg.to_dict(), sweep=table), f, indent=1)
  print(f"\nplot written to {os.path.abspath(png)}")
  print(f"table written to {os.path.abspath(os.path.join(cfg.output_dir, 'demo_sweep.json'))}")
  print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
