"""Measurements of skip-softmax: sparsity, what skipping costs, and why.

Per attention layer and head, for a sweep of thresholds λ: block sparsity
(overall and per q-tile position), dropped softmax mass (exact, from the
dense probabilities and the oracle's skip mask), output error against dense
attention, the distribution of the block-max gap `m_blk - m_prev` that the
skip rule compares with log λ, and sparsity against context length. Every
number comes from `blasst_jax.reference.blockwise_attention`, the contract.

    import blasst_jax.analysis as ba
    report = ba.analyze_model(model, x, thresholds=(1e-4, 1e-3, 1e-2))
    print(report.table())
    report.save_json("analysis.json")

Inputs come from q/k/v (`analyze_attention`) or from a Flax model run
(`analyze_model`, `capture_attention_inputs`): each attention layer's q/k/v
are recorded as the model computes them, without changing the model.

Results are plain dataclasses of lists and numbers (`to_dict` gives JSON);
`blasst_jax.plotting` draws them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import config as config_lib
from blasst_jax import reference
from blasst_jax import validation
from blasst_jax._progress import ProgressBar

# Histogram bins of the block-max gap, natural-log units: log λ for λ in
# [1e-13, 1) lies in [-30, 0); positive gaps are blocks that raise the max.
DEFAULT_GAP_EDGES = tuple(float(e) for e in np.arange(-30.0, 10.5, 1.0))
GAP_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Block map entries (`LayerReport.block_map`).
MASKED, COMPUTED, SKIPPED = 0, 1, 2


# ----------------------------------------------------------------------------
# Exact per-block quantities.


def block_probability_mass(q, k, *, block_kv=None, causal=False,
                           sm_scale=None, kv_lengths=None) -> jax.Array:
  """Dense softmax mass of each KV block, per query row.

  Args:
    q: [batch, q_len, q_heads, head_dim]; k: [batch, kv_len, kv_heads, d].
    block_kv: keys per block (default `config.DEFAULT_BLOCK_KV`, clamped to
      kv_len as the oracle does).
    causal, sm_scale, kv_lengths: as `blasst_jax.attention`.

  Returns:
    f32 [batch, q_heads, q_len, n_kv_blocks]; rows sum to 1 (0 for rows
    that see no key). Memory: the dense probabilities.

  Raises:
    ValueError: for a `block_kv` that is not a power of two >= 16.
  """
  b, lq, hq, _ = q.shape
  lk = k.shape[1]
  _, block_kv = config_lib.effective_block_sizes(lq, lk, None, block_kv)
  n_kv_blocks = -(-lk // block_kv)
  p = reference.attention_probabilities(q, k, causal=causal,
                                        sm_scale=sm_scale,
                                        kv_lengths=kv_lengths)
  p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, n_kv_blocks * block_kv - lk)))
  return p.reshape(b, hq, lq, n_kv_blocks, block_kv).sum(-1)


def _dropped_mass(block_mass, skip_mask, block_q: int) -> jax.Array:
  """block_mass [b, hq, lq, nk], skip_mask [b, hq, nq, nk] -> [b, hq, lq]."""
  q_len = block_mass.shape[2]
  row_tile = jnp.arange(q_len) // block_q                  # [lq]
  skipped_rows = skip_mask[:, :, row_tile, :]              # [b, hq, lq, nk]
  return jnp.sum(jnp.where(skipped_rows, block_mass, 0.0), axis=-1)


def dropped_attention_mass(q, k, skip_mask, *, block_q=None, block_kv=None,
                           causal=False, sm_scale=None, kv_lengths=None):
  """Dense softmax mass that falls in skipped blocks, per query row.

  Args:
    q: [batch, q_len, q_heads, head_dim]; k: [batch, kv_len, kv_heads, d].
    skip_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks], e.g.
      `reference.blockwise_attention(...).skip_mask`.
    block_q, block_kv: the block sizes the mask was made with.
    causal, sm_scale, kv_lengths: as `blasst_jax.attention`.

  Returns:
    f32 [batch, q_heads, q_len] in [0, 1]: for each row, the probability
    that dense attention puts on keys of skipped blocks.

  Raises:
    ValueError: for block sizes that are not powers of two >= 16.
  """
  lq, lk = q.shape[1], k.shape[1]
  block_q, block_kv = config_lib.effective_block_sizes(lq, lk, block_q,
                                                       block_kv)
  mass = block_probability_mass(q, k, block_kv=block_kv, causal=causal,
                                sm_scale=sm_scale, kv_lengths=kv_lengths)
  return _dropped_mass(mass, skip_mask, block_q)


def replay_skip_mask(result, threshold) -> jax.Array:
  """The skip decisions at another λ, from one oracle run.

  A skipped block has `m_blk < m_prev + log λ < m_prev` in every row, so
  skipping never changes the running max: `block_gap` is the same for every
  λ < 1, and the oracle skips exactly the visited blocks with
  `block_gap < log λ` (a tile's first visited block has gap +inf). One run
  (at any λ, e.g. 0) therefore gives the decisions of a whole sweep.

  Args:
    result: a `reference.BlockwiseResult` (prefill) or `DecodeResult`.
    threshold: λ in [0, 1), a float or f32 [batch].

  Returns:
    bool, shaped as `result.skip_mask`.
  """
  gap = result.block_gap
  batch = gap.shape[0]
  log_thr = config_lib.log_threshold(
      jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (batch,)))
  log_thr = log_thr.reshape((batch,) + (1,) * (gap.ndim - 1))
  return result.visited_mask & (gap < log_thr)


def error_summary(out, expected) -> dict[str, jax.Array]:
  """Max abs, mean abs and relative L2 error of `out` against `expected`.

  Args:
    out, expected: arrays of the same shape, any float dtype (compared in
      f32).

  Returns:
    {"max_abs", "mean_abs", "rel_l2"}: f32 scalars.
  """
  out = jnp.asarray(out, jnp.float32)
  expected = jnp.asarray(expected, jnp.float32)
  diff = out - expected
  return {
      "max_abs": jnp.max(jnp.abs(diff)),
      "mean_abs": jnp.mean(jnp.abs(diff)),
      "rel_l2": jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(expected),
                                                    1e-30),
  }


def skip_error_bound(v, skip_mask, threshold, *, block_q, block_kv,
                     q_len: int):
  """Upper bound on |out_skip - out_dense| per (batch, q-head, row).

  Every skipped block j has, for every row, `max_j s - m_prev < log λ`, so
  each of its <= block_kv weights is below λ relative to the row max, which
  itself lies in a kept block. The dropped probability is therefore
  δ <= D / (1 + D) with D = n_skipped * block_kv * λ, and the output moves by
  at most δ * (max v - min v) per feature.

  Args:
    v: [batch, kv_len, kv_heads, head_dim].
    skip_mask: bool [batch, q_heads, n_q_tiles, n_kv_blocks].
    threshold: λ, a float or f32 [batch].
    block_q, block_kv: the block sizes the mask was made with.
    q_len: query length (the last q tile may be partial).

  Returns:
    f32 [batch, q_heads, q_len].
  """
  b, _, hkv, _ = v.shape
  hq = skip_mask.shape[1]
  vf = v.astype(jnp.float32)
  spread = (jnp.max(vf, axis=(1, 3)) - jnp.min(vf, axis=(1, 3)))  # [b, hkv]
  spread = jnp.repeat(spread, hq // hkv, axis=1)                   # [b, hq]
  n_skip = jnp.sum(skip_mask, axis=-1).astype(jnp.float32)          # [b,hq,nq]
  lam = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (b,))
  dropped = n_skip * block_kv * lam[:, None, None]
  delta = dropped / (1.0 + dropped)
  per_tile = delta * spread[..., None]
  return jnp.repeat(per_tile, block_q, axis=-1)[..., :q_len]


# ----------------------------------------------------------------------------
# Capturing attention inputs from a Flax model.


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
  """One attention call, as the oracle takes it.

  Attributes:
    q: [batch, q_len, q_heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim].
    causal: top-left aligned causal mask.
    kv_lengths: int [batch] or None.
    sm_scale: None for 1/sqrt(head_dim).
    block_q, block_kv: the layer's tile sizes (None: library defaults).
    threshold: the λ (or `SkipSoftmaxConfig`) the layer ran with.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  causal: bool = False
  kv_lengths: jax.Array | None = None
  sm_scale: float | None = None
  block_q: int | None = None
  block_kv: int | None = None
  threshold: Any = 0.0


def _concrete_inputs(q, k, v, **options) -> AttentionInputs:
  if any(isinstance(x, jax.core.Tracer) for x in (q, k, v)):
    raise ValueError(
        "capture_attention_inputs needs concrete arrays: call the model "
        "eagerly, not under jax.jit / nnx.jit (capture is for analysis, one "
        "forward pass).")
  kv_lengths = options.pop("kv_lengths", None)
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths)
  return AttentionInputs(q=q, k=k, v=v, kv_lengths=kv_lengths, **options)


def _mask_is_causal(mask, q_len: int, kv_len: int) -> bool:
  """True for a top-left causal mask, False for no or an all-True mask."""
  if mask is None:
    return False
  allowed = np.broadcast_to(np.asarray(mask, bool),
                            np.shape(mask)[:-2] + (q_len, kv_len))
  if allowed.all():
    return False
  causal = np.tril(np.ones((q_len, kv_len), bool))
  if (allowed == causal).all():
    return True
  raise ValueError(
      "analysis handles attention with no mask or a causal mask, got another "
      "`mask` (padding?). For padded batches use "
      "blasst_jax.nn.SkipSelfAttention(kv_lengths=...) or analyze q/k/v with "
      "analyze_attention(..., kv_lengths=...).")


def _flatten_batch(x):
  """[*batch, len, heads, head_dim] -> [prod(batch), len, heads, head_dim]."""
  return x.reshape((-1,) + x.shape[-3:])


class _Recorder:
  """Collects `AttentionInputs` and names them after their modules."""

  def __init__(self, name_of: Callable[[Any], str | None]):
    self.name_of = name_of
    self.owners: list[Any] = []     # innermost attention module being called
    self.records: list[tuple[str | None, AttentionInputs]] = []

  def __call__(self, module, q, k, v, **options) -> None:
    owner = module if module is not None else (
        self.owners[-1] if self.owners else None)
    self.records.append((self.name_of(owner), _concrete_inputs(
        q, k, v, **options)))

  @contextlib.contextmanager
  def inside(self, owner) -> Iterator[None]:
    self.owners.append(owner)
    try:
      yield
    finally:
      self.owners.pop()

  def named(self) -> dict[str, AttentionInputs]:
    out: dict[str, AttentionInputs] = {}
    for i, (name, inputs) in enumerate(self.records):
      name = name or f"attention_{i}"
      unique, n = name, 1
      while unique in out:   # A module called more than once.
        n += 1
        unique = f"{name}#{n}"
      out[unique] = inputs
    return out


def _recording_attention_fn(fn, owner, recorder: _Recorder):
  """Wraps a Flax attention_fn: blasst functions report themselves, any
  other one is recorded from the arguments Flax passes."""

  def recording_fn(query, key, value, *args, **kwargs):
    before = len(recorder.records)
    with recorder.inside(owner):
      out = fn(query, key, value, *args, **kwargs)
    if len(recorder.records) == before:
      bias = args[0] if args else kwargs.get("bias")
      if bias is not None:
        raise ValueError("analysis does not handle an attention `bias`; "
                         "analyze q/k/v with analyze_attention instead.")
      mask = args[1] if len(args) > 1 else kwargs.get("mask")
      causal = bool(kwargs.get("is_causal", False)) or _mask_is_causal(
          mask, query.shape[-3], key.shape[-3])
      recorder(owner, _flatten_batch(query), _flatten_batch(key),
               _flatten_batch(value), causal=causal)
    return out

  return recording_fn


@contextlib.contextmanager
def _recording(name_of: Callable[[Any], str | None]) -> Iterator[_Recorder]:
  """Installs a recorder for blasst_jax.nn's attention calls."""
  from blasst_jax import nn as bjnn  # pylint: disable=g-import-not-at-top
  recorder = _Recorder(name_of)
  token = bjnn.attention_input_recorder.set(recorder)
  try:
    yield recorder
  finally:
    bjnn.attention_input_recorder.reset(token)


def _capture_nnx(model, args, kwargs) -> _Recorder:
  """Names are graph paths; every nnx.MultiHeadAttention's attention_fn is
  wrapped for the call and restored after."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  modules = list(nnx.iter_modules(model))
  paths = {id(m): "/".join(str(p) for p in path) or type(m).__name__
           for path, m in modules}
  heads = [m for _, m in modules if isinstance(m, nnx.MultiHeadAttention)]
  originals = [m.attention_fn for m in heads]
  with _recording(lambda m: paths.get(id(m))) as recorder:
    try:
      for m, fn in zip(heads, originals):
        m.attention_fn = _recording_attention_fn(fn, m, recorder)
      model(*args, **kwargs)
    finally:
      for m, fn in zip(heads, originals):
        m.attention_fn = fn
  return recorder


def _capture_linen(model, args, kwargs) -> _Recorder:
  """Names are module paths, tracked with a method interceptor (linen
  passes `module` to an attention_fn only with sow_weights=True)."""
  from flax import linen  # pylint: disable=g-import-not-at-top

  def path_of(module):
    if isinstance(module, str):
      return module
    if isinstance(module, linen.Module) and module.scope is not None:
      return "/".join(module.path) or type(module).__name__
    return None

  with _recording(path_of) as recorder:

    def track_modules(next_fun, fun_args, fun_kwargs, context):
      if context.method_name != "__call__":
        return next_fun(*fun_args, **fun_kwargs)
      with recorder.inside(path_of(context.module)):
        return next_fun(*fun_args, **fun_kwargs)

    with linen.intercept_methods(track_modules):
      model.apply(*args, **kwargs)
  return recorder


def capture_attention_inputs(model, *args, **kwargs) -> dict[str, AttentionInputs]:
  """Runs a model once and records every attention call's inputs.

  Recorded: `blasst_jax.nn.SkipSelfAttention` layers, every
  `flax.nnx.MultiHeadAttention` (whatever its `attention_fn`; with a mask,
  only none or causal), and any module using
  `blasst_jax.nn.make_attention_fn` (linen included). The q/k/v are those the
  model computes, so with λ > 0 in its layers, later layers see the outputs
  of sparse earlier ones; run the model dense to measure dense statistics.

  Args:
    model: a `flax.nnx.Module` (called as `model(*args, **kwargs)`), a
      `flax.linen.Module` (called as `model.apply(*args, **kwargs)`, so
      `args[0]` is its variables), or any callable.
    *args, **kwargs: the model's inputs.

  Returns:
    {layer name: `AttentionInputs`} in call order; names are module paths
    ("layers/0"), `attention_i` where no module is known, with "#2", ...
    for repeated calls of one module.

  Raises:
    ValueError: if the model is called under jit (no concrete arrays), uses
      an unsupported mask or bias, or no attention call was recorded.
  """
  from flax import linen, nnx  # pylint: disable=g-import-not-at-top
  if isinstance(model, nnx.Module):
    recorder = _capture_nnx(model, args, kwargs)
  elif isinstance(model, linen.Module):
    recorder = _capture_linen(model, args, kwargs)
  elif callable(model):
    with _recording(lambda m: None) as recorder:
      model(*args, **kwargs)
  else:
    raise ValueError(f"`model` must be a flax nnx/linen Module or a callable, "
                     f"got {type(model).__name__}.")
  captured = recorder.named()
  if not captured:
    raise ValueError(
        "No attention call was recorded. Attention layers are seen when they "
        "are blasst_jax.nn.SkipSelfAttention, flax.nnx.MultiHeadAttention, or "
        "use blasst_jax.nn.make_attention_fn (needed for linen).")
  return captured


# ----------------------------------------------------------------------------
# Result types.


def json_safe(value):
  """Nested lists/dicts with NaN and ±inf replaced by None."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _to_list(x, dtype=float):
  """numpy/jax array -> nested Python lists of `dtype`."""
  return np.asarray(x).astype(dtype).tolist()


@dataclasses.dataclass
class GapHistogram:
  """Distribution of the block-max gap `max_rows(m_blk - m_prev)`.

  Over every visited (q-tile, kv-block) pair that is not its tile's first
  (whose gap is +inf). The gap does not depend on λ (`replay_skip_mask`):
  the fraction of gaps below log λ is the sparsity at λ.

  Attributes:
    edges: bin edges, natural-log units, [n_bins + 1].
    counts: [q_heads][n_bins].
    below, above: [q_heads], gaps under `edges[0]` / over `edges[-1]`.
    quantiles: {"p5": [q_heads], ...}; None where a head has no gap.
  """

  edges: list[float]
  counts: list[list[int]]
  below: list[int]
  above: list[int]
  quantiles: dict[str, list[float | None]]


@dataclasses.dataclass
class ContextSweep:
  """Sparsity against context length.

  Attributes:
    context_lengths: [n_lengths], the prefixes analysed.
    labels: [n_settings], "λ=0.001" (fixed λ) or "c=40" (λ = c / length).
    sparsity: [n_settings][n_lengths][q_heads].
  """

  context_lengths: list[int]
  labels: list[str]
  sparsity: list[list[list[float]]]


@dataclasses.dataclass
class LayerReport:
  """What skipping does in one attention layer, per head, over a λ sweep.

  Attributes:
    name: the layer.
    shape: batch, q_len, kv_len, q_heads, kv_heads, head_dim.
    causal, block_q, block_kv: the analysed tiling and mask.
    thresholds: the λ values, [n_thresholds].
    skipped_blocks: [n_thresholds][q_heads], summed over the batch.
    visited_blocks: [q_heads], summed over the batch.
    sparsity_by_q_tile: [n_thresholds][q_heads][n_q_tiles]: skipped /
      visited blocks of each q tile (position), over the batch.
    dropped_mass_mean, dropped_mass_max: [n_thresholds][q_heads]: dense
      softmax mass on skipped blocks, mean / max over query rows.
    max_abs_error, rel_l2_error: [n_thresholds][q_heads], output against
      dense attention (rel. L2 over batch, rows and features of the head).
    layer_rel_l2_error: [n_thresholds], over all heads.
    gap_histogram: see `GapHistogram`.
    block_map_threshold: λ of `block_map` (None: no map).
    block_map: [q_heads][n_q_tiles][n_kv_blocks] of batch element 0:
      MASKED (0), COMPUTED (1) or SKIPPED (2).
    context: sparsity against context length, or None.
  """

  name: str
  shape: dict[str, int]
  causal: bool
  block_q: int
  block_kv: int
  thresholds: list[float]
  skipped_blocks: list[list[int]]
  visited_blocks: list[int]
  sparsity_by_q_tile: list[list[list[float]]]
  dropped_mass_mean: list[list[float]]
  dropped_mass_max: list[list[float]]
  max_abs_error: list[list[float]]
  rel_l2_error: list[list[float]]
  layer_rel_l2_error: list[float]
  gap_histogram: GapHistogram
  block_map_threshold: float | None = None
  block_map: list[list[list[int]]] | None = None
  context: ContextSweep | None = None

  @property
  def sparsity(self) -> np.ndarray:
    """f64 [n_thresholds, q_heads]: skipped / visited blocks."""
    visited = np.maximum(np.asarray(self.visited_blocks), 1)
    return np.asarray(self.skipped_blocks) / visited

  @property
  def layer_sparsity(self) -> np.ndarray:
    """f64 [n_thresholds]: skipped / visited over all heads."""
    total = max(int(np.sum(self.visited_blocks)), 1)
    return np.asarray(self.skipped_blocks).sum(-1) / total

  def to_dict(self) -> dict[str, Any]:
    """Nested lists and numbers for JSON (NaN and ±inf become None)."""
    return json_safe(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "LayerReport":
    """Inverse of `to_dict`."""
    data = dict(data)
    data["gap_histogram"] = GapHistogram(**data["gap_histogram"])
    if data.get("context") is not None:
      data["context"] = ContextSweep(**data["context"])
    return cls(**data)


def _format_lambda(threshold: float) -> str:
  return "0" if threshold == 0 else f"{threshold:.0e}"


def _format_value(value, spec: str) -> str:
  return "-" if value is None or not np.isfinite(value) else format(value,
                                                                    spec)


@dataclasses.dataclass
class ModelReport:
  """`LayerReport`s of every attention layer of a model run."""

  layers: list[LayerReport]

  def layer(self, name: str) -> LayerReport:
    """The layer called `name`; KeyError if there is none."""
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(f"No layer {name!r}; layers: "
                   f"{[l.name for l in self.layers]}.")

  def to_dict(self) -> dict[str, Any]:
    """{"layers": [LayerReport.to_dict(), ...]}, JSON-ready."""
    return {"layers": [layer.to_dict() for layer in self.layers]}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "ModelReport":
    """Inverse of `to_dict`."""
    return cls(layers=[LayerReport.from_dict(l) for l in data["layers"]])

  def save_json(self, path: str) -> None:
    """Writes `to_dict()` to `path` as JSON."""
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=1)

  @classmethod
  def load_json(cls, path: str) -> "ModelReport":
    """Reads a report written by `save_json`."""
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def table(self, threshold: float | None = None) -> str:
    """Per layer and head: sparsity at every λ, then at `threshold` (default
    the largest λ) the mean dropped mass, max |error|, relative L2 error and
    the median block gap; an "all" row per layer pools the heads.

    Raises:
      ValueError: if `threshold` is not one of a layer's analysed λ.
    """
    name_width = max([5] + [len(l.name) for l in self.layers])
    lines = []
    for layer in self.layers:
      lams = layer.thresholds
      at = max(lams) if threshold is None else threshold
      if at not in lams:
        raise ValueError(f"`threshold` {at} is not one of the analysed λ "
                         f"{lams}.")
      t = lams.index(at)
      at_label = f"at λ={_format_lambda(at)}:"
      pad = " " * len(at_label)
      head = (f"{'layer':<{name_width}} {'head':>4} |"
              + "".join(f" {'λ=' + _format_lambda(x):>8}" for x in lams)
              + f" | {at_label} {'mass':>8} {'max err':>8} {'rel L2':>8} "
              f"{'gap p50':>8}")
      lines += [head, "-" * len(head)]
      sparsity = layer.sparsity
      median_gap = layer.gap_histogram.quantiles["p50"]
      for h in range(len(layer.visited_blocks)):
        lines.append(
            f"{layer.name:<{name_width}} {h:>4} |"
            + "".join(f" {s:>8.3f}" for s in sparsity[:, h])
            + f" | {pad} {layer.dropped_mass_mean[t][h]:>8.1e} "
            f"{layer.max_abs_error[t][h]:>8.1e} "
            f"{layer.rel_l2_error[t][h]:>8.1e} "
            f"{_format_value(median_gap[h], '>8.2f')}")
      lines.append(
          f"{layer.name:<{name_width}} {'all':>4} |"
          + "".join(f" {s:>8.3f}" for s in layer.layer_sparsity)
          + f" | {pad} {np.mean(layer.dropped_mass_mean[t]):>8.1e} "
          f"{np.max(layer.max_abs_error[t]):>8.1e} "
          f"{layer.layer_rel_l2_error[t]:>8.1e}")
      lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# The analysis.


def _check_thresholds(thresholds, name: str = "thresholds") -> list[float]:
  values = [thresholds] if np.ndim(thresholds) == 0 else list(thresholds)
  if not values:
    raise ValueError(f"`{name}` must hold at least one λ, e.g. "
                     "(1e-4, 1e-3, 1e-2).")
  for value in values:
    if not isinstance(value, (int, float, np.floating, np.integer)):
      raise ValueError(f"`{name}` must be numbers λ in [0, 1), got "
                       f"{value!r}.")
    config_lib.check_threshold(value)
  return [float(v) for v in values]


def _check_context_lengths(context_lengths, kv_len: int) -> list[int]:
  lengths = sorted({int(n) for n in context_lengths})
  if any(n < 1 or n > kv_len for n in context_lengths) or any(
      int(n) != n for n in context_lengths):
    raise ValueError(f"`context_lengths` must be integers in [1, kv_len="
                     f"{kv_len}], got {list(context_lengths)}.")
  return lengths


def check_inputs(inputs: AttentionInputs) -> None:
  """ValueError unless `inputs` hold valid q/k/v, lengths and scale."""
  validation.check_qkv(inputs.q, inputs.k, inputs.v)
  validation.check_kv_lengths(inputs.kv_lengths, inputs.q.shape[0])
  validation.check_sm_scale(inputs.sm_scale)


def _oracle_gaps(q, k, v, kv_lengths, *, causal, sm_scale, block_q, block_kv):
  """block_gap and visited_mask of one oracle run (λ = 0: any λ gives the
  same gaps, see `replay_skip_mask`)."""
  r = reference.blockwise_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                    kv_lengths=kv_lengths, block_q=block_q,
                                    block_kv=block_kv)
  return r.block_gap, r.visited_mask


_oracle_gaps = jax.jit(_oracle_gaps, static_argnames=(
    "causal", "sm_scale", "block_q", "block_kv"))


def _sweep_point(q, k, v, kv_lengths, dense, block_mass, threshold, *, causal,
                 sm_scale, block_q, block_kv):
  """Per-head statistics at one λ (a traced scalar: one compile per layer)."""
  r = reference.blockwise_attention(
      q, k, v, threshold=threshold, causal=causal, sm_scale=sm_scale,
      kv_lengths=kv_lengths, block_q=block_q, block_kv=block_kv)
  mass = _dropped_mass(block_mass, r.skip_mask, block_q)      # [b, hq, lq]
  dense = dense.astype(jnp.float32)
  diff = r.out.astype(jnp.float32) - dense                     # [b,lq,hq,d]
  return dict(
      skipped=jnp.sum(r.stats.skipped_blocks, axis=0),          # [hq]
      skipped_per_tile=jnp.sum(r.skip_mask, axis=(0, 3)),       # [hq, nq]
      visited_per_tile=jnp.sum(r.visited_mask, axis=(0, 3)),    # [hq, nq]
      mass_mean=jnp.mean(mass, axis=(0, 2)),
      mass_max=jnp.max(mass, axis=(0, 2)),
      max_abs=jnp.max(jnp.abs(diff), axis=(0, 1, 3)),
      err_sq=jnp.sum(diff * diff, axis=(0, 1, 3)),
      ref_sq=jnp.sum(dense * dense, axis=(0, 1, 3)))


_sweep_point = jax.jit(_sweep_point, static_argnames=(
    "causal", "sm_scale", "block_q", "block_kv"))


def gap_histogram(block_gap, visited_mask, edges=DEFAULT_GAP_EDGES
                  ) -> GapHistogram:
  """Histogram per head of the finite block gaps of visited blocks.

  Args:
    block_gap, visited_mask: [batch, heads, n_q_tiles, n_kv_blocks] (an
      oracle result's), or any shape with the head axis second.
    edges: increasing bin edges in natural-log units.

  Returns:
    A `GapHistogram` (the +inf gaps of each tile's first block left out).

  Raises:
    ValueError: unless `edges` holds at least two increasing numbers.
  """
  edges = np.asarray(edges, np.float64)
  if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f"`edges` must be >= 2 increasing numbers, got "
                     f"{edges.tolist()}.")
  gap = np.asarray(block_gap, np.float64)
  keep = np.asarray(visited_mask, bool) & np.isfinite(gap)
  counts, below, above = [], [], []
  quantiles = {f"p{round(100 * p)}": [] for p in GAP_QUANTILES}
  for h in range(gap.shape[1]):
    values = gap[:, h][keep[:, h]]
    counts.append(np.histogram(values, edges)[0].astype(int).tolist())
    below.append(int(np.sum(values < edges[0])))
    above.append(int(np.sum(values > edges[-1])))
    for p, key in zip(GAP_QUANTILES, quantiles):
      quantiles[key].append(float(np.quantile(values, p)) if values.size
                            else None)
  return GapHistogram(edges=edges.tolist(), counts=counts, below=below,
                      above=above, quantiles=quantiles)


def _prefix(inputs: AttentionInputs, length: int):
  """q, k, v, kv_lengths of the first `length` keys (and queries, for
  self-attention): the same model at a shorter context when causal."""
  q, k, v = inputs.q, inputs.k[:, :length], inputs.v[:, :length]
  if inputs.q.shape[1] == inputs.k.shape[1]:
    q = q[:, :length]
  kv_lengths = reference.kv_lengths_or_full(inputs.kv_lengths, q.shape[0],
                                            length)
  return q, k, v, kv_lengths


def _context_sweep(inputs: AttentionInputs, lengths, thresholds,
                   scale_factors, block_q, block_kv, bar) -> ContextSweep:
  settings = ([(f"λ={t:g}", lambda n, t=t: t) for t in thresholds]
              + [(f"c={c:g}", lambda n, c=c: config_lib.SkipSoftmaxConfig(
                  threshold_scale_factor=c).threshold_for(n))
                 for c in scale_factors])
  sparsity = [[] for _ in settings]
  for length in lengths:
    q, k, v, kv_lengths = _prefix(inputs, length)
    bq, bkv = config_lib.effective_block_sizes(q.shape[1], length, block_q,
                                               block_kv)
    gap, visited = _oracle_gaps(q, k, v, kv_lengths, causal=inputs.causal,
                                sm_scale=inputs.sm_scale, block_q=bq,
                                block_kv=bkv)
    result = reference.BlockwiseResult(
        out=None, lse=None, skip_mask=None, visited_mask=visited,
        block_gap=gap, stats=None)
    visited_per_head = np.maximum(np.asarray(visited).sum((0, 2, 3)), 1)
    for i, (_, threshold_at) in enumerate(settings):
      lam = threshold_at(kv_lengths)
      skipped = np.asarray(replay_skip_mask(result, lam)).sum((0, 2, 3))
      sparsity[i].append((skipped / visited_per_head).tolist())
    if bar is not None:
      bar.update()
  return ContextSweep(context_lengths=list(lengths),
                      labels=[label for label, _ in settings],
                      sparsity=sparsity)


def _check_context_options(context_lengths, context_thresholds,
                           context_scale_factors, kv_len):
  lengths = _check_context_lengths(context_lengths, kv_len)
  thresholds = (_check_thresholds(context_thresholds, "context_thresholds")
                if len(context_thresholds) else [])
  for c in context_scale_factors:
    if not isinstance(c, (int, float)) or c < 0:
      raise ValueError("`context_scale_factors` must be non-negative numbers "
                       f"c (λ = c / context length), got {c!r}.")
  if lengths and not thresholds and not len(context_scale_factors):
    raise ValueError("With `context_lengths`, give `context_thresholds` "
                     "and/or `context_scale_factors` to measure at.")
  return lengths, thresholds


def analyze_inputs(inputs: AttentionInputs, *, thresholds,
                   name: str = "attention", block_q: int | None = None,
                   block_kv: int | None = None, context_lengths=(),
                   context_thresholds=(), context_scale_factors=(),
                   heatmap_threshold: float | None = None,
                   gap_edges=DEFAULT_GAP_EDGES, progress: bool = False,
                   progress_bar: ProgressBar | None = None) -> LayerReport:
  """`analyze_attention` for captured `AttentionInputs`.

  `block_q`/`block_kv` override the layer's own tile sizes (its
  `inputs.block_q`/`block_kv`, else the library defaults); `progress_bar`
  is a bar shared with the caller (`analyze_model`), advanced once per λ
  and per context length. Other arguments as `analyze_attention`.

  Returns:
    A `LayerReport`.

  Raises:
    ValueError: on bad q/k/v shapes, `kv_lengths` or `sm_scale` (as
      `blasst_jax.attention`), λ outside [0, 1), or context lengths outside
      [1, kv_len].
  """
  check_inputs(inputs)
  thresholds = _check_thresholds(thresholds)
  q, k, v = inputs.q, inputs.k, inputs.v
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  lengths, context_lams = _check_context_options(
      context_lengths, context_thresholds, context_scale_factors, lk)
  if heatmap_threshold is not None:
    _check_thresholds([heatmap_threshold], "heatmap_threshold")
  block_q = inputs.block_q if block_q is None else block_q
  block_kv = inputs.block_kv if block_kv is None else block_kv
  bq, bkv = config_lib.effective_block_sizes(lq, lk, block_q, block_kv)
  kv_lengths = reference.kv_lengths_or_full(inputs.kv_lengths, b, lk)
  mask_options = dict(causal=inputs.causal, sm_scale=inputs.sm_scale)

  bar = progress_bar
  if bar is None and progress:
    bar = ProgressBar(len(thresholds) + len(lengths), desc=name)
  dense = reference.dense_attention(q, k, v, kv_lengths=kv_lengths,
                                    **mask_options)
  block_mass = block_probability_mass(q, k, block_kv=bkv,
                                      kv_lengths=kv_lengths, **mask_options)
  points = []
  for threshold in thresholds:
    points.append(jax.device_get(_sweep_point(
        q, k, v, kv_lengths, dense, block_mass, jnp.float32(threshold),
        block_q=bq, block_kv=bkv, **mask_options)))
    if bar is not None:
      bar.update()
  gap, visited = _oracle_gaps(q, k, v, kv_lengths, block_q=bq, block_kv=bkv,
                              **mask_options)

  block_map = None
  if heatmap_threshold is not None:
    result = reference.BlockwiseResult(
        out=None, lse=None, skip_mask=None, visited_mask=visited,
        block_gap=gap, stats=None)
    skip = replay_skip_mask(result, heatmap_threshold)
    block_map = _to_list(
        (np.asarray(visited[0]).astype(int) * COMPUTED
         + np.asarray(skip[0]).astype(int) * (SKIPPED - COMPUTED)), int)
  context = None
  if lengths:
    context = _context_sweep(inputs, lengths, context_lams,
                             list(context_scale_factors), block_q, block_kv,
                             bar)
  if bar is not None and progress_bar is None:
    bar.close()

  stack = lambda key: np.stack([p[key] for p in points])  # [n_thr, ...]  # pylint: disable=g-long-lambda
  err_sq, ref_sq = stack("err_sq"), stack("ref_sq")
  per_tile = stack("skipped_per_tile") / np.maximum(
      stack("visited_per_tile"), 1)
  return LayerReport(
      name=name,
      shape=dict(batch=b, q_len=lq, kv_len=lk, q_heads=hq, kv_heads=hkv,
                 head_dim=d),
      causal=bool(inputs.causal), block_q=bq, block_kv=bkv,
      thresholds=thresholds,
      skipped_blocks=_to_list(stack("skipped"), int),
      visited_blocks=_to_list(np.asarray(visited).sum((0, 2, 3)), int),
      sparsity_by_q_tile=_to_list(per_tile),
      dropped_mass_mean=_to_list(stack("mass_mean")),
      dropped_mass_max=_to_list(stack("mass_max")),
      max_abs_error=_to_list(stack("max_abs")),
      rel_l2_error=_to_list(np.sqrt(err_sq / np.maximum(ref_sq, 1e-30))),
      layer_rel_l2_error=_to_list(np.sqrt(
          err_sq.sum(-1) / np.maximum(ref_sq.sum(-1), 1e-30))),
      gap_histogram=gap_histogram(gap, visited, gap_edges),
      block_map_threshold=heatmap_threshold, block_map=block_map,
      context=context)


def analyze_attention(q, k, v, *, thresholds, causal: bool = False,
                      sm_scale: float | None = None, kv_lengths=None,
                      **options) -> LayerReport:
  """Sparsity, dropped mass, error and block gaps of one attention call.

  Every statistic comes from `reference.blockwise_attention` at each λ
  (one compile per shape: λ is traced) and from dense attention.

  Args:
    q: [batch, q_len, q_heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim].
    thresholds: the λ sweep, each in [0, 1).
    causal, sm_scale, kv_lengths: as `blasst_jax.attention`.
    **options: `name`, `block_q`, `block_kv` (tiling of the analysed
      kernel), `context_lengths` (prefix lengths for the sparsity-vs-context
      sweep; queries are cut too for self-attention), `context_thresholds`
      (fixed λ) and `context_scale_factors` (λ = c / length) measured there,
      `heatmap_threshold` (λ of the block map), `gap_edges`, `progress`.

  Returns:
    A `LayerReport`. Memory: the dense probabilities,
    batch * q_heads * q_len * kv_len floats.

  Raises:
    ValueError: on bad shapes, dtypes, `kv_lengths` or `sm_scale` (as
      `blasst_jax.attention`), λ outside [0, 1), or bad block sizes or
      context lengths.
  """
  inputs = AttentionInputs(q=q, k=k, v=v, causal=causal, kv_lengths=kv_lengths,
                           sm_scale=sm_scale)
  return analyze_inputs(inputs, thresholds=thresholds, **options)


def analyze_model(model, *model_args, thresholds, model_kwargs=None,
                  progress: bool = False, **options) -> ModelReport:
  """`analyze_attention` for every attention layer of one model run.

  Args:
    model, *model_args, model_kwargs: as `capture_attention_inputs`.
    thresholds: the λ sweep.
    progress: draw a progress bar (stderr).
    **options: as `analyze_attention`; `block_q`/`block_kv` default to each
      layer's own.

  Returns:
    A `ModelReport`, layers in call order.

  Raises:
    ValueError: as `capture_attention_inputs` and `analyze_attention`.
  """
  thresholds = _check_thresholds(thresholds)
  captured = capture_attention_inputs(model, *model_args,
                                      **(model_kwargs or {}))
  n_lengths = len(set(options.get("context_lengths", ())))
  with ProgressBar(len(captured) * (len(thresholds) + n_lengths),
                   desc="analysis", enabled=progress) as bar:
    layers = [analyze_inputs(inputs, thresholds=thresholds, name=name,
                             progress_bar=bar, **options)
              for name, inputs in captured.items()]
  return ModelReport(layers=layers)
