r"""Train a small GPT (`experiments.lm.gpt`) on tokens, dense or sparse.

Data (`cfg.data.kind`): "synthetic" (default; `experiments.lm.synthetic_lm`,
the other `cfg.data` fields are its arguments) or "text": random crops of
the real-text dataset in `cfg.data.data_dir` written by
experiments/prepare_text.py (`experiments.lm.text_data`; the vocabulary is the
tokenizer's, evaluation reads the held-out documents).

Modes (`--config.mode`, or the config variant):
  dense     λ = 0.
  sparse    skip-softmax during training at a fixed λ
            (`sparsity.threshold`), a scale factor (`sparsity.scale_factor`,
            λ = c / seq_len) or a target sparsity (`sparsity.target_sparsity`,
            calibrated once on the starting model and stored in the workdir).
  finetune  sparse training that starts from the params of a dense
            checkpoint (`--config.init_from=DIR`, a fresh optimizer with
            `finetune_optim`'s fields over `optim`); without `init_from`
            it first trains dense (with `optim`) into WORKDIR/dense, then
            fine-tunes into WORKDIR/finetune, runs the dense control into
            WORKDIR/dense_control and plots them.

AdamW with linear warmup + cosine decay and global-norm clipping. Every
`eval_every` steps it logs train loss, eval loss (held-out batches),
skip sparsity per layer and tokens/s to WORKDIR/log.json and redraws
WORKDIR/training.png. Checkpoints (orbax) hold params, optimizer state,
step and data position: rerunning with the same workdir resumes.

    python -m experiments.train_lm --config=configs/train_lm.py:sparse,small
    python -m experiments.train_lm --plot_logs=a/log.json,b/log.json \
        --plot_output=compare.png
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from experiments import config_file
from blasst_jax import analysis
from blasst_jax import calibration
from blasst_jax import config as config_lib
from experiments.lm import lm_checkpoint
from blasst_jax import plotting
from experiments.lm import synthetic_lm
from blasst_jax import testing
from experiments.lm import text_data
from blasst_jax.config import SkipSoftmaxConfig
from blasst_jax._progress import ProgressBar

_CONFIG = config_flags.DEFINE_config_file("config", config_file("train_lm"))
_PLOT_LOGS = flags.DEFINE_list(
    "plot_logs", None, "Only plot these JSON logs (e.g. a dense run and a "
    "sparse fine-tune) into --plot_output, then exit.")
_PLOT_OUTPUT = flags.DEFINE_string("plot_output", "training_compare.png",
                                   "PNG written with --plot_logs.")

MODES = ("dense", "sparse", "finetune")
DATA_KINDS = ("synthetic", "text")
MAX_THRESHOLD = config_lib.MAX_DERIVED_THRESHOLD


def check_config(cfg) -> None:
  """ValueErrors for config values that would fail later or silently."""
  if cfg.mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}, got {cfg.mode!r}.")
  for name in ("steps", "dense_steps", "batch_size", "seq_len", "eval_every",
               "eval_batches", "checkpoint_every", "keep_checkpoints"):
    value = cfg[name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  o = cfg.optim
  if not o.peak_lr > 0 or not 0 <= o.end_lr_ratio <= 1:
    raise ValueError(f"Need optim.peak_lr > 0 and 0 <= optim.end_lr_ratio "
                     f"<= 1, got {o.peak_lr}, {o.end_lr_ratio}.")
  if not 0 <= o.warmup_steps < max(cfg.steps, cfg.dense_steps):
    raise ValueError(f"`optim.warmup_steps` must lie in [0, steps), got "
                     f"{o.warmup_steps}.")
  if "finetune_optim" in cfg:
    unknown = set(cfg.finetune_optim.keys()) - set(o.keys())
    if unknown:
      raise ValueError(f"`finetune_optim` overrides `optim` fields; "
                       f"{sorted(unknown)} are not among {sorted(o.keys())}.")
    ft = finetune_config(cfg).optim
    if not ft.peak_lr > 0 or not 0 <= ft.warmup_steps < cfg.steps:
      raise ValueError(f"Need finetune_optim.peak_lr > 0 and warmup_steps "
                       f"in [0, steps={cfg.steps}), got "
                       f"{cfg.finetune_optim.to_dict()}.")
  if not o.clip_norm > 0:
    raise ValueError(f"`optim.clip_norm` must be > 0, got {o.clip_norm}.")
  s = cfg.sparsity
  given = [k for k in ("threshold", "scale_factor", "target_sparsity")
           if s[k]]
  if cfg.mode != "dense" and len(given) != 1:
    raise ValueError(
        f"Mode {cfg.mode!r} needs exactly one nonzero of "
        f"sparsity.threshold / scale_factor / target_sparsity, got "
        f"{given or 'none'}.")
  if not 0 <= s.threshold < 1 or s.scale_factor < 0 or not (
      0 <= s.target_sparsity < 1):
    raise ValueError("Need sparsity.threshold in [0, 1), scale_factor >= 0, "
                     f"target_sparsity in [0, 1); got {s.to_dict()}.")
  kind = lm_checkpoint.data_kind(cfg)
  if kind not in DATA_KINDS:
    raise ValueError(f"`data.kind` must be one of {DATA_KINDS}, got "
                     f"{kind!r}.")
  if kind == "text":
    if not cfg.data.get("data_dir"):
      raise ValueError("`data.kind` 'text' needs `data.data_dir`, a folder "
                       "written by experiments/prepare_text.py.")
    text_data.load_manifest(cfg.data.data_dir)   # ValueError naming the fix
  if cfg.init_from and not os.path.isdir(
      os.path.join(cfg.init_from, lm_checkpoint.CHECKPOINT_DIR)):
    raise ValueError(f"`init_from` ({cfg.init_from!r}) holds no "
                     f"{lm_checkpoint.CHECKPOINT_DIR}/ folder of a "
                     "train_lm.py run.")


def make_source(cfg):
  """The token source: `SyntheticLM` or `text_data.TextBatches`.

  Both have `batch(index, *, batch_size, seq_len, split)` -> int32
  [batch_size, seq_len + 1], split "train" or "eval" (held out).
  """
  if lm_checkpoint.data_kind(cfg) == "text":
    return text_data.TextBatches(
        cfg.data.data_dir, seed=cfg.data.seed,
        start=cfg.data.get("start", "random"),
        passkey_prob=cfg.data.get("passkey_prob", 0.0),
        passkey_digits=cfg.data.get("passkey_digits", 5),
        passkey_answer_weight=cfg.data.get("passkey_answer_weight", 1.0))
  args = {k: v for k, v in cfg.data.to_dict().items() if k != "kind"}
  return synthetic_lm.SyntheticLM(**args)


def finetune_config(cfg):
  """`cfg` with `finetune_optim`'s fields over `optim`: the fine-tune phase.

  The dense phase of finetune mode trains with `optim` as it is; the
  fine-tune and its dense control start from that checkpoint with a fresh
  optimizer of these settings (e.g. a lower peak_lr and short warmup).
  """
  with cfg.unlocked():
    out = cfg.copy_and_resolve_references()
  if "finetune_optim" in out:
    out.optim.update(out.finetune_optim.to_dict())
  return out


def target_weights(source, index: int, cfg):
  """f32 [batch, seq_len] loss weights of training batch `index`, or None.

  None (plain mean cross-entropy) unless the text source weights passkey
  answers (`data.passkey_answer_weight` != 1).
  """
  if cfg.data.get("passkey_answer_weight", 1.0) == 1.0 or not hasattr(
      source, "target_weights"):
    return None
  return jnp.asarray(source.target_weights(
      index, batch_size=cfg.batch_size, seq_len=cfg.seq_len))


def make_optimizer(cfg, steps: int) -> optax.GradientTransformation:
  o = cfg.optim
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.peak_lr, warmup_steps=o.warmup_steps,
      decay_steps=steps, end_value=o.peak_lr * o.end_lr_ratio)
  # No weight decay on biases, LayerNorm scales (the 1-D params).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                  mask=decay_mask))


def loss_and_sparsity(graphdef, params, tokens, threshold, weights=None):
  """Training objective, mean next-token cross-entropy, sparsity per layer.

  tokens: int [batch, seq_len + 1]; weights: None or f32 [batch, seq_len]
  per-target loss weights (`TextBatches.target_weights`). Returns
  (objective = sum(weights * ce) / ce.size, or the mean ce without
  weights, (mean ce, f32 [num_layers] sparsity)).
  """
  model = nnx.merge(graphdef, params)
  logits, stats = model(tokens[:, :-1], threshold=threshold,
                        return_stats=True)                 # [b, t, vocab]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  loss = ce.mean()
  objective = loss if weights is None else (ce * weights).mean()
  return objective, (loss, jnp.stack([s.total_sparsity for s in stats]))


# ------------------------------------------------------------------ threshold
def resolve_threshold(cfg, workdir, graphdef, params, source):
  """λ / SkipSoftmaxConfig of the run (0.0 when dense), plus a JSON record.

  A target sparsity is calibrated once, on a held-out batch run through the
  starting model, and stored in workdir so that a resumed run keeps it.
  """
  s = cfg.sparsity
  if cfg.mode == "dense":
    record = {"threshold": 0.0}
    return threshold_from_record(record), record
  if s.threshold:
    record = {"threshold": float(s.threshold)}
    return threshold_from_record(record), record
  if s.scale_factor:
    record = {"scale_factor": float(s.scale_factor)}
    return threshold_from_record(record), record
  path = os.path.join(workdir, "threshold.json")
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
  else:
    model = nnx.merge(graphdef, params)
    tokens = source.batch(cfg.eval_batches, batch_size=cfg.batch_size,
                          seq_len=cfg.seq_len, split="eval")
    inputs = analysis.capture_attention_inputs(model, jnp.asarray(
        tokens[:, :-1]))
    record = {"target_sparsity": float(s.target_sparsity)}
    try:
      cal = calibration.calibrate(
          target_sparsity=s.target_sparsity,
          prefill_inputs=list(inputs.values()), block_q=cfg.model.block_q,
          block_kv=cfg.model.block_kv, progress=cfg.progress)
      record["scale_factor"] = float(cal.scale_factors["prefill"])
    except ValueError as e:
      # A model without skippable structure (no attention sinks yet) reaches
      # no such sparsity at any λ: train at the largest λ rather than stop.
      record["scale_factor"] = MAX_THRESHOLD * cfg.seq_len
      record["unreachable"] = str(e)
      print(f"WARNING: {e}\nTraining at λ = {MAX_THRESHOLD} instead.",
            flush=True)
    with open(path, "w") as f:
      json.dump(record, f)
  print(f"calibrated scale factor for target sparsity "
        f"{record['target_sparsity']}: c = {record['scale_factor']:.4g} "
        f"(λ = {record['scale_factor'] / cfg.seq_len:.3g} at seq_len "
        f"{cfg.seq_len})", flush=True)
  return threshold_from_record(record), record


def threshold_from_record(record: dict):
  """The λ (float) or SkipSoftmaxConfig a run's threshold record stands for."""
  if "scale_factor" in record:
    return SkipSoftmaxConfig(threshold_scale_factor=record["scale_factor"])
  return float(record["threshold"])


# ---------------------------------------------------------------------- train
def train(cfg, workdir: str, *, init_from: str = "", steps: int | None = None,
          device: dict | None = None, probe_threshold=None) -> dict:
  """Runs (or resumes) one training run in `workdir`; returns its log.

  probe_threshold: for a dense run, a λ (or SkipSoftmaxConfig) at which the
  evaluations also measure loss and sparsity (`eval_loss_at_threshold`,
  `sparsity_at_threshold`): how well the dense model tolerates skipping.
  """
  steps = cfg.steps if steps is None else steps
  os.makedirs(workdir, exist_ok=True)
  source = make_source(cfg)
  model = lm_checkpoint.build_model(cfg)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(cfg, steps)
  step_offset = 0
  if init_from:
    restored = lm_checkpoint.restore_checkpoint(init_from, {"params": params})
    params = restored["params"]
    step_offset = lm_checkpoint.checkpoint_steps(init_from)[-1]
    print(f"initialised from {init_from} (step {step_offset})", flush=True)
  threshold, threshold_record = resolve_threshold(cfg, workdir, graphdef,
                                                  params, source)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.int32(0), "data_index": jnp.int32(0)}
  restored = lm_checkpoint.restore_checkpoint(workdir, state)
  log_path = os.path.join(workdir, "log.json")
  log = {"mode": cfg.mode, "config": cfg.to_dict(), "step_offset": step_offset,
         "threshold": threshold_record, "num_params": int(sum(
             x.size for x in jax.tree.leaves(params))), "evals": [],
         **(device or {})}
  if lm_checkpoint.data_kind(cfg) == "text":
    manifest = text_data.load_manifest(cfg.data.data_dir)
    log["data"] = {
        "vocab_size": manifest["vocab_size"], "sources": manifest["sources"],
        "sha256": manifest["sha256"],
        **{f"{split}_tokens": info["num_tokens"]
           for split, info in manifest["splits"].items()}}
  if restored is not None:
    state = restored
    if os.path.exists(log_path):
      with open(log_path) as f:
        log["evals"] = [e for e in json.load(f)["evals"]
                        if e["step"] <= int(state["step"])]
    print(f"resumed from step {int(state['step'])} in {workdir}", flush=True)
  start = int(state["step"])

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, tokens, weights):
    (_, (loss, sparsity)), grads = jax.value_and_grad(
        loss_and_sparsity, argnums=1, has_aux=True)(graphdef, params, tokens,
                                                    threshold, weights)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, sparsity

  @functools.partial(jax.jit, static_argnums=2)
  def eval_step(params, tokens, thr):
    return loss_and_sparsity(graphdef, params, tokens, thr)[1]

  eval_batches = [jnp.asarray(source.batch(
      i, batch_size=cfg.batch_size, seq_len=cfg.seq_len, split="eval"))
                  for i in range(cfg.eval_batches)]

  def evaluate(params, thr):
    results = [eval_step(params, b, thr) for b in eval_batches]
    return (float(np.mean([r[0] for r in results])),
            np.mean([np.asarray(r[1]) for r in results], axis=0))

  params, opt_state = state["params"], state["opt_state"]
  data_index = int(state["data_index"])
  bar = ProgressBar(total=steps, desc=f"{cfg.mode} training",
                    enabled=cfg.progress)
  bar.count = start
  losses, sparsities = [], []
  interval_start, interval_tokens = time.perf_counter(), 0
  for step in range(start + 1, steps + 1):
    tokens = jnp.asarray(source.batch(data_index, batch_size=cfg.batch_size,
                                      seq_len=cfg.seq_len))
    weights = target_weights(source, data_index, cfg)
    data_index += 1
    params, opt_state, loss, sparsity = train_step(params, opt_state, tokens,
                                                   weights)
    losses.append(loss)
    sparsities.append(sparsity)
    interval_tokens += tokens.shape[0] * (tokens.shape[1] - 1)
    bar.update()
    if step % cfg.eval_every == 0 or step == steps:
      train_loss = float(np.mean(jax.device_get(losses)))
      train_sparsity = np.mean(jax.device_get(sparsities), axis=0)
      elapsed = time.perf_counter() - interval_start
      eval_loss, eval_sparsity = evaluate(params, threshold)
      record = {"step": step, "train_loss": train_loss,
                "eval_loss": eval_loss,
                "sparsity": [float(x) for x in eval_sparsity],
                "train_sparsity": [float(x) for x in train_sparsity],
                "tokens_per_s": interval_tokens / elapsed,
                "lr": float(tx_lr(cfg, steps, step))}
      if cfg.mode != "dense":   # what sparse training does to dense quality
        record["eval_loss_dense"] = evaluate(params, 0.0)[0]
      elif probe_threshold is not None:
        loss_at, sparsity_at = evaluate(params, probe_threshold)
        record["eval_loss_at_threshold"] = loss_at
        record["sparsity_at_threshold"] = [float(x) for x in sparsity_at]
      log["evals"].append(record)
      print(f"\nstep {step}: train loss {train_loss:.4f}, eval loss "
            f"{eval_loss:.4f}"
            + (f" (dense {record['eval_loss_dense']:.4f})"
               if "eval_loss_dense" in record else "")
            + ", sparsity per layer ["
            + ", ".join(f"{x:.3f}" for x in eval_sparsity)
            + f"], {record['tokens_per_s']:.0f} tokens/s", flush=True)
      with open(log_path, "w") as f:
        json.dump(log, f, indent=1)
      plotting.plot_training([log], path=os.path.join(workdir,
                                                      "training.png"))
      losses, sparsities = [], []
    if step % cfg.checkpoint_every == 0 or step == steps:
      lm_checkpoint.save_checkpoint(
          workdir, {"params": params, "opt_state": opt_state,
                    "step": jnp.int32(step),
                    "data_index": jnp.int32(data_index)},
          step, cfg.keep_checkpoints)
    if step % cfg.eval_every == 0:
      interval_start, interval_tokens = time.perf_counter(), 0
  bar.close()
  print(f"log written to {os.path.abspath(log_path)}", flush=True)
  return log


def tx_lr(cfg, steps: int, step: int) -> float:
  o = cfg.optim
  return optax.warmup_cosine_decay_schedule(
      0.0, o.peak_lr, o.warmup_steps, steps, o.peak_lr * o.end_lr_ratio)(step)


def main(argv):
  del argv
  if _PLOT_LOGS.value:
    logs = []
    for path in _PLOT_LOGS.value:
      with open(path) as f:
        logs.append(json.load(f))
    plotting.plot_training(logs, path=_PLOT_OUTPUT.value)
    print(f"plot written to {os.path.abspath(_PLOT_OUTPUT.value)}")
    return
  # orbax logs every save at INFO; keep the training log readable.
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  check_config(cfg)
  t0 = time.time()
  device = testing.announce_device()[0]
  if cfg.mode == "finetune" and not cfg.init_from:
    dense_dir = os.path.join(cfg.workdir, "dense")
    finetune_dir = os.path.join(cfg.workdir, "finetune")
    with cfg.unlocked():
      dense_cfg = cfg.copy_and_resolve_references()
    dense_cfg.mode = "dense"
    dense_log = train(dense_cfg, dense_dir, steps=cfg.dense_steps,
                      device=device)
    ft_cfg = finetune_config(cfg)
    sparse_log = train(ft_cfg, finetune_dir, init_from=dense_dir,
                       device=device)
    # The control: as many more steps, dense, from the same checkpoint,
    # probed at the fine-tune's λ.
    control_cfg = ft_cfg.copy_and_resolve_references()
    control_cfg.mode = "dense"
    control_log = train(control_cfg, os.path.join(cfg.workdir, "dense_control"),
                        init_from=dense_dir, device=device,
                        probe_threshold=threshold_from_record(
                            sparse_log["threshold"]))
    png = os.path.join(cfg.workdir, "dense_vs_finetune.png")
    plotting.plot_training(
        [dense_log, control_log, sparse_log],
        labels=["dense", "dense, continued", "sparse fine-tune"], path=png)
    print(f"plot written to {os.path.abspath(png)}")
  elif cfg.mode == "finetune":
    train(finetune_config(cfg), cfg.workdir, init_from=cfg.init_from,
          device=device)
  else:
    train(cfg, cfg.workdir, init_from=cfg.init_from, device=device)
  print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
