r"""Calibrate skip-softmax scale factors for a target sparsity, per phase.

Feeds random token sequences through a small Flax model
(`experiments.lm.toy_model.SinkLocalTransformer`), captures every attention
layer's q/k/v, and replays decode steps from them (the query of position
t - 1 against the first t keys). On the calibration inputs it sweeps the
scale factor c (λ = c / kv_len), fits c = a·exp(b·sparsity) per phase
(prefill, decode) and picks c for the target; on held-out inputs it runs the
oracle with the resulting `SkipSoftmaxConfig` and reports whether the
achieved sparsity is within the tolerance (±3 points) of the target. Writes
`calibration.json` and `calibration.png` into `--config.output_dir`.

    python -m experiments.calibrate --config=configs/calibrate.py
    python -m experiments.calibrate --config=configs/calibrate.py:small
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from flax import nnx
import jax
from ml_collections import config_flags
import numpy as np

from experiments import config_file
from blasst_jax import analysis
from blasst_jax import calibration
from blasst_jax import plotting
from blasst_jax import testing
from experiments.lm import toy_model

_CONFIG = config_flags.DEFINE_config_file("config", config_file("calibrate"))


def phase_inputs(cfg, model, seed: int, batch: int) -> dict[str, list]:
  """{"prefill": [AttentionInputs per layer], "decode": [DecodeInputs per
  layer]} from one batch of random tokens."""
  tokens = model.token_embeddings(jax.random.PRNGKey(seed), batch=batch,
                                  seq_len=cfg.seq_len)
  prefill = list(analysis.capture_attention_inputs(model, tokens).values())
  decode = [calibration.decode_inputs_from_prefill(
      x, tuple(cfg.decode_cache_lengths)) for x in prefill]
  return {"prefill": prefill, "decode": decode}


def print_results(cal, checks, tolerance):
  print(f"\n{'phase':<8} {'target':>7} {'fit a':>10} {'fit b':>7} "
        f"{'c':>10} {'held-out':>9} {'error':>7}  within ±{tolerance * 100:g} points")
  for phase, check in checks.items():
    fit = cal.fits[phase]
    print(f"{phase:<8} {check.target:>7.3f} {fit.a:>10.3g} {fit.b:>7.2f} "
          f"{check.scale_factor:>10.4g} {check.achieved:>9.3f} "
          f"{check.error:>+7.3f}  {'yes' if check.within_tolerance else 'NO'}")


def main(argv):
  del argv
  cfg = _CONFIG.value
  t0 = time.time()
  device = testing.announce_device()[0]
  model = toy_model.SinkLocalTransformer(**cfg.model.to_dict(),
                                         rngs=nnx.Rngs(cfg.model_seed))
  decode_options = calibration.DecodeOptions(
      block_kv=cfg.decode_block_kv,
      num_splits=cfg.decode_num_splits or None,
      max_mode=cfg.decode_max_mode)
  targets = cfg.target_sparsity.to_dict()
  print(f"calibration: batch {cfg.calibration_batch} (seed "
        f"{cfg.calibration_seed}), held-out: batch {cfg.held_out_batch} "
        f"(seed {cfg.held_out_seed}); {cfg.seq_len} tokens, "
        f"{len(model.layers)} layers; decode cache lengths "
        f"{tuple(cfg.decode_cache_lengths)}; targets {targets}", flush=True)
  train = phase_inputs(cfg, model, cfg.calibration_seed,
                       cfg.calibration_batch)
  held_out = phase_inputs(cfg, model, cfg.held_out_seed, cfg.held_out_batch)

  scale_factors = np.geomspace(cfg.scale_factor_min, cfg.scale_factor_max,
                               cfg.num_scale_factors)
  cal = calibration.calibrate(
      target_sparsity=targets, prefill_inputs=train["prefill"],
      decode_inputs=train["decode"], scale_factors=scale_factors,
      fit_window=cfg.fit_window, decode_options=decode_options,
      progress=True)
  print(f"calibrated: {cal.config}", flush=True)
  checks = calibration.check_calibration(
      cal.config, target_sparsity=targets,
      prefill_inputs=held_out["prefill"], decode_inputs=held_out["decode"],
      tolerance=cfg.tolerance, decode_options=decode_options)
  print_results(cal, checks, cfg.tolerance)
  all_within = all(c.within_tolerance for c in checks.values())
  print(f"\nheld-out sparsity within ±{cfg.tolerance * 100:g} points of the "
        f"target in every phase: {'yes' if all_within else 'NO'}")

  os.makedirs(cfg.output_dir, exist_ok=True)
  output = os.path.join(cfg.output_dir, "calibration.json")
  with open(output, "w") as f:
    json.dump(dict(device, config=cfg.to_dict(), calibration=cal.to_dict(),
                   scale_factors=cal.scale_factors,
                   held_out={p: c.to_dict() for p, c in checks.items()},
                   all_within_tolerance=all_within), f, indent=1)
  png = os.path.join(cfg.output_dir, "calibration.png")
  plotting.plot_calibration(cal, checks, path=png)
  print(f"report written to {os.path.abspath(output)}")
  print(f"plot written to {os.path.abspath(png)}")
  print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
