"""Build, save and restore the GPTs of experiments/train_lm.py.

A training run writes into its workdir `log.json` (with the run's config)
and orbax checkpoints under `checkpoints/step_N` (a flat {path: array}
dict of params, optimizer state, step and data position). Other scripts
rebuild the model from that config and read the params back:

    model, cfg, step = lm_checkpoint.load_run("lm_small_output")
    logits = model(tokens)                       # tokens int [batch, seq]

Needs `orbax-checkpoint` (a dependency of the experiments).
"""

from __future__ import annotations

import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from experiments.lm import gpt
from experiments.lm import text_data

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.json"


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def data_kind(cfg) -> str:
  """Where a run's tokens come from.

  Args:
    cfg: a train_lm config (its `data` field).

  Returns:
    "synthetic" (the default when `data.kind` is absent) or "text".
  """
  return cfg.data.get("kind", "synthetic")


def vocab_size(cfg) -> int:
  """The model's vocabulary: the config's, or the text tokenizer's.

  Args:
    cfg: a train_lm config.

  Returns:
    `data.vocab_size` for synthetic data, the manifest's vocab_size of
    `data.data_dir` for text.

  Raises:
    ValueError: for text data whose `data_dir` holds no prepared dataset.
  """
  if data_kind(cfg) == "text":
    return int(text_data.load_manifest(cfg.data.data_dir)["vocab_size"])
  return cfg.data.vocab_size


def build_model(cfg, *, vocab: int | None = None) -> gpt.GPT:
  """A freshly initialised `gpt.GPT` for a train_lm config.

  Args:
    cfg: a train_lm config (`model`, `seq_len`, `seed`, `data` fields).
    vocab: the vocabulary size; default `vocab_size(cfg)`.

  Returns:
    A `gpt.GPT` initialised from `nnx.Rngs(cfg.seed)` (deterministic in
    the config), params in `model.param_dtype`.

  Raises:
    ValueError: as `vocab_size`, or from `gpt.GPT` for inconsistent model
      fields (e.g. num_heads not a multiple of num_kv_heads).
  """
  m = cfg.model
  return gpt.GPT(
      vocab_size(cfg) if vocab is None else vocab, cfg.seq_len,
      num_layers=m.num_layers,
      d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      mlp_ratio=m.mlp_ratio, tie_embeddings=m.tie_embeddings,
      implementation=m.implementation, block_q=m.block_q,
      block_kv=m.block_kv, dtype=jnp.dtype(m.dtype),
      param_dtype=jnp.dtype(m.param_dtype),
      position=m.get("position", "learned"),
      rope_base=m.get("rope_base", 10000.0), norm=m.get("norm", "layernorm"),
      rngs=nnx.Rngs(cfg.seed))


# ---------------------------------------------------------------- checkpoints
def _flatten(tree) -> dict:
  """{path string: leaf}: a container-free tree that orbax round-trips."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): x for p, x in leaves}


def _unflatten(target, flat: dict):
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  return jax.tree_util.tree_unflatten(
      treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in workdir, ascending.

  Args:
    workdir: a train_lm workdir.

  Returns:
    [int] steps of workdir/checkpoints/step_N ([] if none).
  """
  root = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(root):
    return []
  # orbax writes into a temporary name and renames when complete.
  return sorted(int(d.split("_")[1]) for d in os.listdir(root)
                if d.startswith("step_") and d.split("_")[1].isdigit())


def save_checkpoint(workdir: str, state: dict, step: int, keep: int) -> None:
  """Writes `state` as workdir/checkpoints/step_{step}; keeps the last
  `keep` checkpoints.

  Args:
    state: a pytree of arrays (e.g. {"params": nnx.State, "opt_state":
      ..., "step": int32 []}), stored flat as {path string: array}.
    workdir: the run's workdir (checkpoints/ is made if missing).
    step: the step number in the folder name (>= 0).
    keep: checkpoints to keep (>= 1); older ones are deleted.

  Raises:
    ImportError: without `orbax-checkpoint`.
  """
  ocp = _ocp()
  root = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(root, f"step_{step}"), _flatten(state),
                    force=True)
  checkpointer.wait_until_finished()
  for old in checkpoint_steps(workdir)[:-keep]:
    shutil.rmtree(os.path.join(root, f"step_{old}"))


def restore_checkpoint(workdir: str, target: dict, step: int | None = None):
  """The latest (or given) checkpoint, shaped like `target`; None if none.

  A target of only {"params": ...} reads the params of a full training
  state (the rest of the checkpoint is ignored).

  Args:
    workdir: the run's workdir.
    target: a pytree with the structure (and, except params-only, the
      shapes and dtypes) of the saved state.
    step: the checkpoint to read; default the latest.

  Returns:
    The restored pytree shaped like `target`, or None without checkpoints.

  Raises:
    ImportError: without `orbax-checkpoint`.
    KeyError: if the checkpoint lacks a leaf of `target`.
    ValueError: params-only, if a saved array's shape differs from the
      target's (e.g. a vocabulary from another tokenizer).
    Exception: orbax's error for a missing step or mismatched shapes.
  """
  ocp = _ocp()
  steps = checkpoint_steps(workdir)
  if not steps:
    return None
  step = steps[-1] if step is None else step
  flat_target = _flatten(target)
  if set(target) != {"params"}:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flat_target)
  else:
    abstract = None
  path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR,
                                      f"step_{step}"))
  checkpointer = ocp.StandardCheckpointer()
  if abstract is None:       # params only (init_from): read what is there
    flat = checkpointer.restore(path)
    flat = {k: flat[k] for k in flat_target}
    wrong = [f"{k}: saved {tuple(flat[k].shape)}, model {tuple(v.shape)}"
             for k, v in flat_target.items()
             if tuple(flat[k].shape) != tuple(v.shape)]
    if wrong:
      raise ValueError(
          f"The checkpoint in {path} does not fit the model (another "
          f"vocabulary or model config? e.g. a data_dir whose tokenizer "
          f"differs from the run's): {'; '.join(wrong[:3])}.")
  else:
    flat = checkpointer.restore(path, abstract)
  return _unflatten(target, flat)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a train_lm run recorded in workdir/log.json.

  Args:
    workdir: the run's workdir.

  Returns:
    The run's config as a `ml_collections.ConfigDict`.

  Raises:
    ValueError: if workdir holds no log.json.
  """
  path = os.path.join(workdir, LOG_FILE)
  if not os.path.isfile(path):
    raise ValueError(
        f"`workdir` {workdir!r} holds no {LOG_FILE}: point it at the workdir "
        "of an experiments/train_lm.py run (for finetune runs WORKDIR/"
        "finetune or WORKDIR/dense).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f)["config"])


def load_run(workdir: str, *, step: int | None = None,
             data_dir: str | None = None) -> tuple[gpt.GPT, ml_collections.ConfigDict, int]:
  """The trained model of a train_lm run.

  Args:
    workdir: the run's workdir (log.json and checkpoints/).
    step: the checkpoint to read; default the latest.
    data_dir: overrides the run's `data.data_dir` (the tokenizer's vocabulary
      sizes the model).

  Returns:
    (model with the checkpoint's params, the run's config, step).

  Raises:
    ValueError: without log.json or checkpoints in workdir, or for a
      `step` that is not among them.
    ImportError: without `orbax-checkpoint`.
  """
  cfg = load_run_config(workdir)
  if data_dir and data_kind(cfg) == "text":
    cfg.data.data_dir = data_dir
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ValueError(f"`workdir` {workdir!r} holds no checkpoint under "
                     f"{CHECKPOINT_DIR}/: train first (experiments/"
                     "train_lm.py).")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f"`step` {step} is not among the checkpoints {steps} "
                     f"of {workdir!r}.")
  model = build_model(cfg)
  graphdef, params = nnx.split(model)
  params = restore_checkpoint(workdir, {"params": params}, step)["params"]
  return nnx.merge(graphdef, params), cfg, step
