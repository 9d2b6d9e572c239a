"""Calibration: the exponential fit, recovery of a planted sparsity curve
and held-out accuracy on it, decode replay and input validation. (Held-out
accuracy on a Flax model: tests/test_experiments.py, calibrate.py.)"""

import json
import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
from blasst_jax import analysis
from blasst_jax import calibration
from blasst_jax import testing
from blasst_jax.testing import key_for


@hypothesis.given(log_a=st.floats(-8.0, 8.0), b=st.floats(2.0, 60.0),
                  s_lo=st.floats(0.0, 0.4), span=st.floats(0.1, 0.5),
                  flat=st.integers(0, 4))
def test_fit_exponential_recovers_a_known_curve(log_a, b, s_lo, span, flat):
  s = np.linspace(s_lo, s_lo + span, 12)
  c = np.exp(log_a + b * s)
  # Saturated ends (nothing skipped yet / λ clipped) must not bend the fit.
  s = np.concatenate([np.full(flat, s[0]), s, np.full(flat, s[-1])])
  c = np.concatenate([c[0] * np.geomspace(1e-3, 0.5, flat) if flat else [],
                      c, c[-1] * np.geomspace(2, 1e3, flat) if flat else []])
  fit = calibration.fit_exponential(s, c)
  assert fit.b == pytest.approx(b, rel=1e-6)
  assert math.log(fit.a) == pytest.approx(log_a, abs=1e-5)
  assert fit.num_points == 12 and fit.rms_log_error < 1e-6
  target = s_lo + span / 3
  assert fit.sparsity(fit.scale_factor(target)) == pytest.approx(target)


# ----------------------------------------------------------------------------
# A planted curve: every KV block's gap is set by hand.
#
# One q tile of identical rows (q = e0, sm_scale = 1) and 64 blocks of 16
# keys: block 0 scores 0 (the running max), block j > 0 scores g_j, spread
# evenly over [G0, G0 + WIDTH] < 0 and shuffled. Block j is skipped when
# g_j < log(c / kv_len), so the sparsity s(c) = #{g_j < log c - log L} / 64
# is linear in log c: log c = log L + G0 + WIDTH · 64/63 · s, i.e.
# c = a·exp(b·s) with a = L·e^G0, b = WIDTH · 64/63.
N_BLOCKS, BLOCK, G0, WIDTH = 64, 16, -14.0, 12.0
KV_LEN = N_BLOCKS * BLOCK


def planted_keys(key, batch: int) -> jax.Array:
  """k [batch, KV_LEN, 1, 16] with the planted block scores (+ jitter)."""
  k_perm, k_jitter = jax.random.split(key)
  levels = G0 + WIDTH * (np.arange(1, N_BLOCKS) - 0.5) / (N_BLOCKS - 1)
  gaps = jax.vmap(lambda k_: jax.random.permutation(k_, levels))(
      jax.random.split(k_perm, batch))                     # [b, 63]
  scores = jnp.concatenate([jnp.zeros((batch, 1)), gaps], axis=1)
  # Keys of a block sit at or below its level: the block max is the level.
  jitter = -0.3 * jax.random.uniform(k_jitter, (batch, KV_LEN))
  jitter = jitter.at[:, ::BLOCK].set(0.0)
  per_key = jnp.repeat(scores, BLOCK, axis=1) + jitter     # [b, KV_LEN]
  return per_key[:, :, None, None] * jnp.eye(BLOCK)[0]


def planted_inputs(key, batch: int = 3):
  """Prefill and decode inputs with the planted curve."""
  k = planted_keys(key, batch)
  v = jax.random.normal(key, k.shape)
  q = jnp.broadcast_to(jnp.eye(BLOCK)[0], (batch, BLOCK, 1, BLOCK))
  prefill = analysis.AttentionInputs(q=q, k=k, v=v, sm_scale=1.0,
                                     block_q=BLOCK, block_kv=BLOCK)
  decode = calibration.DecodeInputs(
      q=q[:, 0], k_cache=k, v_cache=v,
      kv_lengths=jnp.full((batch,), KV_LEN, jnp.int32), sm_scale=1.0)
  return prefill, decode


# Anchored max over the first block (score 0) is the true max: every block
# is compared with 0, as in prefill.
PLANTED_DECODE = calibration.DecodeOptions(block_kv=BLOCK, num_splits=2,
                                           max_mode="anchored")


def test_calibration_recovers_the_planted_curve():
  prefill, decode = planted_inputs(key_for("planted", "train"))
  cal = calibration.calibrate(
      target_sparsity={"prefill": 0.3, "decode": 0.5},
      prefill_inputs=[prefill], decode_inputs=[decode], fit_window=1.0,
      decode_options=PLANTED_DECODE)
  for phase in calibration.PHASES:
    fit = cal.fits[phase]
    assert fit.b == pytest.approx(WIDTH * N_BLOCKS / (N_BLOCKS - 1), rel=0.03)
    assert math.log(fit.a) == pytest.approx(math.log(KV_LEN) + G0, abs=0.15)
    assert cal.sweeps[phase].visited_blocks == 3 * N_BLOCKS
  # Held out: other shuffles and jitter of the same levels.
  prefill_2, decode_2 = planted_inputs(key_for("planted", "held-out"))
  checks = calibration.check_calibration(
      cal.config, target_sparsity={"prefill": 0.3, "decode": 0.5},
      prefill_inputs=[prefill_2], decode_inputs=[decode_2],
      decode_options=PLANTED_DECODE)
  for phase, check in checks.items():
    assert check.within_tolerance, check
    # One block of 64 is the resolution of the curve.
    assert abs(check.error) <= 1.5 / N_BLOCKS, check
  assert cal.config.scale_factors == cal.scale_factors
  # Results serialize to JSON.
  data = json.loads(json.dumps(dict(cal.to_dict(), checks={
      p: c.to_dict() for p, c in checks.items()})))
  assert data["scale_factors"] == cal.scale_factors
  assert data["checks"]["decode"]["within_tolerance"]


def test_sweep_is_the_oracle_at_every_scale_factor():
  prefill, decode = planted_inputs(key_for("planted", "sweep"), batch=2)
  scale_factors = [0.05, 0.4, 3.0]
  for phase, inputs in (("prefill", prefill), ("decode", decode)):
    sweep = calibration.sweep_scale_factors(
        [inputs], scale_factors, phase=phase, decode_options=PLANTED_DECODE)
    for c, measured in zip(scale_factors, sweep.sparsity):
      config = bj.SkipSoftmaxConfig(threshold_scale_factor={phase: c})
      assert measured == calibration.achieved_sparsity(
          config, [inputs], phase=phase, decode_options=PLANTED_DECODE)
      # And by hand: levels below log(c / L), over 64 visited blocks.
      levels = G0 + WIDTH * (np.arange(1, N_BLOCKS) - 0.5) / (N_BLOCKS - 1)
      assert measured == pytest.approx(
          np.sum(levels < math.log(c / KV_LEN)) / N_BLOCKS)


def test_decode_inputs_replay_prefill_rows():
  shape = testing.AttentionShape(2, 40, 40, 4, 2, 16)
  q, k, v = shape.inputs(key_for("decode-replay"), pattern="random")
  inputs = analysis.AttentionInputs(q=q, k=k, v=v, causal=True)
  decode = calibration.decode_inputs_from_prefill(inputs, (1, 17, 40))
  assert decode.q.shape == (6, 4, 16) and decode.k_cache.shape == (6, 40, 2,
                                                                  16)
  np.testing.assert_array_equal(decode.kv_lengths, [1, 1, 17, 17, 40, 40])
  out = jax.jit(lambda *args: bj.reference.blockwise_decode_attention(
      *args, block_kv=16).out)(decode.q, decode.k_cache, decode.v_cache,
                               decode.kv_lengths)               # [6, hq, d]
  dense = jax.jit(lambda q, k, v: bj.reference.dense_attention(
      q, k, v, causal=True))(q, k, v)                          # [2,40,hq,d]
  expected = jnp.concatenate([dense[:, t - 1] for t in (1, 17, 40)])
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_value_error():
  prefill, decode = planted_inputs(key_for("planted", "errors"), batch=1)
  with pytest.raises(ValueError, match="outside the swept range"):
    calibration.calibrate(target_sparsity=0.99, prefill_inputs=[prefill])
  with pytest.raises(ValueError, match=r"in \(0, 1\)"):
    calibration.calibrate(target_sparsity=1.5, prefill_inputs=[prefill])
  with pytest.raises(ValueError, match="no value for"):
    calibration.calibrate(target_sparsity={"prefill": 0.3},
                          prefill_inputs=[prefill], decode_inputs=[decode])
  with pytest.raises(ValueError, match="keys must be in"):
    calibration.calibrate(target_sparsity={"prefil": 0.3},
                          prefill_inputs=[prefill])
  with pytest.raises(ValueError, match="prefill_inputs"):
    calibration.calibrate(target_sparsity=0.3)
  with pytest.raises(ValueError, match="DecodeInputs"):
    calibration.calibrate(target_sparsity=0.3, decode_inputs=[prefill])
  with pytest.raises(ValueError, match="scale_factors"):
    calibration.sweep_scale_factors([prefill], [1.0])
  with pytest.raises(ValueError, match="scale_factors"):
    calibration.sweep_scale_factors([prefill], [-1.0, 2.0])
  with pytest.raises(ValueError, match="phase"):
    calibration.sweep_scale_factors([prefill], phase="train")
  with pytest.raises(ValueError, match="max_mode"):
    calibration.DecodeOptions(max_mode="best")
  with pytest.raises(ValueError, match="two distinct"):
    calibration.fit_exponential([0.2, 0.2, 0.2], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="SkipSoftmaxConfig"):
    calibration.check_calibration(0.01, target_sparsity=0.3,
                                  prefill_inputs=[prefill])
  with pytest.raises(ValueError, match="causal"):
    calibration.decode_inputs_from_prefill(prefill, (16,))
  causal = analysis.AttentionInputs(q=decode.k_cache, k=decode.k_cache,
                                    v=decode.v_cache, causal=True)
  with pytest.raises(ValueError, match="cache_lengths"):
    calibration.decode_inputs_from_prefill(causal, (0, KV_LEN + 1))
