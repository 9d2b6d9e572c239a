"""Figures of `analysis` reports and `calibration` results (matplotlib).

Every function builds a `matplotlib.figure.Figure` without pyplot, so it
works headless and leaves the session's backend alone; it returns the figure
and, with `path`, also writes it (PNG by extension).

    report = analysis.analyze_model(model, x, thresholds=..., ...)
    plotting.plot_sparsity_vs_threshold(report, path="sparsity.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colors
from matplotlib import ticker
from matplotlib.figure import Figure

from blasst_jax import analysis

DPI = 110


def save_figure(fig: Figure, path: str | None, dpi: int = DPI) -> Figure:
  """Lays `fig` out and writes it to `path` (if given); no pyplot state.

  Args:
    fig: the figure.
    path: output file (format from the extension), or None to only lay out.
    dpi: resolution of the written file.

  Returns:
    `fig`.
  """
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=dpi)
  return fig


def _grid(n: int, width: float = 4.5, height: float = 3.6,
          max_cols: int = 4) -> tuple[Figure, np.ndarray]:
  cols = min(n, max_cols)
  rows = -(-n // cols)
  fig = Figure(figsize=(width * cols, height * rows))
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes


def plot_block_map(layer: analysis.LayerReport, head: int | None = None, *,
                   path: str | None = None) -> Figure:
  """Which (q-tile, kv-block) pairs were computed, skipped or masked.

  Args:
    layer: a report made with `heatmap_threshold`.
    head: one q head, or None for all heads side by side.
    path: also write the figure there (PNG by extension).

  Returns:
    The `Figure`.

  Raises:
    ValueError: if `layer` has no block map or `head` is out of range.
  """
  if layer.block_map is None:
    raise ValueError(f"Layer {layer.name!r} has no block map: analyze it with "
                     "heatmap_threshold=λ.")
  if head is not None and not 0 <= head < len(layer.block_map):
    raise ValueError(f"`head` must be in [0, {len(layer.block_map)}), got "
                     f"{head}.")
  heads = range(len(layer.block_map)) if head is None else [head]
  fig, axes = _grid(len(heads), width=3.8, height=3.8)
  cmap = colors.ListedColormap(["white", "tab:blue", "black"])
  sparsity = _replayed_sparsity(layer)
  for ax, h in zip(axes, heads):
    ax.imshow(np.asarray(layer.block_map[h]), cmap=cmap,
              vmin=analysis.MASKED, vmax=analysis.SKIPPED,
              interpolation="nearest")
    ax.set(xlabel=f"kv block ({layer.block_kv} keys)",
           ylabel=f"q tile ({layer.block_q} rows)",
           title=f"head {h}: {sparsity[h]:.0%} skipped")
  fig.suptitle(f"{layer.name}, λ={layer.block_map_threshold:g}, batch 0: "
               "skipped (black), computed (blue), masked (white)")
  return save_figure(fig, path)


def _replayed_sparsity(layer: analysis.LayerReport) -> list[float]:
  """Skipped / visited per head of the block map."""
  out = []
  for head_map in layer.block_map:
    m = np.asarray(head_map)
    out.append(float(np.sum(m == analysis.SKIPPED)
                     / max(np.sum(m != analysis.MASKED), 1)))
  return out


def _positive(thresholds) -> np.ndarray:
  """bool: λ > 0 (λ = 0 has no place on a log axis)."""
  return np.asarray(thresholds) > 0


def plot_sparsity_vs_threshold(report: analysis.ModelReport, *,
                               path: str | None = None) -> Figure:
  """Block sparsity against λ, one panel per layer, a line per head.

  λ = 0 has no place on the log axis and is left out. `path`: also write the
  figure there. Returns the `Figure`.
  """
  fig, axes = _grid(len(report.layers))
  for ax, layer in zip(axes, report.layers):
    lams = np.asarray(layer.thresholds)
    pos = _positive(lams)
    for h, curve in enumerate(layer.sparsity.T):
      ax.semilogx(lams[pos], curve[pos], "o-", ms=3, lw=1, label=f"head {h}")
    ax.semilogx(lams[pos], layer.layer_sparsity[pos], "k-", lw=2.5,
                label="all heads")
    ax.set(xlabel="threshold λ", ylabel="block sparsity", ylim=(-0.02, 1.02),
           title=layer.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Sparsity against λ")
  return save_figure(fig, path)


ERROR_METRICS = {
    "rel_l2_error": "relative L2 error vs dense",
    "max_abs_error": "max |out - dense|",
    "dropped_mass_mean": "mean dropped softmax mass",
    "dropped_mass_max": "max dropped softmax mass",
}


def plot_error_vs_sparsity(report: analysis.ModelReport, *,
                           metric: str = "rel_l2_error",
                           path: str | None = None) -> Figure:
  """The trade-off: error (log) against sparsity over the λ sweep.

  Thin lines are heads, thick lines layers (for "rel_l2_error" pooled over
  heads, otherwise the mean or max over heads).

  Args:
    report: an `analysis.ModelReport`.
    metric: one of `ERROR_METRICS`: "rel_l2_error", "max_abs_error",
      "dropped_mass_mean" or "dropped_mass_max".
    path: also write the figure there.

  Returns:
    The `Figure`.

  Raises:
    ValueError: for an unknown `metric`.
  """
  if metric not in ERROR_METRICS:
    raise ValueError(f"`metric` must be one of {sorted(ERROR_METRICS)}, got "
                     f"{metric!r}.")
  fig = Figure(figsize=(7.5, 5))
  ax = fig.subplots()
  palette = [f"C{i}" for i in range(10)]
  for i, layer in enumerate(report.layers):
    color = palette[i % len(palette)]
    errors = np.asarray(getattr(layer, metric))          # [n_thr, heads]
    floor = 1e-12
    for h in range(errors.shape[1]):
      ax.semilogy(layer.sparsity[:, h], np.maximum(errors[:, h], floor), "-",
                  color=color, lw=0.8, alpha=0.45)
    if metric == "rel_l2_error":
      pooled = np.asarray(layer.layer_rel_l2_error)
    elif metric.endswith("_max") or metric.startswith("max"):
      pooled = errors.max(-1)
    else:
      pooled = errors.mean(-1)
    ax.semilogy(layer.layer_sparsity, np.maximum(pooled, floor), "o-",
                color=color, lw=2.2, label=f"{layer.name} (heads thin)")
  ax.set(xlabel="block sparsity", ylabel=ERROR_METRICS[metric],
         title="What skipping costs: error against sparsity (λ sweep)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return save_figure(fig, path)


def plot_sparsity_vs_context(report: analysis.ModelReport, *,
                             path: str | None = None) -> Figure:
  """Mean sparsity over heads against context length, per layer and
  setting (fixed λ or λ = c / length).

  `path`: also write the figure there. Returns the `Figure`.

  Raises:
    ValueError: if no layer was analysed with `context_lengths`.
  """
  layers = [l for l in report.layers if l.context is not None]
  if not layers:
    raise ValueError("No layer has a context sweep: analyze with "
                     "context_lengths=... and context_thresholds / "
                     "context_scale_factors.")
  fig, axes = _grid(len(layers))
  for ax, layer in zip(axes, layers):
    sweep = layer.context
    for label, per_length in zip(sweep.labels, sweep.sparsity):
      mean = np.asarray(per_length).mean(-1)             # [n_lengths]
      ax.plot(sweep.context_lengths, mean, marker="o",
              ls="--" if label.startswith("c=") else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sweep.context_lengths,
                  [str(n) for n in sweep.context_lengths])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set(xlabel="context length (tokens)",
           ylabel="block sparsity (mean over heads)", ylim=(-0.02, 1.02),
           title=layer.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="λ fixed (solid), λ = c/len (dashed)",
              title_fontsize=7)
  fig.suptitle("Sparsity against context length")
  return save_figure(fig, path)


def plot_gap_histogram(layer: analysis.LayerReport, *,
                       path: str | None = None) -> Figure:
  """Distribution of the block gap `m_blk - m_prev` per head, with log λ of
  the sweep marked: blocks left of a line are skipped at that λ.

  `layer`: an `analysis.LayerReport`; `path`: also write the figure there.
  Returns the `Figure`.
  """
  hist = layer.gap_histogram
  edges = np.asarray(hist.edges)
  fig = Figure(figsize=(7.5, 4.5))
  ax = fig.subplots()
  for h, counts in enumerate(hist.counts):
    total = max(sum(counts) + hist.below[h] + hist.above[h], 1)
    ax.stairs(np.asarray(counts) / total, edges, label=f"head {h}")
  for lam in layer.thresholds:
    if lam > 0:
      ax.axvline(np.log(lam), color="gray", lw=0.8, ls=":")
      ax.text(np.log(lam), ax.get_ylim()[1] * 0.98, f"λ={lam:g}", rotation=90,
              fontsize=6, va="top", ha="right", color="gray")
  ax.set(xlabel="block gap max_rows(m_blk - m_prev) (natural log)",
         ylabel="fraction of visited blocks",
         title=f"{layer.name}: block gaps (skip when gap < log λ)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, path)


def plot_calibration(calibration, checks: Mapping | None = None, *,
                     path: str | None = None) -> Figure:
  """Per phase: the swept (sparsity, c) points, the exponential fit, the
  calibrated c for the target and, with `checks`, the held-out sparsity.

  Args:
    calibration: a `calibration.Calibration`.
    checks: {phase: `calibration.HeldOutCheck`} (optional).
    path: also write the figure there.

  Returns:
    The `Figure`.
  """
  phases = list(calibration.sweeps)
  fig, axes = _grid(len(phases), width=5.5, height=4.2)
  for ax, phase in zip(axes, phases):
    sweep, fit = calibration.sweeps[phase], calibration.fits[phase]
    ax.semilogy(sweep.sparsity, sweep.scale_factors, "o", ms=3, color="C0",
                label="sweep")
    s = np.linspace(fit.sparsity_min, fit.sparsity_max, 50)
    ax.semilogy(s, fit.a * np.exp(fit.b * s), "-", color="C1", lw=2,
                label=f"fit c = {fit.a:.3g}·exp({fit.b:.3g}·s)")
    target, c = calibration.targets[phase], calibration.scale_factors[phase]
    ax.semilogy([target], [c], "*", ms=14, color="C3",
                label=f"target {target:.2f}: c = {c:.3g}")
    if checks and phase in checks:
      check = checks[phase]
      ax.axvspan(target - check.tolerance, target + check.tolerance,
                 color="C2", alpha=0.15,
                 label=f"target ±{check.tolerance * 100:g} points")
      ax.semilogy([check.achieved], [c], "D", ms=8, color="C2",
                  label=f"held-out {check.achieved:.3f}")
    ax.set(xlabel="block sparsity", ylabel="scale factor c (λ = c / kv_len)",
           title=phase)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.suptitle("Calibration: scale factor against sparsity")
  return save_figure(fig, path)


def plot_report(report: analysis.ModelReport, directory: str, *,
                block_map_heads: Sequence[int] | None = None) -> list[str]:
  """Writes every figure of a report into `directory`; returns the paths.

  Sparsity and error against λ, sparsity against context (when analysed),
  and per layer the gap histogram and block map(s).

  Args:
    report: an `analysis.ModelReport`.
    directory: an existing directory; PNG files are written there.
    block_map_heads: one block map file per listed head, or None for one
      file per layer with all heads.

  Returns:
    The written paths.
  """
  paths = []

  def save(fig_fn, name, *args, **kwargs):
    path = os.path.join(directory, name)
    fig_fn(*args, path=path, **kwargs)
    paths.append(path)

  save(plot_sparsity_vs_threshold, "sparsity_vs_threshold.png", report)
  save(plot_error_vs_sparsity, "error_vs_sparsity.png", report)
  if any(l.context is not None for l in report.layers):
    save(plot_sparsity_vs_context, "sparsity_vs_context.png", report)
  for layer in report.layers:
    safe = layer.name.replace("/", "_").replace("#", "_")
    save(plot_gap_histogram, f"gap_histogram_{safe}.png", layer)
    if layer.block_map is not None:
      heads = [None] if block_map_heads is None else list(block_map_heads)
      for head in heads:
        suffix = "" if head is None else f"_head{head}"
        save(plot_block_map, f"block_map_{safe}{suffix}.png", layer, head)
  return paths


def plot_training(logs: Sequence[Mapping], *, labels: Sequence[str] | None = None,
                  path: str | None = None) -> Figure:
  """Loss and skip-sparsity curves of `experiments/train_lm.py` runs.

  Args:
    logs: the runs' JSON logs (dicts with "evals": [{"step", "train_loss",
      "eval_loss", "sparsity": [per layer]}, ...] and "step_offset", the
      step of the checkpoint a fine-tune started from, so a fine-tune is
      drawn after the dense run it continues). A dense run probed at a λ
      ("eval_loss_at_threshold", "sparsity_at_threshold") gets dotted
      curves for it.
    labels: one legend label per run (default: each log's "mode").
    path: where to write the PNG.

  Returns:
    The figure: loss against step (train dashed, eval solid) on the left,
    mean skip sparsity over layers (thin: per layer) on the right.
  """
  if labels is None:
    labels = [log.get("mode", f"run {i}") for i, log in enumerate(logs)]
  if len(labels) != len(logs):
    raise ValueError(f"Got {len(labels)} labels for {len(logs)} logs.")
  fig = Figure(figsize=(11, 4))
  ax_loss, ax_sparsity = fig.subplots(1, 2)
  for i, (log, label) in enumerate(zip(logs, labels)):
    color = f"C{i}"
    evals = log["evals"]
    steps = np.array([e["step"] for e in evals]) + log.get("step_offset", 0)
    ax_loss.plot(steps, [e["train_loss"] for e in evals], "--", color=color,
                 label=f"{label} train")
    ax_loss.plot(steps, [e["eval_loss"] for e in evals], "-", color=color,
                 label=f"{label} eval")
    probed = [e for e in evals if "sparsity_at_threshold" in e]
    if probed:
      probe_steps = np.array([e["step"] for e in probed]) + log.get(
          "step_offset", 0)
      ax_loss.plot(probe_steps, [e["eval_loss_at_threshold"] for e in probed],
                   ":", color=color, label=f"{label} eval, skipping at λ")
      ax_sparsity.plot(
          probe_steps, [np.mean(e["sparsity_at_threshold"]) for e in probed],
          "s:", color=color, ms=3, label=f"{label}, skipping at λ")
    sparsity = np.array([e["sparsity"] for e in evals], dtype=float)
    if sparsity.size:
      for layer in sparsity.T:
        ax_sparsity.plot(steps, layer, "-", color=color, lw=0.6, alpha=0.4)
      ax_sparsity.plot(steps, sparsity.mean(1), "o-", color=color, ms=3,
                       label=f"{label} (mean over layers)")
  ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)",
              title="loss")
  # Small sparsities get an axis that shows them.
  top = max([0.0] + [max(line.get_ydata(), default=0.0)
                     for line in ax_sparsity.get_lines()])
  top = 1.0 if top > 0.4 else max(1.25 * top, 0.02)
  ax_sparsity.set(xlabel="step", ylabel="skipped / visited blocks",
                  title="skip sparsity (eval batches)",
                  ylim=(-0.02 * top, top))
  for ax in (ax_loss, ax_sparsity):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return save_figure(fig, path)
