r"""Forward + backward (one `jax.grad` step) of skip-softmax attention
against cuDNN's dense attention, in one process on the same inputs.

    python -m experiments.bench_backward --config=configs/bench_backward.py

Per shape: cuDNN forward+backward, ours at each λ (λ = 0: the dense build),
the forward alone, the skip sparsity, and the gradient's relative error
against cuDNN's at λ = 0. On CPU (the `small` config) only sparsity and
gradient error. Writes JSON + PNG to --config.output.
"""

from __future__ import annotations

import functools
import itertools

from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from experiments import config_file
from experiments import harness
import blasst_jax as bj
from blasst_jax import patterns

_CONFIG = config_flags.DEFINE_config_file("config", config_file("bench_backward"))


def grad_step(attend):
  """q, k, v, d_out -> (dq, dk, dv) of <attend(q, k, v), d_out>."""
  def loss(q, k, v, d_out):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * d_out)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def rel_error(got, want):
  num = sum(float(jnp.sum((g.astype(jnp.float32) - w.astype(jnp.float32))
                          ** 2)) for g, w in zip(got, want))
  den = sum(float(jnp.sum(w.astype(jnp.float32) ** 2)) for w in want)
  return (num / max(den, 1e-30)) ** 0.5


def run_shape(cfg, shape, on_gpu):
  b, s, hq, hkv, d = shape
  q, k, v = patterns.sink_local_qkv(
      jax.random.PRNGKey(cfg.seed), batch=b, seq_len=s, q_heads=hq,
      kv_heads=hkv, head_dim=d, dtype=jnp.dtype(cfg.dtype),
      **cfg.pattern.to_dict())
  d_out = jax.random.normal(jax.random.PRNGKey(cfg.seed + 1), q.shape,
                            jnp.float32)
  if on_gpu:
    baseline = lambda q, k, v: jax.nn.dot_product_attention(  # pylint: disable=g-long-lambda
        q, k, v, is_causal=cfg.causal, implementation="cudnn")
  else:
    baseline = lambda q, k, v: bj.reference.dense_attention(  # pylint: disable=g-long-lambda
        q, k, v, causal=cfg.causal)
  base_grads = grad_step(baseline)(q, k, v, d_out)
  rows = []
  base = dict(shape=list(shape), impl="cudnn" if on_gpu else "xla",
              threshold=0.0, sparsity=0.0, grad_rel_error=0.0)
  if on_gpu:
    base["fwd_bwd_ms"] = harness.time_ms(cfg, grad_step(baseline), q, k, v,
                                         d_out)
    base["fwd_ms"] = harness.time_ms(cfg, jax.jit(baseline), q, k, v)
  rows.append(base)
  for impl, lam in itertools.product(cfg.implementations, cfg.thresholds):
    block_q, block_kv = cfg.block_sizes[impl]
    attend = functools.partial(
        bj.attention, causal=cfg.causal, threshold=lam, implementation=impl,
        block_q=block_q, block_kv=block_kv)
    _, stats = attend(q, k, v, return_stats=True)
    step = grad_step(attend)
    row = dict(shape=list(shape), impl=impl, threshold=lam,
               sparsity=float(jnp.sum(stats.skipped_blocks)
                              / jnp.maximum(jnp.sum(stats.visited_blocks), 1)),
               grad_rel_error=rel_error(step(q, k, v, d_out), base_grads))
    if on_gpu:
      row["fwd_bwd_ms"] = harness.time_ms(cfg, step, q, k, v, d_out)
      row["fwd_ms"] = harness.time_ms(cfg, jax.jit(attend), q, k, v)
      row["vs_cudnn"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
      # The backward alone: the grad step less a plain forward (ours also
      # records its skip mask in the step, so this slightly favours cuDNN).
      row["bwd_vs_cudnn"] = ((base["fwd_bwd_ms"] - base["fwd_ms"])
                             / (row["fwd_bwd_ms"] - row["fwd_ms"]))
    rows.append(row)
  return rows


def plot(result, path):
  rows = [r for r in result["rows"] if "vs_cudnn" in r]
  fig, axes = harness.figure(1, 2, (12, 4.5), sharey=True)
  shapes = sorted({tuple(r["shape"]) for r in rows})
  impls = sorted({r["impl"] for r in rows})
  for ax, key, what in zip(axes, ("vs_cudnn", "bwd_vs_cudnn"),
                           ("forward+backward", "backward alone")):
    for (i, shape), (j, impl) in itertools.product(enumerate(shapes),
                                                   enumerate(impls)):
      pts = sorted((r["sparsity"], r[key]) for r in rows
                   if tuple(r["shape"]) == shape and r["impl"] == impl)
      ax.plot(*zip(*pts), "os^v"[j % 4] + "-:"[j % 2], color=f"C{i}",
              label="{} b{} s{} hq{} hkv{} d{}".format(impl, *shape))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("skip sparsity (λ sweep)")
    ax.set_ylabel(f"{what} speed vs cuDNN")
    ax.set_title(f"{what}: {result['device_kind']}, {result['dtype']}, "
                 "causal", fontsize=9)
  axes[0].legend(fontsize=7)
  harness.save_figure(fig, path)


def describe(r, on_gpu) -> str:
  """The printed line of a row: sparsity, gradient error and (GPU) times."""
  timing = (f" fwd+bwd {r['fwd_bwd_ms']:.3f} ms fwd {r['fwd_ms']:.3f} ms"
            + (f" ({r['vs_cudnn']:.2f}x cuDNN, backward "
               f"{r['bwd_vs_cudnn']:.2f}x)" if "vs_cudnn" in r
               else "") if on_gpu else "")
  return (f"{r['shape']} {r['impl']} λ={r['threshold']:g}: sparsity "
          f"{r['sparsity']:.3f} grad rel err {r['grad_rel_error']:.2e}"
          f"{timing}")


def main(argv):
  del argv
  cfg = _CONFIG.value
  bench = harness.start(cfg, dtype=cfg.dtype, causal=cfg.causal,
                        block_sizes=cfg.block_sizes.to_dict(), rows=[])
  for shape in cfg.shapes:
    for r in run_shape(cfg, tuple(shape), bench.on_gpu):
      bench.add(r, describe(r, bench.on_gpu))
  # Off a GPU there are no times to plot.
  bench.finish(plot if bench.on_gpu else None)


if __name__ == "__main__":
  app.run(main)
