"""Calibration: the threshold scale factor that gives a wanted sparsity.

With `SkipSoftmaxConfig(threshold_scale_factor=c)`, λ = c / kv_len. How much
a given c skips depends on the model, so, as TensorRT-LLM does, we sweep c on
calibration inputs, measure the block sparsity, and fit per phase

    c = a · exp(b · sparsity)

which maps a `target_sparsity` to a scale factor. The fit is made on the
sweep points near the target (`fit_window`), where it matters.

    cal = calibration.calibrate(prefill_inputs=train, decode_inputs=train_dec,
                                target_sparsity=0.3)
    out = bj.attention(q, k, v, threshold=cal.config, causal=True)
    calibration.check_calibration(cal.config, target_sparsity=0.3,
                                  prefill_inputs=held_out)   # ±3 points?

Inputs are `analysis.AttentionInputs` (prefill; e.g. from
`analysis.capture_attention_inputs`) and `DecodeInputs` (one token per
sequence against a cache; `decode_inputs_from_prefill` replays the decode
steps of a causal prefill). Sparsity is pooled: skipped / visited blocks over
all inputs, heads and tiles. The sweep replays the skip rule from one oracle
run per input (`analysis.replay_skip_mask`: exact); the held-out check runs
the oracle with the calibrated config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import analysis
from blasst_jax import config as config_lib
from blasst_jax import decode as decode_lib
from blasst_jax import reference
from blasst_jax import validation
from blasst_jax.config import SkipSoftmaxConfig
from blasst_jax._progress import ProgressBar

PHASES = ("prefill", "decode")
# Scale factors swept by default: λ = c / kv_len from 1e-8 (c = 1e-4 at 10k
# tokens) up to the clip at `config.MAX_DERIVED_THRESHOLD`.
DEFAULT_SCALE_FACTORS = tuple(float(c) for c in np.geomspace(1e-4, 1e4, 65))
# Half-width (in sparsity) of the sweep range the exponential is fitted on:
# narrow, since measured curves bend (1.0 fits the whole sweep).
DEFAULT_FIT_WINDOW = 0.05
DEFAULT_TOLERANCE = 0.03


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """Decode steps: one query token per sequence against a KV cache.

  Attributes:
    q: [batch, q_heads, head_dim].
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim].
    kv_lengths: int [batch], valid cache entries per sequence.
    sm_scale: None for 1/sqrt(head_dim).
  """

  q: jax.Array
  k_cache: jax.Array
  v_cache: jax.Array
  kv_lengths: jax.Array
  sm_scale: float | None = None


def decode_inputs_from_prefill(inputs: analysis.AttentionInputs,
                               cache_lengths: Sequence[int]) -> DecodeInputs:
  """The decode steps of a causal self-attention prefill.

  In a causal model the step that brings the cache to `t` tokens attends
  with the query of position t - 1 to the keys of positions < t: exactly
  `q[:, t-1]` against `k[:, :t]` of the prefill.

  Args:
    inputs: causal self-attention, q/k/v [batch, seq_len, heads, head_dim].
    cache_lengths: cache lengths t in [1, seq_len] to replay.

  Returns:
    `DecodeInputs` with batch * len(cache_lengths) sequences (all of the
    batch at the first length, then the second, ...). Memory: the cache
    holds len(cache_lengths) copies of k and v.
  """
  q, k, v = inputs.q, inputs.k, inputs.v
  if not inputs.causal or q.shape[1] != k.shape[1]:
    raise ValueError("decode_inputs_from_prefill needs causal self-attention "
                     "inputs (causal=True, q_len == kv_len), got causal="
                     f"{inputs.causal}, q {q.shape}, k {k.shape}.")
  if inputs.kv_lengths is not None:
    raise ValueError("decode_inputs_from_prefill needs unpadded inputs "
                     "(kv_lengths=None).")
  seq_len = q.shape[1]
  lengths = [int(t) for t in cache_lengths]
  if not lengths or any(t < 1 or t > seq_len for t in lengths):
    raise ValueError(f"`cache_lengths` must be non-empty, each in [1, "
                     f"seq_len={seq_len}], got {list(cache_lengths)}.")
  n = len(lengths)
  step_q = jnp.concatenate([q[:, t - 1] for t in lengths])  # [n*b, hq, d]
  tile = lambda x: jnp.concatenate([x] * n)                 # [n*b, L, hkv, d]  # pylint: disable=g-long-lambda
  kv_lengths = jnp.repeat(jnp.asarray(lengths, jnp.int32), q.shape[0])
  return DecodeInputs(q=step_q, k_cache=tile(k), v_cache=tile(v),
                      kv_lengths=kv_lengths, sm_scale=inputs.sm_scale)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """The decode kernel settings calibration must share with deployment.

  Attributes:
    block_kv: keys per block (decode's skip granularity).
    num_splits: split-K factor; None: `decode.default_num_splits` of each
      input's shape and the default implementation on this backend, as
      `decode_attention` picks it.
    max_mode: "split", "anchored" or "global" (`decode_attention`).

  Raises:
    ValueError: for an unknown `max_mode`, a `block_kv` that is not a power
      of two >= 16, or a `num_splits` that is not a positive int.
  """

  block_kv: int = decode_lib.DEFAULT_BLOCK_KV
  num_splits: int | None = None
  max_mode: str = decode_lib.DEFAULT_MAX_MODE

  def __post_init__(self):
    if self.max_mode not in decode_lib.MAX_MODES:
      raise ValueError(f"`max_mode` must be one of {decode_lib.MAX_MODES}, "
                       f"got {self.max_mode!r}.")
    if (not isinstance(self.block_kv, int) or self.block_kv < 16
        or self.block_kv & (self.block_kv - 1)):
      raise ValueError(f"`block_kv` must be a power of two >= 16, got "
                       f"{self.block_kv!r}.")
    if self.num_splits is not None and (not isinstance(self.num_splits, int)
                                        or self.num_splits < 1):
      raise ValueError(f"`num_splits` must be a positive int or None, got "
                       f"{self.num_splits!r}.")

  def splits_for(self, inputs: DecodeInputs) -> int:
    """The split-K factor used for `inputs` (an int >= 1)."""
    if self.num_splits is not None:
      return self.num_splits
    b, max_len, hkv, d = inputs.k_cache.shape
    implementation = decode_lib.default_implementation(
        dtype=inputs.q.dtype, head_dim=d, group=inputs.q.shape[-2] // hkv,
        block_kv=self.block_kv, pages_per_seq=-(-max_len // self.block_kv),
        cache_dtype=inputs.k_cache.dtype, max_mode=self.max_mode)
    return decode_lib.default_num_splits(b, hkv, max_len, self.block_kv,
                                         implementation=implementation)


# ----------------------------------------------------------------------------
# Oracle runs.


@functools.partial(jax.jit, static_argnames=(
    "block_kv", "num_splits", "max_mode", "sm_scale"))
def _decode_oracle_jit(q, k_cache, v_cache, kv_lengths, threshold, *,
                       block_kv, num_splits, max_mode, sm_scale):
  return reference.blockwise_decode_attention(
      q, k_cache, v_cache, kv_lengths, block_kv=block_kv,
      threshold=threshold, num_splits=num_splits, max_mode=max_mode,
      sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=(
    "causal", "sm_scale", "block_q", "block_kv"))
def _prefill_oracle_jit(q, k, v, kv_lengths, threshold, *, causal, sm_scale,
                        block_q, block_kv):
  return reference.blockwise_attention(
      q, k, v, threshold=threshold, causal=causal, sm_scale=sm_scale,
      kv_lengths=kv_lengths, block_q=block_q, block_kv=block_kv)


def _per_sequence_threshold(threshold, inputs, phase: str) -> jax.Array:
  """f32 [batch]: λ as the oracle resolves it (a config's scale factor for
  `phase` over each sequence's length), passed traced so that one compile
  per shape serves every λ."""
  lengths = _kv_lengths(inputs)
  kv_len = (inputs.k_cache if phase == "decode" else inputs.k).shape[1]
  return config_lib.resolve_threshold(threshold, lengths, kv_len,
                                      lengths.shape[0], phase)


def _decode_oracle(inputs: DecodeInputs, threshold, options: DecodeOptions):
  """`reference.blockwise_decode_attention`; `threshold` a float or a
  `SkipSoftmaxConfig` (its "decode" scale factor)."""
  return _decode_oracle_jit(
      inputs.q, inputs.k_cache, inputs.v_cache, _kv_lengths(inputs),
      _per_sequence_threshold(threshold, inputs, "decode"),
      block_kv=options.block_kv, num_splits=options.splits_for(inputs),
      max_mode=options.max_mode, sm_scale=inputs.sm_scale)


def _prefill_oracle(inputs: analysis.AttentionInputs, threshold, block_q,
                    block_kv):
  """`reference.blockwise_attention` with the input's mask and tiling
  (`block_q`/`block_kv` override the tiling); `threshold` a float or a
  `SkipSoftmaxConfig` (its "prefill" scale factor)."""
  return _prefill_oracle_jit(
      inputs.q, inputs.k, inputs.v, inputs.kv_lengths,
      _per_sequence_threshold(threshold, inputs, "prefill"),
      causal=inputs.causal, sm_scale=inputs.sm_scale,
      block_q=inputs.block_q if block_q is None else block_q,
      block_kv=inputs.block_kv if block_kv is None else block_kv)


def _kv_lengths(inputs) -> jax.Array:
  """int [batch]: the context length λ = c / kv_len is computed from."""
  if isinstance(inputs, DecodeInputs):
    return jnp.asarray(inputs.kv_lengths, jnp.int32)
  return reference.kv_lengths_or_full(inputs.kv_lengths, inputs.q.shape[0],
                                      inputs.k.shape[1])


def _check_phase_inputs(phase: str, inputs) -> list:
  if phase not in PHASES:
    raise ValueError(f"`phase` must be one of {PHASES}, got {phase!r}.")
  expected = DecodeInputs if phase == "decode" else analysis.AttentionInputs
  inputs = [inputs] if isinstance(inputs, expected) else list(inputs)
  if not inputs or not all(isinstance(x, expected) for x in inputs):
    raise ValueError(
        f"{phase} inputs must be a non-empty list of {expected.__name__} "
        "(analysis.capture_attention_inputs(...).values() for prefill, "
        "decode_inputs_from_prefill(...) for decode).")
  for x in inputs:
    if phase == "prefill":
      analysis.check_inputs(x)
    else:
      validation.check_decode_inputs(x.q, x.k_cache, x.v_cache,
                                     x.kv_lengths, cache_name="cache")
  return inputs


def _check_scale_factors(scale_factors) -> list[float]:
  values = [float(c) for c in scale_factors]
  if len(values) < 2 or any(not math.isfinite(c) or c <= 0 for c in values):
    raise ValueError(f"`scale_factors` must hold >= 2 positive numbers, got "
                     f"{list(scale_factors)}.")
  return sorted(set(values))


# ----------------------------------------------------------------------------
# Sweep and fit.


@dataclasses.dataclass
class ScaleFactorSweep:
  """Measured block sparsity against the scale factor c, one phase.

  Attributes:
    phase: "prefill" or "decode".
    scale_factors: [n], increasing.
    sparsity: [n], skipped / visited blocks pooled over the inputs.
    skipped_blocks: [n]; visited_blocks: the pooled denominator.
  """

  phase: str
  scale_factors: list[float]
  sparsity: list[float]
  skipped_blocks: list[int]
  visited_blocks: int


def sweep_scale_factors(inputs, scale_factors=DEFAULT_SCALE_FACTORS, *,
                        phase: str = "prefill", block_q: int | None = None,
                        block_kv: int | None = None,
                        decode_options: DecodeOptions = DecodeOptions(),
                        progress: bool = False) -> ScaleFactorSweep:
  """Pooled block sparsity at each scale factor c (λ = c / kv_len).

  One oracle run per input gives the block gaps; the decisions at every c
  are replayed from them (`analysis.replay_skip_mask`, exact).

  Args:
    inputs: a list of `analysis.AttentionInputs` (prefill) or
      `DecodeInputs` (decode).
    scale_factors: positive c values.
    phase: "prefill" or "decode": which scale factor of a
      `SkipSoftmaxConfig` is swept.
    block_q, block_kv: prefill tiling (default: each input's own).
    decode_options: decode tiling and split settings.
    progress: draw a progress bar (stderr).

  Returns:
    A `ScaleFactorSweep` over the sorted, de-duplicated `scale_factors`.

  Raises:
    ValueError: for an unknown `phase`, inputs that are not a non-empty
      list of the phase's input type or have bad shapes, or fewer than two
      positive scale factors.
  """
  inputs = _check_phase_inputs(phase, inputs)
  scale_factors = _check_scale_factors(scale_factors)
  skipped = np.zeros(len(scale_factors), np.int64)
  visited = 0
  with ProgressBar(len(inputs), desc=f"{phase} sweep",
                   enabled=progress) as bar:
    for x in inputs:
      result = (_decode_oracle(x, 0.0, decode_options) if phase == "decode"
                else _prefill_oracle(x, 0.0, block_q, block_kv))
      lengths = _kv_lengths(x)
      visited += int(jnp.sum(result.visited_mask))
      for i, c in enumerate(scale_factors):
        lam = SkipSoftmaxConfig(threshold_scale_factor={phase: c}
                                ).threshold_for(lengths, phase)
        skipped[i] += int(jnp.sum(analysis.replay_skip_mask(result, lam)))
      bar.update()
  return ScaleFactorSweep(
      phase=phase, scale_factors=scale_factors,
      sparsity=(skipped / max(visited, 1)).tolist(),
      skipped_blocks=skipped.tolist(), visited_blocks=visited)


@dataclasses.dataclass(frozen=True)
class ExponentialFit:
  """`c = a · exp(b · sparsity)`, least squares on log c.

  Attributes:
    a, b: the fit.
    sparsity_min, sparsity_max: the range of the points it was fitted on.
    num_points: how many.
    rms_log_error: root mean square of log c - log fit over those points.
  """

  a: float
  b: float
  sparsity_min: float
  sparsity_max: float
  num_points: int
  rms_log_error: float

  def scale_factor(self, sparsity: float) -> float:
    """The c expected to give `sparsity`."""
    return float(self.a * math.exp(self.b * sparsity))

  def sparsity(self, scale_factor: float) -> float:
    """The sparsity expected at c (the inverse)."""
    return float(math.log(scale_factor / self.a) / self.b)


def fit_exponential(sparsity, scale_factors, *,
                    sparsity_range: tuple[float, float] = (0.0, 1.0)
                    ) -> ExponentialFit:
  """Fits `c = a · exp(b · s)` to measured (s, c) pairs.

  Points with s outside `sparsity_range` (inclusive) are left out, as are
  the flat ends of a sweep: runs of equal sparsity at its start (nothing
  skipped yet) and end (λ clipped), which carry no information on c.

  Args:
    sparsity: [n] measured sparsities in [0, 1].
    scale_factors: [n] the positive c that gave them.
    sparsity_range: (low, high): the sparsities fitted on.

  Returns:
    An `ExponentialFit`.

  Raises:
    ValueError: for inputs that are not 1-D of one length, a c <= 0, or
      fewer than two distinct sparsities left to fit.
  """
  s = np.asarray(sparsity, np.float64)
  c = np.asarray(scale_factors, np.float64)
  if s.shape != c.shape or s.ndim != 1:
    raise ValueError(f"`sparsity` and `scale_factors` must be 1-D of one "
                     f"length, got {s.shape} and {c.shape}.")
  if np.any(c <= 0):
    raise ValueError("`scale_factors` must be positive.")
  keep = (s >= sparsity_range[0]) & (s <= sparsity_range[1])
  # Keep only the last point of a flat start and the first of a flat end.
  keep &= ~((s == s.min()) & (np.arange(s.size) < np.flatnonzero(
      s == s.min()).max()))
  keep &= ~((s == s.max()) & (np.arange(s.size) > np.flatnonzero(
      s == s.max()).min()))
  if np.unique(s[keep]).size < 2:
    raise ValueError(
        f"Need at least two distinct sparsities in {sparsity_range} to fit, "
        f"got {np.unique(s[keep]).tolist()}: widen the sweep's scale "
        "factors or the fit range.")
  b, log_a = np.polyfit(s[keep], np.log(c[keep]), 1)
  residual = np.log(c[keep]) - (log_a + b * s[keep])
  return ExponentialFit(
      a=float(np.exp(log_a)), b=float(b), sparsity_min=float(s[keep].min()),
      sparsity_max=float(s[keep].max()), num_points=int(keep.sum()),
      rms_log_error=float(np.sqrt(np.mean(residual ** 2))))


def _fit_near(sweep: ScaleFactorSweep, target: float,
              fit_window: float) -> ExponentialFit:
  """The fit over the sweep points within `fit_window` of the target,
  widened until it holds two distinct sparsities."""
  s = np.asarray(sweep.sparsity)
  if not s.min() <= target <= s.max():
    raise ValueError(
        f"{sweep.phase} target_sparsity {target} lies outside the swept "
        f"range [{s.min():.3f}, {s.max():.3f}] (c from "
        f"{sweep.scale_factors[0]:g} to {sweep.scale_factors[-1]:g}): widen "
        "`scale_factors` or choose a reachable target.")
  window = fit_window
  while True:
    try:
      return fit_exponential(s, sweep.scale_factors,
                             sparsity_range=(target - window,
                                             target + window))
    except ValueError:
      if window >= 1.0:
        raise
      window *= 2


# ----------------------------------------------------------------------------
# Calibration.


def _targets(target_sparsity, phases) -> dict[str, float]:
  if isinstance(target_sparsity, Mapping):
    unknown = set(target_sparsity) - set(PHASES)
    if unknown:
      raise ValueError(f"`target_sparsity` keys must be in {PHASES}, got "
                       f"{sorted(unknown)}.")
    targets = {p: target_sparsity[p] for p in phases if p in target_sparsity}
    missing = set(phases) - set(targets)
    if missing:
      raise ValueError(f"`target_sparsity` has no value for "
                       f"{sorted(missing)}, which have inputs.")
  else:
    targets = {p: target_sparsity for p in phases}
  for phase, t in targets.items():
    if not isinstance(t, (int, float)) or not 0 < t < 1:
      raise ValueError(f"`target_sparsity` for {phase} must lie in (0, 1), "
                       f"got {t!r}.")
  return {p: float(t) for p, t in targets.items()}


@dataclasses.dataclass
class Calibration:
  """Scale factors fitted per phase for a target sparsity.

  Attributes:
    targets: {phase: target sparsity}.
    sweeps: {phase: `ScaleFactorSweep`}.
    fits: {phase: `ExponentialFit`}.
    scale_factors: {phase: calibrated c}.
  """

  targets: dict[str, float]
  sweeps: dict[str, ScaleFactorSweep]
  fits: dict[str, ExponentialFit]
  scale_factors: dict[str, float]

  @property
  def config(self) -> SkipSoftmaxConfig:
    """`SkipSoftmaxConfig(threshold_scale_factor={phase: c, ...})`."""
    return SkipSoftmaxConfig(threshold_scale_factor=dict(self.scale_factors))

  def to_dict(self) -> dict[str, Any]:
    """Nested dicts, lists and numbers for JSON."""
    return analysis.json_safe(dataclasses.asdict(self))


def calibrate(*, target_sparsity, prefill_inputs=None, decode_inputs=None,
              scale_factors=DEFAULT_SCALE_FACTORS,
              fit_window: float = DEFAULT_FIT_WINDOW,
              block_q: int | None = None, block_kv: int | None = None,
              decode_options: DecodeOptions = DecodeOptions(),
              progress: bool = False) -> Calibration:
  """Sweeps c per phase, fits `c = a · exp(b · s)`, picks c for the target.

  Args:
    target_sparsity: wanted block sparsity in (0, 1), one for all phases or
      {"prefill": s_p, "decode": s_d}.
    prefill_inputs: list of `analysis.AttentionInputs` (or None).
    decode_inputs: list of `DecodeInputs` (or None). At least one phase.
    scale_factors: the swept c values.
    fit_window: fit on sweep points with |s - target| <= fit_window
      (widened when too few).
    block_q, block_kv: prefill tiling (default: each input's own); use the
      deployed kernel's.
    decode_options: decode tiling and split settings; use the deployed
      ones.
    progress: draw progress bars.

  Returns:
    A `Calibration`; `.config` is the `SkipSoftmaxConfig` to use.

  Raises:
    ValueError: when neither phase has inputs, a target lies outside
      (0, 1) or names an unknown phase, `fit_window` is outside (0, 1], a
      target lies outside the sparsity range the sweep reached, or as
      `sweep_scale_factors` and `fit_exponential`.
  """
  phase_inputs = {"prefill": prefill_inputs, "decode": decode_inputs}
  phase_inputs = {p: x for p, x in phase_inputs.items() if x is not None}
  if not phase_inputs:
    raise ValueError("Give `prefill_inputs` and/or `decode_inputs`.")
  targets = _targets(target_sparsity, phase_inputs)
  if not 0 < fit_window <= 1:
    raise ValueError(f"`fit_window` must lie in (0, 1], got {fit_window}.")
  sweeps, fits, chosen = {}, {}, {}
  for phase, inputs in phase_inputs.items():
    sweeps[phase] = sweep_scale_factors(
        inputs, scale_factors, phase=phase, block_q=block_q,
        block_kv=block_kv, decode_options=decode_options, progress=progress)
    fits[phase] = _fit_near(sweeps[phase], targets[phase], fit_window)
    chosen[phase] = fits[phase].scale_factor(targets[phase])
  return Calibration(targets=targets, sweeps=sweeps, fits=fits,
                     scale_factors=chosen)


@dataclasses.dataclass(frozen=True)
class HeldOutCheck:
  """Achieved against target sparsity on inputs the fit has not seen.

  Attributes:
    phase: "prefill" or "decode".
    scale_factor: the c checked.
    target, achieved: block sparsities in [0, 1].
    tolerance: allowed |achieved - target|.
  """

  phase: str
  scale_factor: float
  target: float
  achieved: float
  tolerance: float

  @property
  def error(self) -> float:
    """achieved - target."""
    return self.achieved - self.target

  @property
  def within_tolerance(self) -> bool:
    """|achieved - target| <= tolerance."""
    return abs(self.error) <= self.tolerance

  def to_dict(self) -> dict[str, Any]:
    """The fields plus `error` and `within_tolerance`, JSON-ready."""
    return dict(dataclasses.asdict(self), error=self.error,
                within_tolerance=self.within_tolerance)


def achieved_sparsity(config: SkipSoftmaxConfig, inputs, *,
                      phase: str = "prefill", block_q: int | None = None,
                      block_kv: int | None = None,
                      decode_options: DecodeOptions = DecodeOptions()
                      ) -> float:
  """Pooled block sparsity of the oracle run with `config` on `inputs`.

  Args:
    config: the `SkipSoftmaxConfig` (or λ) to run with.
    inputs: as `sweep_scale_factors`.
    phase, block_q, block_kv, decode_options: as `sweep_scale_factors`.

  Returns:
    skipped / visited blocks over all inputs, a float in [0, 1].

  Raises:
    ValueError: as `sweep_scale_factors` for bad inputs or phase.
  """
  inputs = _check_phase_inputs(phase, inputs)
  skipped = visited = 0
  for x in inputs:
    result = (_decode_oracle(x, config, decode_options) if phase == "decode"
              else _prefill_oracle(x, config, block_q, block_kv))
    skipped += int(jnp.sum(result.skip_mask))
    visited += int(jnp.sum(result.visited_mask))
  return skipped / max(visited, 1)


def check_calibration(config: SkipSoftmaxConfig, *, target_sparsity,
                      prefill_inputs=None, decode_inputs=None,
                      tolerance: float = DEFAULT_TOLERANCE,
                      block_q: int | None = None, block_kv: int | None = None,
                      decode_options: DecodeOptions = DecodeOptions()
                      ) -> dict[str, HeldOutCheck]:
  """Runs the oracle with `config` on held-out inputs, per phase.

  Args:
    config: e.g. `Calibration.config`.
    target_sparsity: as `calibrate`.
    prefill_inputs, decode_inputs: held-out inputs (at least one phase).
    tolerance: allowed |achieved - target| (0.03: ±3 points).
    block_q, block_kv, decode_options: as `calibrate`.

  Returns:
    {phase: `HeldOutCheck`}.

  Raises:
    ValueError: if `config` is not a `SkipSoftmaxConfig`, neither phase has
      inputs, or a target is invalid (as `calibrate`).
  """
  if not isinstance(config, SkipSoftmaxConfig):
    raise ValueError(f"`config` must be a SkipSoftmaxConfig, got "
                     f"{type(config).__name__}.")
  phase_inputs = {"prefill": prefill_inputs, "decode": decode_inputs}
  phase_inputs = {p: x for p, x in phase_inputs.items() if x is not None}
  if not phase_inputs:
    raise ValueError("Give `prefill_inputs` and/or `decode_inputs`.")
  targets = _targets(target_sparsity, phase_inputs)
  checks = {}
  for phase, inputs in phase_inputs.items():
    achieved = achieved_sparsity(config, inputs, phase=phase, block_q=block_q,
                                 block_kv=block_kv,
                                 decode_options=decode_options)
    checks[phase] = HeldOutCheck(
        phase=phase, scale_factor=config.scale_factors[phase] or 0.0,
        target=targets[phase], achieved=achieved, tolerance=tolerance)
  return checks
