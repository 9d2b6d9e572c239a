"""Evaluating a GPT with skip-softmax on real text: perplexity, retrieval.

The parts of experiments/eval_sparsity.py that other scripts can reuse:

    windows = lm_eval.perplexity_windows(docs, 4096)       # int32 [n, 4097]
    ev = lm_eval.Evaluator(model, batch_size=8, xattention=XAttentionOptions())
    out = ev.run(windows[:, :-1], windows[:, 1:], threshold=1e-3)
    out.logprob    # f32 [n, 4096]: log p(target) per token
    out.skipped    # int [num_layers, n, num_heads] skipped blocks

    samples = lm_eval.passkey_samples(tok, filler, length=4096,
                                      depths=[0, .5, 1], trials=4, seed=0)
    scores = lm_eval.score_passkeys(samples, ev.run(...))

Perplexity is exp(mean next-token NLL) over non-overlapping windows of
held-out text (each window of length + 1 tokens gives `length` targets).
Passkey retrieval hides "The pass key is 73914. Remember it." at a depth of
held-out text and asks for it at the end; greedy decoding is scored by one
teacher-forced pass (greedy emits the key's tokens exactly when each of them
is the argmax after the ones before), and the mean log-probability of the
key's tokens is reported as well.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import analysis
from blasst_jax import calibration
from blasst_jax import config as config_lib
from experiments.lm import text_data
from blasst_jax import xattention
from blasst_jax.config import SkipSoftmaxConfig
from blasst_jax._progress import ProgressBar

WINDOW_SOURCES = ("auto", "documents", "stream")
# The template training augmentation shares (text_data.TextBatches).
NEEDLE = text_data.PASSKEY_NEEDLE
QUESTION = text_data.PASSKEY_QUESTION
ANSWER = text_data.PASSKEY_ANSWER


# ------------------------------------------------------------------ windows
def perplexity_windows(documents: Sequence[np.ndarray], length: int, *,
                       source: str = "auto", documents_from: int = 2048,
                       max_windows: int | None = None
                       ) -> tuple[np.ndarray, str]:
  """Non-overlapping windows of length + 1 tokens of held-out text.

  Args:
    documents: the documents, int [n_i] each (`text_data.load_documents`).
    length: context length; a window holds length + 1 tokens (inputs
      window[:-1], targets window[1:]); consecutive windows of a document
      or of the stream start `length` tokens apart.
    source: "documents": windows inside documents of >= length + 1 tokens
      (long documents for long contexts); "stream": windows of all
      documents concatenated; "auto": "documents" for length >=
      documents_from when that gives at least one window, else "stream".
    documents_from: see "auto".
    max_windows: keep at most this many, evenly spaced (None: all).

  Returns:
    (int32 [n_windows, length + 1], the source used).

  Raises:
    ValueError: for an unknown source, a length < 1, or text too short for
      one window.
  """
  if source not in WINDOW_SOURCES:
    raise ValueError(f"`source` must be one of {WINDOW_SOURCES}, got "
                     f"{source!r}.")
  if not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"`length` must be a positive int, got {length!r}.")
  docs = [np.asarray(d, np.int32) for d in documents]
  long_docs = [d for d in docs if d.size >= length + 1]
  if source == "auto":
    source = "documents" if length >= documents_from and long_docs \
        else "stream"
  parts = long_docs if source == "documents" else (
      [np.concatenate(docs)] if docs else [])
  windows = [d[s:s + length + 1] for d in parts
             for s in range(0, d.size - length, length)]
  if not windows:
    total = sum(d.size for d in docs)
    raise ValueError(
        f"No window of length + 1 = {length + 1} tokens fits the text "
        f"({source}: {total} tokens in {len(docs)} documents, the longest "
        f"{max((d.size for d in docs), default=0)}): use a shorter `length` "
        "or source='stream'.")
  out = np.stack(windows)
  if max_windows is not None and out.shape[0] > max_windows:
    keep = np.unique(np.linspace(0, out.shape[0] - 1, max_windows).round()
                     .astype(int))
    out = out[keep]
  return out, source


# ---------------------------------------------------------------- xattention
@dataclasses.dataclass(frozen=True)
class XAttentionOptions:
  """How XAttention selects blocks inside the model (`xattention_selector`).

  Attributes:
    block_size: tokens per XAttention block; a multiple of `stride` and of
      the layers' block_q and block_kv (the mask is cut into their tiles).
    stride: antidiagonal group size.
    keep_sink, keep_diagonal: always keep kv block 0 / the diagonal block.
  """

  block_size: int = 128
  stride: int = 8
  keep_sink: bool = True
  keep_diagonal: bool = True


def tile_block_mask(mask, block_size: int, block_q: int, block_kv: int,
                    q_len: int, kv_len: int) -> jax.Array:
  """A mask over block_size blocks repeated into block_q x block_kv tiles.

  Args:
    mask: bool [batch, heads, ceil(q_len / block_size), ceil(kv_len /
      block_size)].
    block_size: the mask's block size, a multiple of block_q and block_kv.
    block_q, block_kv: the attention tiles.
    q_len, kv_len: sequence lengths (tiles past the end are dropped).

  Returns:
    bool [batch, heads, ceil(q_len / block_q), ceil(kv_len / block_kv)].

  Raises:
    ValueError: if block_size is not a multiple of both tile sizes.
  """
  if block_size % block_q or block_size % block_kv:
    raise ValueError(
        f"XAttention `block_size` ({block_size}) must be a multiple of the "
        f"layers' block_q ({block_q}) and block_kv ({block_kv}); choose e.g. "
        f"block_size={max(block_q, block_kv, block_size)}.")
  mask = jnp.repeat(mask, block_size // block_q, axis=2)
  mask = jnp.repeat(mask, block_size // block_kv, axis=3)
  return mask[:, :, :-(-q_len // block_q), :-(-kv_len // block_kv)]


def xattention_selector(threshold, options: XAttentionOptions, *,
                        block_q: int, block_kv: int):
  """A `block_selector` for `gpt.GPT` / `nn.SkipSelfAttention`.

  Args:
    threshold: XAttention τ in (0, 1] (a float or a traced scalar).
    options: `XAttentionOptions`.
    block_q, block_kv: the layers' tile sizes (as the model was built).

  Returns:
    `fn(q, k) -> bool [batch, q_heads, n_q_tiles, n_kv_blocks]`: causal
    XAttention selection at `options.block_size`, in the layers' tiles.
  """

  def select(q, k):
    lq, lk = q.shape[1], k.shape[1]
    bq, bkv = config_lib.effective_block_sizes(lq, lk, block_q, block_kv)
    mask = xattention.select_blocks(
        q, k, block_size=options.block_size, stride=options.stride,
        threshold=threshold, causal=True, keep_sink=options.keep_sink,
        keep_diagonal=options.keep_diagonal)
    return tile_block_mask(mask, options.block_size, bq, bkv, lq, lk)

  return select


# ----------------------------------------------------------------- evaluator
@dataclasses.dataclass
class EvalOutput:
  """Per-token scores and block counts of one evaluation.

  Attributes:
    logprob: f32 [n, length]: log p(targets[i, t] | inputs[i, :t + 1]).
    greedy: bool [n, length]: targets[i, t] is the argmax prediction.
    skipped, visited, masked: int64 [num_layers, n, num_heads] block counts
      (`SkipStats`; masked: removed by the XAttention mask, 0 without).
    argmax: int32 [n, length]: the top-1 prediction (for agreement between
      methods).
  """

  logprob: np.ndarray
  greedy: np.ndarray
  skipped: np.ndarray
  visited: np.ndarray
  masked: np.ndarray
  argmax: np.ndarray


@functools.partial(jax.jit, static_argnames=("graphdef", "xattention",
                                             "tiles"))
def _forward(graphdef, state, inputs, targets, threshold, xattention_threshold,
             *, xattention, tiles):
  model = nnx.merge(graphdef, state)
  selector = None if xattention is None else xattention_selector(
      xattention_threshold, xattention, block_q=tiles[0], block_kv=tiles[1])
  logits, stats = model(inputs, threshold=threshold, return_stats=True,
                        block_selector=selector)          # [b, t, vocab] f32
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  greedy = argmax == targets
  skipped = jnp.stack([s.skipped_blocks for s in stats])   # [layers, b, h]
  visited = jnp.stack([s.visited_blocks for s in stats])
  masked = jnp.stack([s.masked_blocks if s.masked_blocks is not None
                      else jnp.zeros_like(s.visited_blocks) for s in stats])
  return target_logp, greedy, skipped, visited, masked, argmax


def model_tiles(model) -> tuple[int, int]:
  """(block_q, block_kv) of the model's attention layers.

  Args:
    model: a `gpt.GPT`.

  Returns:
    (block_q, block_kv) ints of its first layer (all layers share them).

  Raises:
    ValueError: if the layers leave them to the implementation (None).
  """
  attn = model.blocks[0].attn
  if attn.block_q is None or attn.block_kv is None:
    raise ValueError(
        "XAttention inside the model needs explicit tile sizes: build the "
        "GPT with block_q and block_kv (e.g. 64 and 128).")
  return int(attn.block_q), int(attn.block_kv)


class Evaluator:
  """Runs a `gpt.GPT` on token batches, jitted once per shape.

  λ and XAttention τ are traced, so one compile per (batch shape, with or
  without XAttention) serves a whole sweep. Change the model (e.g.
  `set_rope_scale`) and build a new Evaluator.
  """

  def __init__(self, model, *, batch_size: int,
               xattention: XAttentionOptions | None = None):
    """Args:
      model: a `gpt.GPT`.
      batch_size: sequences per forward pass (the last batch is padded).
      xattention: options of XAttention selection, needed to run with
        `xattention_threshold`.

    Raises:
      ValueError: for a batch_size that is not a positive int, or
        XAttention on a model without explicit tiles (`model_tiles`).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"`batch_size` must be a positive int, got "
                       f"{batch_size!r}.")
    self.graphdef, self.state = nnx.split(model)
    self.batch_size = int(batch_size)
    self.xattention = xattention
    self.tiles = model_tiles(model) if xattention is not None else None

  def run(self, inputs, targets, *, threshold: float = 0.0,
          xattention_threshold: float | None = None,
          progress: ProgressBar | None = None) -> EvalOutput:
    """Scores targets given inputs.

    Args:
      inputs, targets: int [n, length].
      threshold: λ in [0, 1) of every layer (0: dense).
      xattention_threshold: τ in (0, 1] to select blocks with XAttention
        first (None: no selection).
      progress: a bar advanced once per batch.

    Returns:
      An `EvalOutput` over the n sequences.

    Raises:
      ValueError: for inputs and targets of different shapes or not 2-D,
        a λ outside [0, 1), a τ outside (0, 1], or a τ without
        XAttention options.
    """
    inputs = np.asarray(inputs, np.int32)
    targets = np.asarray(targets, np.int32)
    if inputs.shape != targets.shape or inputs.ndim != 2:
      raise ValueError(f"`inputs` and `targets` must both be [n, length], "
                       f"got {inputs.shape} and {targets.shape}.")
    config_lib.check_threshold(threshold)
    if xattention_threshold is not None:
      if self.xattention is None:
        raise ValueError("`xattention_threshold` needs an Evaluator built "
                         "with xattention=XAttentionOptions(...).")
      if not 0 < xattention_threshold <= 1:
        raise ValueError(f"`xattention_threshold` τ must lie in (0, 1], got "
                         f"{xattention_threshold!r}.")
    n = inputs.shape[0]
    b = self.batch_size
    outs = []
    for start in range(0, n, b):
      x, y = inputs[start:start + b], targets[start:start + b]
      real = x.shape[0]
      if real < b:                               # pad: one shape, one compile
        x = np.concatenate([x, np.repeat(x[-1:], b - real, axis=0)])
        y = np.concatenate([y, np.repeat(y[-1:], b - real, axis=0)])
      result = _forward(
          self.graphdef, self.state, jnp.asarray(x), jnp.asarray(y),
          jnp.float32(threshold),
          jnp.float32(1.0 if xattention_threshold is None
                      else xattention_threshold),
          xattention=None if xattention_threshold is None
          else self.xattention, tiles=self.tiles)
      result = jax.device_get(result)
      outs.append([result[0][:real], result[1][:real]]
                  + [np.asarray(r[:, :real], np.int64) for r in result[2:5]]
                  + [result[5][:real]])
      if progress is not None:
        progress.update()
    return EvalOutput(*(np.concatenate([o[i] for o in outs],
                                       axis=1 if 2 <= i < 5 else 0)
                        for i in range(6)))


def perplexity(logprob: np.ndarray) -> tuple[float, float]:
  """Mean next-token NLL and perplexity of target log-probs.

  Args:
    logprob: float [n, length] log p(target) per token (averaged in
      float64).

  Returns:
    (mean NLL in nats, exp(mean NLL)) as Python floats.
  """
  nll = float(-np.mean(np.asarray(logprob, np.float64)))
  return nll, float(np.exp(nll))


def block_sparsity(out: EvalOutput) -> dict:
  """Pooled block sparsities of an evaluation.

  Args:
    out: an `EvalOutput` (block counts int [num_layers, n, num_heads]).

  Returns:
    {"sparsity": skipped / visited, "mask_sparsity": masked / (visited +
    masked), "combined_sparsity": (skipped + masked) / (visited + masked)
    (blocks whose P·V was not computed), each a float, plus
    "sparsity_per_layer", "combined_per_layer" ([num_layers]) and
    "sparsity_per_head" ([num_layers][num_heads]) of the skip sparsity}.
  """
  s = out.skipped.sum(1).astype(np.float64)               # [layers, heads]
  v = out.visited.sum(1).astype(np.float64)
  m = out.masked.sum(1).astype(np.float64)
  ratio = lambda a, b: float(a.sum() / max(b.sum(), 1.0))  # pylint: disable=g-long-lambda
  return {
      "sparsity": ratio(s, v),
      "mask_sparsity": ratio(m, v + m),
      "combined_sparsity": ratio(s + m, v + m),
      "sparsity_per_layer": (s.sum(1) / np.maximum(v.sum(1), 1)).tolist(),
      "combined_per_layer": ((s + m).sum(1) / np.maximum((v + m).sum(1), 1)
                             ).tolist(),
      "sparsity_per_head": (s / np.maximum(v, 1)).tolist(),
  }


# --------------------------------------------------------------- calibration
def calibrate_thresholds(model, windows: np.ndarray, targets: Sequence[float],
                         *, length: int, progress: bool = False) -> dict:
  """λ at `length` for each target sparsity, calibrated on `windows`.

  The model is run once (dense, eagerly) on the windows to capture every
  layer's q/k/v (`analysis.capture_attention_inputs`); the scale factor c
  (λ = c / length) is swept and fitted as `calibration.calibrate` does,
  with the layers' tiles. Use training text: never the evaluation text.

  Args:
    model: a `gpt.GPT` (its rope scale set for `length`).
    windows: int [n, >= length] calibration tokens; the first `length` of
      each are used.
    targets: target sparsities in (0, 1).
    length: the context length.
    progress: draw the sweep's progress bar.

  Returns:
    {target: {"scale_factor", "threshold" (λ at length), "sweep_sparsity"
    (the sparsity the sweep measured nearest that c)} or {"unreachable":
    reason}}.
  """
  inputs = analysis.capture_attention_inputs(
      model, jnp.asarray(np.asarray(windows)[:, :length]))
  sweep = calibration.sweep_scale_factors(list(inputs.values()),
                                          phase="prefill", progress=progress)
  return _targets_from_sweep(sweep, targets, length)


def _targets_from_sweep(sweep, targets: Sequence[float], length: int
                        ) -> dict:
  """{target: {"scale_factor", "threshold", "sweep_sparsity"} or
  {"unreachable"}} from a `calibration.ScaleFactorSweep` at `length`."""
  phase = sweep.phase
  result = {}
  for target in targets:
    try:
      fit = calibration._fit_near(  # pylint: disable=protected-access
          sweep, float(target), calibration.DEFAULT_FIT_WINDOW)
    except ValueError as e:
      result[float(target)] = {"unreachable": str(e)}
      continue
    c = fit.scale_factor(float(target))
    lam = float(SkipSoftmaxConfig(threshold_scale_factor={phase: c}
                                  ).threshold_for(int(length), phase))
    nearest = int(np.argmin(np.abs(np.log(sweep.scale_factors) - np.log(c))))
    result[float(target)] = {"scale_factor": c, "threshold": lam,
                             "sweep_sparsity": sweep.sparsity[nearest]}
  return result


def calibrate_decode_thresholds(model, windows: np.ndarray,
                                targets: Sequence[float], *, length: int,
                                steps: int, cache_lengths: int = 8,
                                options: calibration.DecodeOptions | None = None
                                ) -> dict:
  """Decode λ at `length` for each target sparsity (as
  `calibrate_thresholds`, with the decode phase's scale factor).

  The decode steps replayed are those of `evaluate_decode`: queries at
  `cache_lengths` positions evenly spread over the last `steps` of each
  window (`calibration.decode_inputs_from_prefill`), with the decode
  kernel's tiling (`options`, default `calibration.DecodeOptions()`).
  """
  options = calibration.DecodeOptions() if options is None else options
  inputs = analysis.capture_attention_inputs(
      model, jnp.asarray(np.asarray(windows)[:, :length]))
  lengths = np.unique(np.linspace(length - steps + 1, length, cache_lengths)
                      .round().astype(int)).tolist()
  decode_inputs = [calibration.decode_inputs_from_prefill(x, lengths)
                   for x in inputs.values()]
  sweep = calibration.sweep_scale_factors(decode_inputs, phase="decode",
                                          decode_options=options)
  return _targets_from_sweep(sweep, targets, length)


def evaluate_decode(model, windows: np.ndarray, *, steps: int,
                    methods: Sequence[dict], batch_size: int,
                    num_splits: int | None = None,
                    progress: ProgressBar | None = None) -> list[dict]:
  """Teacher-forced decoding of the last `steps` tokens of each window.

  Every window (length + 1 tokens) is prefilled densely up to position
  length - steps, then its next `steps` tokens are fed one decode step at a
  time (`Llama.decode_step`, i.e. `blasst_jax.decode_attention` in every
  layer, one query row per head) with each method's decode λ, and the
  model is scored on the token after each.

  Args:
    model: a `blasst_jax.models.Llama` (anything with `init_cache`,
      `prefill` and `decode_step`).
    windows: int [n, length + 1].
    steps: decode steps per window, < length.
    methods: [{"label", "threshold" (decode λ)...}], dense (λ = 0) first.
    batch_size: windows decoded together (the last batch is padded).
    num_splits: the decode kernel's split-K factor (None: its default for
      this batch; calibrate with the same, since every split keeps its own
      running max).
    progress: a bar advanced once per (batch, method).

  Returns:
    The methods, each updated with "nll", "perplexity", "delta_ppl_pct"
    (vs the first), "top1_agreement" (argmax equal to the first's),
    "sparsity" (skipped / visited decode blocks, pooled),
    "sparsity_per_layer" and "steps".
  """
  windows = np.asarray(windows, np.int32)
  n, length = windows.shape[0], windows.shape[1] - 1
  if not 0 < steps < length:
    raise ValueError(f"`steps` must lie in [1, {length - 1}], got {steps!r}.")
  start = length - steps
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, state)      # the caller's model gets no cache
  model.init_cache(batch_size, length)
  graphdef, cache0, params = nnx.split(model, nnx.Cache, ...)

  @jax.jit
  def prefill(cache, params, tokens):
    m = nnx.merge(graphdef, cache, params)
    m.prefill(tokens, threshold=0.0)
    return nnx.state(m, nnx.Cache)

  @jax.jit
  def step(cache, params, tokens, targets, lam):
    m = nnx.merge(graphdef, cache, params)
    logits, stats = m.decode_step(
        tokens, threshold=jnp.full(tokens.shape, lam, jnp.float32),
        num_splits=num_splits, return_stats=True)          # [b, vocab]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    skipped = jnp.stack([s.skipped_blocks.sum(-1) for s in stats])  # [L, b]
    visited = jnp.stack([s.visited_blocks.sum(-1) for s in stats])
    return (target_logp, jnp.argmax(logits, -1).astype(jnp.int32), skipped,
            visited, nnx.state(m, nnx.Cache))

  logprob = np.zeros((len(methods), n, steps), np.float32)
  argmax = np.zeros((len(methods), n, steps), np.int32)
  num_layers = len(model.blocks)
  skipped = np.zeros((len(methods), num_layers), np.float64)
  visited = np.zeros((len(methods), num_layers), np.float64)
  for lo in range(0, n, batch_size):
    batch = windows[lo:lo + batch_size]
    real = batch.shape[0]
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real,
                                               axis=0)])
    filled = prefill(cache0, params, jnp.asarray(batch[:, :start]))
    for j, method in enumerate(methods):
      cache = filled
      lam = jnp.float32(method["threshold"])
      for i in range(steps):
        lp, top, sk, vi, cache = step(
            cache, params, jnp.asarray(batch[:, start + i]),
            jnp.asarray(batch[:, start + i + 1]), lam)
        logprob[j, lo:lo + real, i] = np.asarray(lp)[:real]
        argmax[j, lo:lo + real, i] = np.asarray(top)[:real]
        skipped[j] += np.asarray(sk)[:, :real].sum(1)
        visited[j] += np.asarray(vi)[:, :real].sum(1)
      if progress is not None:
        progress.update()
  out = []
  _, dense_ppl = perplexity(logprob[0])
  for j, method in enumerate(methods):
    nll, ppl = perplexity(logprob[j])
    out.append({**method, "nll": nll, "perplexity": ppl,
                "delta_ppl_pct": (ppl / dense_ppl - 1.0) * 100.0,
                "top1_agreement": float(np.mean(argmax[j] == argmax[0])),
                "sparsity": float(skipped[j].sum() / max(visited[j].sum(), 1)),
                "sparsity_per_layer": (skipped[j] / np.maximum(visited[j], 1)
                                       ).tolist(),
                "steps": int(steps)})
  return out


# ------------------------------------------------------------------- passkey
@dataclasses.dataclass(frozen=True)
class PasskeySample:
  """A passkey-retrieval sequence of length + 1 tokens.

  Attributes:
    tokens: int32 [length + 1]: BOS, filler, needle, filler, question,
      answer; the model reads tokens[:-1] and is scored on tokens[1:].
    key: the pass key (digits).
    depth: requested needle depth in [0, 1] (fraction of the filler before
      the needle).
    needle_start: index in `tokens` of the needle's first token.
    needle_length: its number of tokens.
    answer_start: index in `tokens` of the key's first answer token.
    answer_length: the key's number of answer tokens.
  """

  tokens: np.ndarray
  key: str
  depth: float
  needle_start: int
  needle_length: int
  answer_start: int
  answer_length: int


def build_passkey(tokenizer, filler: np.ndarray, *, length: int,
                  depth: float, key: str, needle: str = NEEDLE,
                  question: str = QUESTION, answer: str = ANSWER
                  ) -> PasskeySample:
  """One passkey sequence: the needle at `depth` of real filler text.

  Args:
    tokenizer: with `encode(text) -> ids` and `bos_id`
      (`text_data.TextTokenizer`).
    filler: int [>= n] filler tokens; the first n are used, n = length -
      (BOS + needle + question + answer tokens).
    length: context length; the sample has length + 1 tokens.
    depth: in [0, 1]: round(depth * n) filler tokens precede the needle.
    key: the pass key.
    needle, question, answer: templates ("{key}" is replaced by the key);
      the sequence ends with the question then the answer.

  Returns:
    A `PasskeySample`.

  Raises:
    ValueError: for a depth outside [0, 1], or a length or filler too short.
  """
  needle_ids, question_ids, answer_ids = text_data.passkey_parts(
      tokenizer, key, needle=needle, question=question, answer=answer)
  tokens, needle_start, answer_start = text_data.insert_passkey(
      filler, bos_id=tokenizer.bos_id, needle_ids=needle_ids,
      question_ids=question_ids, answer_ids=answer_ids, length=length,
      depth=depth)
  return PasskeySample(
      tokens=tokens, key=key, depth=float(depth), needle_start=needle_start,
      needle_length=len(needle_ids), answer_start=answer_start,
      answer_length=len(answer_ids))


def passkey_samples(tokenizer, filler_stream: np.ndarray, *, length: int,
                    depths: Sequence[float], trials: int, seed: int = 0,
                    num_digits: int = 5) -> list[PasskeySample]:
  """Samples for every (trial, depth), deterministic in (seed, length).

  Trial t draws a random `num_digits`-digit key and a random stretch of
  `filler_stream` (from `np.random.default_rng([seed, length, t])`); the
  depths of one trial share key and filler.

  Args:
    tokenizer: as `build_passkey`.
    filler_stream: int [m] real text (e.g. the held-out documents
      concatenated, BOS tokens removed).
    length: context length.
    depths: needle depths in [0, 1].
    trials: samples per depth (>= 1).
    seed: the draw.
    num_digits: digits of the key (>= 1).

  Returns:
    [PasskeySample], trial-major (trial 0 at every depth, then trial 1...).

  Raises:
    ValueError: for `trials` or `num_digits` not a positive int, or as
      `build_passkey`.
  """
  if not isinstance(trials, (int, np.integer)) or trials < 1:
    raise ValueError(f"`trials` must be a positive int, got {trials!r}.")
  if not isinstance(num_digits, (int, np.integer)) or num_digits < 1:
    raise ValueError(f"`num_digits` must be a positive int, got "
                     f"{num_digits!r}.")
  filler_stream = np.asarray(filler_stream, np.int32)
  samples = []
  for t in range(trials):
    rng = np.random.default_rng([seed, length, t])
    key = str(int(rng.integers(10 ** (num_digits - 1), 10 ** num_digits)))
    offset = int(rng.integers(0, max(filler_stream.size - length, 0) + 1))
    for depth in depths:
      samples.append(build_passkey(tokenizer, filler_stream[offset:],
                                   length=length, depth=float(depth),
                                   key=key))
  return samples


def score_passkeys(samples: Sequence[PasskeySample], out: EvalOutput) -> dict:
  """Greedy exact match and mean key-token log-prob per sample.

  Args:
    samples: the `PasskeySample`s, in the order they were evaluated.
    out: `Evaluator.run(tokens[:, :-1], tokens[:, 1:])` of them.

  Returns:
    {"correct": bool [n], "logprob": f32 [n] (mean over the key's tokens)}.
  """
  correct, logprob = [], []
  for i, s in enumerate(samples):
    sl = slice(s.answer_start - 1, s.answer_start - 1 + s.answer_length)
    correct.append(bool(np.all(out.greedy[i, sl])))
    logprob.append(float(np.mean(out.logprob[i, sl])))
  return {"correct": np.asarray(correct), "logprob": np.asarray(logprob)}


def filler_stream(documents: Sequence[np.ndarray], bos_id: int) -> np.ndarray:
  """The documents concatenated without their BOS tokens.

  Args:
    documents: int [n_i] documents (`text_data.load_documents`), at least
      one.
    bos_id: the token removed.

  Returns:
    int32 [m] text for passkey filler.

  Raises:
    ValueError: for no documents (numpy's concatenate).
  """
  stream = np.concatenate([np.asarray(d, np.int32) for d in documents])
  return stream[stream != bos_id]


# ------------------------------------------------------------------- report
def summary_rows(results: dict) -> list[dict]:
  """One row per (length, method): the summary table of `format_summary`.

  Args:
    results: experiments/eval_sparsity.py's results ("lengths" records
      with "methods").

  Returns:
    [{"length", "method", "threshold", "sparsity" (combined: blocks whose
    P·V was not computed), "delta_ppl_pct", "perplexity", "retrieval"
    (accuracy or None)}].
  """
  rows = []
  for rec in results["lengths"]:
    for m in rec["methods"]:
      rows.append({
          "length": rec["length"], "method": m["label"],
          "threshold": m["threshold"], "sparsity": m["combined_sparsity"],
          "delta_ppl_pct": m["delta_ppl_pct"], "perplexity": m["perplexity"],
          "retrieval": m.get("retrieval", {}).get("accuracy")})
  return rows


def format_summary(results: dict) -> str:
  """The summary table and the answers, as printed text.

  Args:
    results: experiments/eval_sparsity.py's results with "summary"
      (`summary_rows`) and "answers" (`answer_questions`).

  Returns:
    The text: one row per (length, method), then each question and answer.
  """
  lines = [f"{'length':>6}  {'method':<24} {'λ':>8} {'sparsity':>8} "
           f"{'Δppl %':>8} {'ppl':>9} {'retrieval':>9}"]
  for r in results["summary"]:
    acc = "-" if r["retrieval"] is None else f"{r['retrieval']:.2f}"
    lines.append(f"{r['length']:>6}  {r['method']:<24} {r['threshold']:>8.2g} "
                 f"{r['sparsity']:>8.3f} {r['delta_ppl_pct']:>+8.2f} "
                 f"{r['perplexity']:>9.3f} {acc:>9}")
  lines.append("")
  for question, answer in results["answers"].items():
    lines.append(f"{question}\n  {answer}")
  return "\n".join(lines)


def _skip_curve(rec: dict) -> list[dict]:
  """Dense and the fixed-λ points of a length, by increasing λ."""
  return sorted((m for m in rec["methods"] if m["kind"] in ("dense", "skip")),
                key=lambda m: m["threshold"])


def sparsity_at_delta(points: Sequence[dict], delta_pct: float = 1.0
                      ) -> tuple[float | None, dict | None]:
  """Where |Δ perplexity| first reaches `delta_pct` along a λ sweep.

  Args:
    points: method records by increasing λ ("combined_sparsity",
      "delta_ppl_pct"), the first dense.
    delta_pct: the perplexity change, in %.

  Returns:
    (sparsity interpolated linearly in Δ between the last point below and
    the first at or above `delta_pct`, or None if never reached; the last
    point below `delta_pct`).
  """
  below = points[0]
  for p in points[1:]:
    d = abs(p["delta_ppl_pct"])
    if d >= delta_pct:
      d0 = abs(below["delta_ppl_pct"])
      w = (delta_pct - d0) / max(d - d0, 1e-12)
      s0, s1 = below["combined_sparsity"], p["combined_sparsity"]
      return s0 + w * (s1 - s0), below
    below = p
  return None, below


def answer_questions(results: dict, delta_pct: float = 1.0) -> dict:
  """Plain-text answers to the four questions of the evaluation.

  Args:
    results: experiments/eval_sparsity.py's results ("lengths").
    delta_pct: the perplexity change of the first question, in %.

  Returns:
    {question: answer}.
  """
  recs = results["lengths"]
  has_retrieval = all("retrieval" in m for r in recs for m in r["methods"])
  acc = lambda m: m["retrieval"]["accuracy"] if has_retrieval else None  # pylint: disable=g-long-lambda
  q1, q2 = [], []
  for rec in recs:
    curve = _skip_curve(rec)
    s, below = sparsity_at_delta(curve, delta_pct)
    if s is None:
      q1.append(f"{rec['length']}: not reached (largest sparsity "
                f"{curve[-1]['combined_sparsity']:.3f}, Δppl "
                f"{curve[-1]['delta_ppl_pct']:+.2f} %)")
    else:
      q1.append(f"{rec['length']}: {s:.3f}")
    if has_retrieval:
      q2.append(f"{rec['length']}: {acc(below):.2f} at {below['label']} "
                f"(sparsity {below['combined_sparsity']:.3f}, Δppl "
                f"{below['delta_ppl_pct']:+.2f} %) vs dense "
                f"{acc(curve[0]):.2f}")
  lengths = [r["length"] for r in recs]
  q3 = []
  for lam in sorted({m["threshold"] for r in recs for m in r["methods"]
                     if m["kind"] == "skip"}):
    s = [next((m["sparsity"] for m in r["methods"]
               if m["kind"] == "skip" and m["threshold"] == lam), np.nan)
         for r in recs]
    slope = (np.polyfit(np.log2(lengths), s, 1)[0]
             if len(lengths) > 1 and np.all(np.isfinite(s)) else np.nan)
    q3.append(f"λ={lam:.2g}: " + " → ".join(f"{x:.3f}" for x in s)
              + f" ({slope:+.3f} per doubling)")
  q4 = []
  for rec in recs:
    dense = rec["methods"][0]
    alone = {m["xattention_threshold"]: m for m in rec["methods"]
             if m["kind"] == "xattention"}
    for m in rec["methods"]:
      if m["kind"] != "xattention+skip":
        continue
      x = alone.get(m["xattention_threshold"])
      text = (f"{rec['length']} {m['label']}: sparsity "
              f"{m['combined_sparsity']:.3f}, Δppl {m['delta_ppl_pct']:+.2f} %")
      if x is not None:
        text += (f" (XAttn alone {x['combined_sparsity']:.3f}, "
                 f"{x['delta_ppl_pct']:+.2f} %)")
      if has_retrieval:
        text += f", retrieval {acc(m):.2f} vs dense {acc(dense):.2f}"
        if x is not None:
          text += f" / XAttn alone {acc(x):.2f}"
      q4.append(text)
  return {
      f"At what sparsity does perplexity move by {delta_pct:g} %?":
          "; ".join(q1),
      "Does retrieval hold there (largest λ within it)?":
          "; ".join(q2) if q2 else "retrieval not evaluated",
      "How does sparsity grow with context length "
      f"({' → '.join(map(str, lengths))})?": "; ".join(q3) or "no λ > 0",
      "Does XAttention + skip keep accuracy?":
          "; ".join(q4) or "XAttention not evaluated",
  }


def plot_results(results: dict, out_dir: str, *,
                 heatmap_threshold: float | None = None) -> list[str]:
  """Writes the evaluation's figures (PNG) into out_dir.

  tradeoff.png: Δ perplexity (%) against sparsity, a line per context
  length through dense and the λ sweep, calibrated targets (squares),
  XAttention (triangles) and XAttention + skip (diamonds).
  sparsity_by_layer.png: skip sparsity per layer, a line per λ, a panel per
  length. sparsity_per_head.png: layers x heads at `heatmap_threshold`
  (default the largest λ) per length. sparsity_vs_context.png: sparsity
  against length per λ (solid), target (dashed) and XAttention + skip
  (dotted). retrieval.png (with retrieval): accuracy, depth x length, a
  panel per method.

  Args:
    results: experiments/eval_sparsity.py's results ("lengths").
    out_dir: an existing folder.
    heatmap_threshold: λ of the per-head heatmap (nearest in log λ).

  Returns:
    The file names written.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from blasst_jax import plotting  # pylint: disable=g-import-not-at-top
  recs = results["lengths"]
  lengths = [r["length"] for r in recs]
  written = []

  def save(fig, name):
    plotting.save_figure(fig, os.path.join(out_dir, name))
    written.append(name)

  # Trade-off.
  fig = Figure(figsize=(7.5, 5))
  ax = fig.subplots()
  markers = {"target": "s", "xattention": "^", "xattention+skip": "D"}
  for i, rec in enumerate(recs):
    color = f"C{i}"
    curve = _skip_curve(rec)
    ax.plot([m["combined_sparsity"] for m in curve],
            [m["delta_ppl_pct"] for m in curve], "-o", color=color, ms=4,
            label=f"{rec['length']} tokens (λ sweep)")
    for kind, marker in markers.items():
      pts = [m for m in rec["methods"] if m["kind"] == kind]
      if pts:
        ax.scatter([m["combined_sparsity"] for m in pts],
                   [m["delta_ppl_pct"] for m in pts], marker=marker,
                   color=color, edgecolor="k", s=40, zorder=3,
                   label=kind if i == 0 else None)
  ax.axhline(1.0, color="gray", ls=":", lw=1)
  ax.set_yscale("symlog", linthresh=0.1)
  ax.set(xlabel="blocks not computed (skipped + XAttention-removed)",
         ylabel="Δ perplexity vs dense (%)", xlim=(-0.02, 1.02),
         title="Sparsity against held-out perplexity")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save(fig, "tradeoff.png")

  # Sparsity by layer.
  fig, axes = plotting._grid(len(recs))  # pylint: disable=protected-access
  for ax, rec in zip(axes, recs):
    for m in _skip_curve(rec)[1:]:
      ax.plot(np.arange(len(m["sparsity_per_layer"])),
              m["sparsity_per_layer"], "-o", ms=3, label=m["label"])
    ax.set(xlabel="layer", ylabel="block sparsity", ylim=(-0.02, 1.02),
           title=f"{rec['length']} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  save(fig, "sparsity_by_layer.png")

  # Per-head heatmap.
  fig, axes = plotting._grid(len(recs))  # pylint: disable=protected-access
  for ax, rec in zip(axes, recs):
    curve = _skip_curve(rec)
    m = curve[-1]
    if heatmap_threshold is not None:
      m = min(curve, key=lambda p: abs(np.log(max(p["threshold"], 1e-30))
                                       - np.log(heatmap_threshold)))
    data = np.asarray(m["sparsity_per_head"])
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set(xlabel="q head", ylabel="layer",
           title=f"{rec['length']} tokens, {m['label']}")
    fig.colorbar(im, ax=ax, label="block sparsity")
  save(fig, "sparsity_per_head.png")

  # Sparsity against context length.
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  labels = []
  for rec in recs:
    for m in rec["methods"]:
      if m["kind"] != "dense" and m["label"] not in labels:
        labels.append(m["label"])
  styles = {"skip": "-", "target": "--", "xattention": ":",
            "xattention+skip": ":"}
  for label in labels:
    ys, kind = [], None
    for rec in recs:
      m = next((m for m in rec["methods"] if m["label"] == label), None)
      ys.append(np.nan if m is None else m["combined_sparsity"])
      kind = kind or (m and m["kind"])
    ax.plot(lengths, ys, styles.get(kind, "-"), marker="o", ms=4,
            label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.set(xlabel="context length (tokens)", ylabel="blocks not computed",
         ylim=(-0.02, 1.02), title="Sparsity against context length")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  save(fig, "sparsity_vs_context.png")

  # Retrieval.
  if all("retrieval" in m for r in recs for m in r["methods"]):
    depths = recs[0]["retrieval_setup"]["depths"]
    method_labels = [m["label"] for m in recs[0]["methods"]]
    fig, axes = plotting._grid(len(method_labels), width=3.6, height=3.0)  # pylint: disable=protected-access
    for ax, label in zip(axes, method_labels):
      grid = np.full((len(depths), len(recs)), np.nan)
      for j, rec in enumerate(recs):
        m = next((m for m in rec["methods"] if m["label"] == label), None)
        if m is not None:
          grid[:, j] = m["retrieval"]["accuracy_by_depth"]
      ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
      for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
          ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
      ax.set_xticks(range(len(recs)), [str(n) for n in lengths])
      ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
      ax.set(xlabel="context length", ylabel="needle depth", title=label)
    fig.suptitle("Passkey retrieval: greedy exact match")
    save(fig, "retrieval.png")
  return written


# --------------------------------------------------------------------- runs
def load_eval_model(cfg, *, workdir: str | None = None
                    ) -> tuple[nnx.Module, dict, str, int]:
  """The model that an evaluation config names, and what it was trained on.

  Args:
    cfg: a configs/eval_sparsity.py config. With `random_init` a model is
      built from `cfg.model` and `cfg.train_seq_len` (q/k weights times
      `random_qk_scale`); otherwise the checkpoint `cfg.step` (-1: the
      latest) of the train_lm run in `workdir` is read. `cfg.implementation`
      and `cfg.block_q` (nonzero) override the layers' own.
    workdir: the run to read; default `cfg.workdir`. Ignored with
      `random_init`.

  Returns:
    (a `gpt.GPT`, a JSON record of the model: source, workdir, step, shape,
    parameter count..., the text dataset's folder, the trained sequence
    length).

  Raises:
    ValueError: for `random_init` without `data_dir`, a workdir without
      log.json or checkpoints, a run trained on synthetic tokens, or a
      `block_q` that is no power of two >= 16.
  """
  from experiments.lm import lm_checkpoint  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir = cfg.workdir if workdir is None else workdir
  if cfg.random_init:
    if not cfg.data_dir:
      raise ValueError("`random_init` needs `data_dir` (a folder written by "
                       "experiments/prepare_text.py).")
    train_cfg = ml_collections.ConfigDict(dict(
        model=cfg.model.to_dict(), seq_len=cfg.train_seq_len, seed=cfg.seed,
        data=dict(kind="text", data_dir=cfg.data_dir)))
    model = lm_checkpoint.build_model(train_cfg)
    if cfg.random_qk_scale != 1.0:
      # Sharper random attention (score std grows by scale**2): a random
      # model otherwise attends near uniformly and skips nothing.
      for block in model.blocks:
        for proj in (block.attn.q_proj, block.attn.k_proj):
          proj.kernel[...] = proj.kernel[...] * cfg.random_qk_scale
    record = {"source": "random_init", "seed": cfg.seed,
              "random_qk_scale": cfg.random_qk_scale}
    data_dir, seq_len = cfg.data_dir, cfg.train_seq_len
  else:
    model, train_cfg, step = lm_checkpoint.load_run(
        workdir, step=None if cfg.step < 0 else cfg.step,
        data_dir=cfg.data_dir or None)
    if lm_checkpoint.data_kind(train_cfg) != "text":
      raise ValueError(f"The run in `workdir` {workdir!r} trained on "
                       "synthetic tokens: evaluate a run of "
                       "configs/lm_small.py (real text).")
    record = {"source": "checkpoint", "workdir": os.path.abspath(workdir),
              "step": step, "trained_threshold": trained_threshold(workdir)}
    data_dir, seq_len = train_cfg.data.data_dir, train_cfg.seq_len
  rows = cfg.get("block_q", 0)
  if rows:   # 0: the run's tiles; else the kernels' block-size rule
    config_lib.effective_block_sizes(1, 1, rows, None)
  for block in model.blocks:
    if cfg.implementation is not None:
      block.attn.implementation = cfg.implementation
    if rows:
      # Shorter tiles: a block is skipped when all of its rows agree, so
      # fewer rows per tile skip more (decode has one row per head).
      block.attn.block_q = rows
  m = train_cfg.model
  block_q, block_kv = model_tiles(model)
  record.update(
      trained_seq_len=int(seq_len), num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, d_model=m.d_model,
      block_q=block_q, block_kv=block_kv, trained_block_q=m.block_q,
      dtype=m.dtype,
      position=m.get("position", "learned"),
      implementation=cfg.implementation or "auto",
      num_params=int(sum(x.size for x in jax.tree.leaves(
          nnx.state(model, nnx.Param)))))
  return model, record, data_dir, int(seq_len)


def methods_for(cfg, calibrated: dict, *,
                thresholds: Sequence[float] | None = None) -> list[dict]:
  """The methods evaluated at one context length, dense first.

  Args:
    cfg: a configs/eval_sparsity.py config (`xattention`).
    calibrated: {target sparsity: `calibrate_thresholds` record}; those
      with a "threshold" become "target" methods.
    thresholds: the λ sweep (0 is dense, duplicates dropped); default
      `cfg.thresholds`.

  Returns:
    [{"label", "kind" ("dense", "skip", "target", "xattention" or
    "xattention+skip"), "threshold" (λ), "xattention_threshold" (τ or
    None), "target_sparsity" (or None)}].
  """
  # Two significant digits: 0.97 must not print as 1e+00.
  fmt = lambda lam: f"{lam:.2g}"  # pylint: disable=g-long-lambda
  thresholds = cfg.thresholds if thresholds is None else thresholds
  methods = [dict(label="dense", kind="dense", threshold=0.0,
                  xattention_threshold=None, target_sparsity=None)]
  for lam in sorted(set(float(x) for x in thresholds) - {0.0}):
    methods.append(dict(label=f"λ={fmt(lam)}", kind="skip", threshold=lam,
                        xattention_threshold=None, target_sparsity=None))
  for target, rec in calibrated.items():
    if "threshold" in rec:
      methods.append(dict(label=f"target {target:.0%}", kind="target",
                          threshold=rec["threshold"],
                          xattention_threshold=None, target_sparsity=target))
  for tau in cfg.xattention.thresholds:
    methods.append(dict(label=f"XAttn τ={tau:g}", kind="xattention",
                        threshold=0.0, xattention_threshold=float(tau),
                        target_sparsity=None))
    for lam in cfg.xattention.skip_thresholds:
      methods.append(dict(label=f"XAttn τ={tau:g} + λ={fmt(lam)}",
                          kind="xattention+skip", threshold=float(lam),
                          xattention_threshold=float(tau),
                          target_sparsity=None))
  return methods


def fingerprint(tokens: np.ndarray | None) -> str | None:
  """A short SHA-1 of an int token array (its shape and int32 values).

  Two runs evaluated on the same windows or passkeys share it.

  Args:
    tokens: int array of any shape, or None.

  Returns:
    16 hex characters, or None for None.
  """
  if tokens is None:
    return None
  tokens = np.ascontiguousarray(tokens, np.int32)
  h = hashlib.sha1(repr(tokens.shape).encode())
  h.update(tokens.tobytes())
  return h.hexdigest()[:16]


def evaluate_length(cfg, model, length: int, *, trained_len: int,
                    heldout: Sequence[np.ndarray],
                    train_docs: Sequence[np.ndarray], tokenizer,
                    filler: np.ndarray,
                    thresholds: Sequence[float] | None = None) -> dict:
  """Every method of `methods_for` at one context length.

  Perplexity windows (`perplexity_windows` with the config's
  `window_source`, `documents_from`, `max_windows`) and passkeys (seeded by
  `cfg.retrieval.seed` and the length) depend only on the text, so every
  model evaluated with the same config and data sees the same ones (the
  record's "windows_sha1" and "passkeys_sha1" say so).

  Args:
    cfg: a configs/eval_sparsity.py config.
    model: a `gpt.GPT`; with RoPE its scale is set to max(1, length /
      trained_len).
    length: the context length.
    trained_len: the sequence length the model was trained at.
    heldout, train_docs: int [n_i] documents of the held-out and training
      splits (training text only calibrates the target sparsities).
    tokenizer: the dataset's `text_data.TextTokenizer`.
    filler: int32 [m] held-out text for passkeys (`filler_stream`).
    thresholds: the λ sweep; default `cfg.thresholds`.

  Returns:
    A "lengths" record of results.json: {"length", "rope_scale",
    "window_source", "num_windows", "tokens", "windows_sha1",
    "passkeys_sha1", "calibration", "methods" (each with "nll",
    "perplexity", "delta_ppl_pct", the `block_sparsity` fields and, with
    retrieval, "retrieval"), timings, "retrieval_setup"}.

  Raises:
    ValueError: for a length past a learned position table.
  """
  rope_scale = max(1.0, length / trained_len)
  if model.position == "rope":
    model.set_rope_scale(rope_scale)
  elif length > trained_len:
    raise ValueError(f"Context length {length} exceeds the learned position "
                     f"table ({trained_len}): drop it from `context_lengths`.")
  windows, source = perplexity_windows(
      heldout, length, source=cfg.window_source,
      documents_from=cfg.documents_from, max_windows=cfg.max_windows)
  record = {"length": int(length), "rope_scale": rope_scale,
            "window_source": source, "num_windows": int(windows.shape[0]),
            "tokens": int(windows.shape[0] * length),
            "windows_sha1": fingerprint(windows)}
  t0 = time.perf_counter()
  calibrated = {}
  if cfg.target_sparsities:
    cal_windows, _ = perplexity_windows(
        train_docs, length, source="stream",
        max_windows=cfg.calibration_windows)
    calibrated = calibrate_thresholds(
        model, cal_windows, cfg.target_sparsities, length=length)
  record["calibration"] = {f"{t:g}": r for t, r in calibrated.items()}
  record["calibration_seconds"] = time.perf_counter() - t0
  samples = []
  if cfg.retrieval.enabled:
    r = cfg.retrieval
    samples = passkey_samples(
        tokenizer, filler, length=length, depths=r.depths, trials=r.trials,
        seed=r.seed, num_digits=r.num_digits)
  passkey_tokens = np.stack([s.tokens for s in samples]) if samples else None
  record["passkeys_sha1"] = fingerprint(passkey_tokens)
  batch = max(1, cfg.tokens_per_batch // length)
  evaluator = Evaluator(model, batch_size=batch, xattention=(
      XAttentionOptions(block_size=cfg.xattention.block_size,
                        stride=cfg.xattention.stride)
      if cfg.xattention.thresholds else None))
  methods = methods_for(cfg, calibrated, thresholds=thresholds)
  n_batches = -(-windows.shape[0] // batch) + (
      -(-len(samples) // batch) if samples else 0)
  bar = ProgressBar(len(methods) * n_batches, desc=f"length {length}",
                    enabled=cfg.progress)
  t0 = time.perf_counter()
  dense_ppl = dense_argmax = None
  for method in methods:
    kw = dict(threshold=method["threshold"],
              xattention_threshold=method["xattention_threshold"],
              progress=bar)
    out = evaluator.run(windows[:, :-1], windows[:, 1:], **kw)
    nll, ppl = perplexity(out.logprob)
    if dense_ppl is None:
      dense_ppl, dense_argmax = ppl, out.argmax   # methods[0] is dense
    method.update(nll=nll, perplexity=ppl,
                  delta_ppl_pct=(ppl / dense_ppl - 1.0) * 100.0,
                  top1_agreement=float(np.mean(out.argmax == dense_argmax)),
                  **block_sparsity(out))
    if samples:
      pk = evaluator.run(passkey_tokens[:, :-1], passkey_tokens[:, 1:], **kw)
      scores = score_passkeys(samples, pk)
      depths = np.array([s.depth for s in samples])
      method["retrieval"] = {
          "accuracy": float(scores["correct"].mean()),
          "mean_logprob": float(scores["logprob"].mean()),
          "accuracy_by_depth": [float(scores["correct"][depths == d].mean())
                                for d in cfg.retrieval.depths],
          "logprob_by_depth": [float(scores["logprob"][depths == d].mean())
                               for d in cfg.retrieval.depths],
          "sparsity": block_sparsity(pk)["combined_sparsity"],
          "keys": [s.key for s in samples[::len(cfg.retrieval.depths)]],
      }
  bar.close()
  record["eval_seconds"] = time.perf_counter() - t0
  record["methods"] = methods
  if samples:
    record["retrieval_setup"] = {
        "depths": list(cfg.retrieval.depths), "trials": cfg.retrieval.trials,
        "needle": NEEDLE, "question": QUESTION,
        "needle_positions": [s.needle_start for s in samples]}
  return record


def evaluate_run(cfg, *, workdir: str | None = None,
                 output_dir: str | None = None,
                 thresholds: Sequence[float] | None = None,
                 device: dict | None = None, verbose: bool = True) -> dict:
  """One model at every context length of the config: results.json.

  Args:
    cfg: a configs/eval_sparsity.py config.
    workdir: the train_lm run; default `cfg.workdir` (see
      `load_eval_model`).
    output_dir: where results.json and the PNGs of `plot_results` go (made
      if missing); None writes nothing.
    thresholds: the λ sweep; default `cfg.thresholds`.
    device: {"device_kind", "jax_version"} (`testing.announce_device`) for
      the record.
    verbose: print a line per context length.

  Returns:
    The results: device fields, "config", "model", "data", "lengths" (see
    `evaluate_length`), "summary" (`summary_rows`), "answers"
    (`answer_questions`), "plots" (file names, with output_dir) and
    "seconds".

  Raises:
    ValueError: as `load_eval_model` and `evaluate_length`.
  """
  t_start = time.time()
  model, model_record, data_dir, trained_len = load_eval_model(
      cfg, workdir=workdir)
  heldout = text_data.load_documents(data_dir, "heldout")
  train_docs = text_data.load_documents(data_dir, "train")
  tokenizer = text_data.load_tokenizer(data_dir)
  filler = filler_stream(heldout, tokenizer.bos_id)
  if verbose:
    where = model_record.get("workdir", model_record["source"])
    print(f"model: {where}, {model_record['num_params']:,} params, trained "
          f"at {trained_len} tokens; held out: {len(heldout)} documents, "
          f"{sum(d.size for d in heldout):,} tokens", flush=True)
  lengths = []
  for length in cfg.context_lengths:
    rec = evaluate_length(
        cfg, model, int(length), trained_len=trained_len, heldout=heldout,
        train_docs=train_docs, tokenizer=tokenizer, filler=filler,
        thresholds=thresholds)
    lengths.append(rec)
    if verbose:
      print(f"length {length}: {rec['num_windows']} windows "
            f"({rec['window_source']}), dense ppl "
            f"{rec['methods'][0]['perplexity']:.3f}, "
            f"{rec['eval_seconds']:.1f} s", flush=True)
  config = cfg.to_dict()
  if thresholds is not None:
    config["thresholds"] = sorted(set(float(x) for x in thresholds))
  results = {**(device or {}), "config": config, "model": model_record,
             "data": {"data_dir": os.path.abspath(data_dir),
                      "heldout_documents": len(heldout),
                      "heldout_tokens": int(sum(d.size for d in heldout))},
             "lengths": lengths}
  results["summary"] = summary_rows(results)
  results["answers"] = answer_questions(results)
  results["plots"] = []
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    results["plots"] = plot_results(results, output_dir,
                                    heatmap_threshold=cfg.heatmap_threshold)
  results["seconds"] = time.time() - t_start
  if output_dir:
    with open(os.path.join(output_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
  return results


# --------------------------------------------------------------- comparison
# The runs of a train_lm finetune root, in comparison order: the first is
# the reference (dense training continued as long as the fine-tune).
FINETUNE_RUNS = ("dense_control", "finetune", "dense")


def parse_run_specs(specs) -> list[tuple[str, str]]:
  """(label, workdir) pairs from "label=path" strings or a mapping.

  Args:
    specs: a sequence of "label=path" strings (a single string may hold
      several, comma-separated), or a mapping {label: path} (e.g. a
      ConfigDict); the order is kept, the first run is the reference.

  Returns:
    [(label, path)].

  Raises:
    ValueError: for an entry without "=", an empty label or path, a label
      that is not a plain folder name, or a label given twice.
  """
  if hasattr(specs, "items"):
    pairs = [(str(k), str(v)) for k, v in specs.items()]
  else:
    if isinstance(specs, str):
      specs = [specs]
    pairs = []
    for spec in specs:
      for item in str(spec).split(","):
        item = item.strip()
        if not item:
          continue
        label, sep, path = item.partition("=")
        if not sep:
          raise ValueError(
              f"`compare_workdirs` entry {item!r} has no '=': write "
              "'label=path', e.g. 'finetune=lm_output/finetune'.")
        pairs.append((label.strip(), path.strip()))
  seen = set()
  for label, path in pairs:
    if not label or not path:
      raise ValueError(f"`compare_workdirs` entry {label!r}={path!r} needs "
                       "both a label and a path ('label=path').")
    if (label in (".", "..") or "/" in label or os.sep in label
        or label.startswith(".")):
      raise ValueError(f"`compare_workdirs` label {label!r} names a folder "
                       "under output_dir: use a plain name such as "
                       "'finetune'.")
    if label in seen:
      raise ValueError(f"`compare_workdirs` gives the label {label!r} twice: "
                       "labels must be unique.")
    seen.add(label)
  return pairs


def finetune_runs(root: str, runs: Sequence[str] = FINETUNE_RUNS
                  ) -> list[tuple[str, str]] | None:
  """The runs of a train_lm finetune root, or None if root is not one.

  experiments/train_lm.py in finetune mode (without `init_from`) trains
  root/dense, fine-tunes it with skip-softmax into root/finetune and
  continues it dense into root/dense_control.

  Args:
    root: a folder.
    runs: the sub-runs to compare, in order (the first is the reference).

  Returns:
    [(name, root/name)] for the names of `runs`, when root holds no
    log.json of its own and root/finetune and root/dense_control both hold
    one; else None.

  Raises:
    ValueError: if root is a finetune root but lacks a run of `runs`.
  """
  from experiments.lm import lm_checkpoint  # pylint: disable=g-import-not-at-top
  has_log = lambda d: os.path.isfile(os.path.join(d, lm_checkpoint.LOG_FILE))  # pylint: disable=g-long-lambda
  if has_log(root) or not all(has_log(os.path.join(root, name))
                              for name in ("finetune", "dense_control")):
    return None
  missing = [n for n in runs if not has_log(os.path.join(root, n))]
  if missing:
    raise ValueError(f"The finetune root {root!r} has no run {missing}: "
                     f"set `finetune_runs` to some of {FINETUNE_RUNS}.")
  return [(name, os.path.join(root, name)) for name in runs]


def trained_threshold(workdir: str) -> float | None:
  """The λ a train_lm run trained with, at its trained length.

  Args:
    workdir: the run (its log.json).

  Returns:
    The fixed λ, or scale factor / seq_len for a calibrated run; None for a
    dense run or a log without a threshold record.
  """
  from experiments.lm import lm_checkpoint  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, lm_checkpoint.LOG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    log = json.load(f)
  record = log.get("threshold") or {}
  if "scale_factor" in record:
    lam = float(record["scale_factor"]) / float(log["config"]["seq_len"])
  else:
    lam = float(record.get("threshold", 0.0))
  return lam if 0.0 < lam < 1.0 else None


def compare_runs(results: dict) -> dict:
  """Sparsity, perplexity and retrieval of several runs at equal λ.

  Args:
    results: {label: the results of `evaluate_run`}, the reference first,
      all evaluated with one config (context lengths, λ sweep, windows,
      passkeys).

  Returns:
    {"reference": the first label, "runs": [{"label", "source", "workdir",
    "step", "trained_threshold", "trained_seq_len"}], "thresholds": the
    λ sweep (0 = dense first), "lengths": [{"length", "num_windows",
    "window_source", "windows_sha1", "passkeys_sha1", "runs": {label:
    {"dense_perplexity", "sparsity", "combined_sparsity",
    "sparsity_per_layer", "perplexity", "delta_ppl_pct" (vs the run's own
    dense), "delta_ppl_vs_reference_pct" (vs the reference's dense),
    "retrieval" (accuracy per λ, or None), "retrieval_logprob"}}, each
    list over "thresholds"}], "table": one row per (length, λ) with "runs"
    {label: {"sparsity", "perplexity", "delta_ppl_pct",
    "delta_ppl_vs_reference_pct", "retrieval"}}}.

  Raises:
    ValueError: for no runs, or runs evaluated at different lengths, λ,
      windows or passkeys.
  """
  labels = list(results)
  if not labels:
    raise ValueError("`results` is empty: compare at least one run.")
  ref = labels[0]
  lengths = [r["length"] for r in results[ref]["lengths"]]
  for label in labels[1:]:
    other = [r["length"] for r in results[label]["lengths"]]
    if other != lengths:
      raise ValueError(f"Run {label!r} was evaluated at lengths {other}, "
                       f"{ref!r} at {lengths}: evaluate them with one config.")
  out_lengths, table, thresholds = [], [], None
  for i, length in enumerate(lengths):
    recs = {label: results[label]["lengths"][i] for label in labels}
    for key in ("windows_sha1", "passkeys_sha1", "num_windows"):
      values = {label: rec.get(key) for label, rec in recs.items()}
      if len(set(values.values())) > 1:
        raise ValueError(
            f"At length {length} the runs saw different {key}: {values}. "
            "Compare runs of one text dataset (set `data_dir` to override).")
    curves = {label: _skip_curve(rec) for label, rec in recs.items()}
    lams = [m["threshold"] for m in curves[ref]]
    for label, curve in curves.items():
      if [m["threshold"] for m in curve] != lams:
        raise ValueError(
            f"Run {label!r} was evaluated at λ "
            f"{[m['threshold'] for m in curve]}, {ref!r} at {lams}: "
            "evaluate them with one `thresholds`.")
    thresholds = thresholds or lams
    ref_dense = curves[ref][0]["perplexity"]
    runs = {}
    for label, curve in curves.items():
      has_ret = all("retrieval" in m for m in curve)
      runs[label] = {
          "dense_perplexity": curve[0]["perplexity"],
          "sparsity": [m["sparsity"] for m in curve],
          "combined_sparsity": [m["combined_sparsity"] for m in curve],
          "sparsity_per_layer": [m["sparsity_per_layer"] for m in curve],
          "perplexity": [m["perplexity"] for m in curve],
          "delta_ppl_pct": [m["delta_ppl_pct"] for m in curve],
          "delta_ppl_vs_reference_pct": [
              (m["perplexity"] / ref_dense - 1.0) * 100.0 for m in curve],
          "retrieval": ([m["retrieval"]["accuracy"] for m in curve]
                        if has_ret else None),
          "retrieval_logprob": ([m["retrieval"]["mean_logprob"]
                                 for m in curve] if has_ret else None),
      }
    rec0 = recs[ref]
    out_lengths.append({
        "length": length, "num_windows": rec0["num_windows"],
        "window_source": rec0["window_source"],
        "windows_sha1": rec0.get("windows_sha1"),
        "passkeys_sha1": rec0.get("passkeys_sha1"), "thresholds": lams,
        "runs": runs})
    for j, lam in enumerate(lams):
      table.append({"length": length, "threshold": lam, "runs": {
          label: {k: (None if r[k] is None else r[k][j]) for k in (
              "sparsity", "perplexity", "delta_ppl_pct",
              "delta_ppl_vs_reference_pct", "retrieval")}
          for label, r in runs.items()}})
  run_records = []
  for label in labels:
    m = results[label]["model"]
    run_records.append({
        "label": label, "source": m["source"], "workdir": m.get("workdir"),
        "step": m.get("step"), "trained_threshold": m.get(
            "trained_threshold"), "trained_seq_len": m["trained_seq_len"]})
  return {"reference": ref, "runs": run_records, "thresholds": thresholds,
          "lengths": out_lengths, "table": table}


def format_comparison(comparison: dict) -> str:
  """The table of `compare_runs` as printed text.

  One row per (length, λ); per run its skip sparsity, perplexity and Δ
  perplexity (%) against the reference run's dense perplexity, then the
  dense perplexity of every run per length.

  Args:
    comparison: the output of `compare_runs`.

  Returns:
    The text.
  """
  labels = [r["label"] for r in comparison["runs"]]
  ref = comparison["reference"]
  width = max(28, *(len(x) + 1 for x in labels))
  head = f"{'length':>6} {'λ':>8}" + "".join(
      f"{label:>{width}}" for label in labels)
  sub = f"{'':>6} {'':>8}" + "".join(
      f"{'sparsity':>8} {'ppl':>9} {'Δ% ref':>8}".rjust(width)
      for _ in labels)
  lines = [f"Equal-λ comparison (Δ% ref: vs the dense perplexity of "
           f"{ref!r}):", head, sub]
  for row in comparison["table"]:
    cells = []
    for label in labels:
      r = row["runs"][label]
      cells.append(f"{r['sparsity']:8.3f} {r['perplexity']:9.3f} "
                   f"{r['delta_ppl_vs_reference_pct']:+8.2f}".rjust(width))
    lines.append(f"{row['length']:>6} {row['threshold']:>8.2g}"
                 + "".join(cells))
  trained = [f"{r['label']} λ={r['trained_threshold']:.3g}"
             for r in comparison["runs"] if r["trained_threshold"]]
  if trained:
    lines.append("trained with skip-softmax: " + ", ".join(trained))
  for rec in comparison["lengths"]:
    lines.append(f"dense perplexity at {rec['length']}: " + ", ".join(
        f"{label} {rec['runs'][label]['dense_perplexity']:.3f}"
        for label in labels))
  return "\n".join(lines)


def plot_comparison(comparison: dict, out_dir: str) -> list[str]:
  """Writes comparison.png (the runs of `compare_runs` against λ) to out_dir.

  Panels: skip sparsity, Δ perplexity vs each run's own dense, Δ
  perplexity vs the reference run's dense and (when evaluated) passkey
  retrieval, each against λ (dense drawn at the symlog origin). Color:
  run; line style: context length.

  Args:
    comparison: the output of `compare_runs`.
    out_dir: an existing folder.

  Returns:
    ["comparison.png"].
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  from blasst_jax import plotting  # pylint: disable=g-import-not-at-top
  labels = [r["label"] for r in comparison["runs"]]
  ref = comparison["reference"]
  recs = comparison["lengths"]
  has_ret = all(rec["runs"][label]["retrieval"] is not None
                for rec in recs for label in labels)
  panels = [("sparsity", "skip sparsity (blocks)", "Sparsity at equal λ"),
            ("delta_ppl_pct", "Δ perplexity vs own dense (%)",
             "Δ perplexity, each run vs its dense"),
            ("delta_ppl_vs_reference_pct",
             f"Δ perplexity vs {ref} dense (%)",
             f"Δ perplexity vs the dense perplexity of {ref}")]
  if has_ret:
    panels.append(("retrieval", "passkey exact match", "Retrieval"))
  fig = Figure(figsize=(5.2 * 2, 3.9 * (-(-len(panels) // 2))))
  axes = np.atleast_1d(fig.subplots(-(-len(panels) // 2), 2).ravel())
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  styles = ["-", "--", ":", "-."]
  positive = [t for t in comparison["thresholds"] if t > 0]
  linthresh = min(positive) if positive else 1e-3
  for ax, (key, ylabel, title) in zip(axes, panels):
    for j, rec in enumerate(recs):
      for i, label in enumerate(labels):
        ax.plot(rec["thresholds"], rec["runs"][label][key],
                styles[j % len(styles)], color=f"C{i}", marker="o", ms=3)
    ax.set_xscale("symlog", linthresh=linthresh)
    if key.startswith("delta"):
      ax.axhline(1.0, color="gray", ls=":", lw=1)
      ax.set_yscale("symlog", linthresh=0.1)
    elif key in ("sparsity", "retrieval"):
      ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel="λ (0 = dense)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
  handles = [Line2D([], [], color=f"C{i}", label=label)
             for i, label in enumerate(labels)]
  handles += [Line2D([], [], color="gray", ls=styles[j % len(styles)],
                     label=f"{rec['length']} tokens")
              for j, rec in enumerate(recs)]
  axes[0].legend(handles=handles, fontsize=7)
  plotting.save_figure(fig, os.path.join(out_dir, "comparison.png"))
  return ["comparison.png"]


def evaluate_and_compare(cfg, runs: Sequence[tuple[str, str]], output_dir: str,
                         *, device: dict | None = None,
                         verbose: bool = True) -> dict:
  """Evaluates several runs with one config and compares them at equal λ.

  Every run sees the same context lengths, windows, passkeys and λ sweep:
  `cfg.thresholds` plus (with `cfg.include_trained_threshold`) the λ each
  run trained with (`trained_threshold`).

  Args:
    cfg: a configs/eval_sparsity.py config (not `random_init`).
    runs: [(label, workdir)], the reference first (`parse_run_specs`,
      `finetune_runs`).
    output_dir: receives <label>/results.json and PNGs per run, plus
      comparison.json and comparison.png.
    device: as `evaluate_run`.
    verbose: print progress lines.

  Returns:
    The comparison (`compare_runs`) with "plots", "thresholds_added" (the
    trained λ put into the sweep) and "outputs" ({label: results.json
    path}).

  Raises:
    ValueError: for no runs, `random_init`, or as `evaluate_run` and
      `compare_runs`.
  """
  if not runs:
    raise ValueError("`runs` is empty: give at least one (label, workdir).")
  if cfg.random_init:
    raise ValueError("Comparing runs reads checkpoints: set "
                     "`random_init=False`.")
  thresholds = [float(x) for x in cfg.thresholds]
  added = []
  if cfg.get("include_trained_threshold", True):
    for _, workdir in runs:
      lam = trained_threshold(workdir)
      if lam is not None and all(abs(lam - t) > 1e-12 * max(lam, t)
                                 for t in thresholds):
        thresholds.append(lam)
        added.append(lam)
  results, outputs = {}, {}
  for label, workdir in runs:
    if verbose:
      print(f"--- {label}: {workdir}", flush=True)
    sub = os.path.join(output_dir, label)
    results[label] = evaluate_run(cfg, workdir=workdir, output_dir=sub,
                                  thresholds=thresholds, device=device,
                                  verbose=verbose)
    outputs[label] = os.path.join(sub, "results.json")
  comparison = {**(device or {}), **compare_runs(results)}
  comparison["thresholds_added"] = added
  comparison["outputs"] = outputs
  os.makedirs(output_dir, exist_ok=True)
  comparison["plots"] = plot_comparison(comparison, output_dir)
  with open(os.path.join(output_dir, "comparison.json"), "w") as f:
    json.dump(comparison, f, indent=1)
  return comparison


def comparison_runs(cfg) -> list[tuple[str, str]] | None:
  """The runs an evaluation config asks to compare, or None for one run.

  Args:
    cfg: a configs/eval_sparsity.py config: `compare_workdirs` ("label=path"
      strings or a mapping) when set; else, with `compare_finetune` and
      `workdir` a train_lm finetune root, its `finetune_runs`.

  Returns:
    [(label, workdir)], the reference first; None to evaluate `workdir`
    (or the random-init model) alone.

  Raises:
    ValueError: for malformed `compare_workdirs` (`parse_run_specs`),
      together with `random_init`, or a finetune root lacking a run.
  """
  specs = cfg.get("compare_workdirs", ())
  if specs:
    if cfg.random_init:
      raise ValueError("`compare_workdirs` reads checkpoints: set "
                       "`random_init=False`.")
    return parse_run_specs(specs)
  if cfg.random_init or not cfg.get("compare_finetune", True):
    return None
  return finetune_runs(cfg.workdir, tuple(cfg.get("finetune_runs",
                                                  FINETUNE_RUNS)))
