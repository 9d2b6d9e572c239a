"""Text generation with a KV cache: jitted prefill, jitted one-token steps.

    out = generate(model, [tok.encode("Once upon a time")], max_new_tokens=40,
                   threshold=0.1, temperature=0.7, top_p=0.9)
    print(tok.decode(out.tokens[0, :out.lengths[0]]))

`Generator` exposes the two compiled steps (prefill, decode step) so that
benchmarks can time time-to-first-token and time-per-output-token.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import config as config_lib
from blasst_jax.config import SkipSoftmaxConfig
from blasst_jax.models.llama import Llama

__all__ = ["GenerationOutput", "Generator", "generate", "sample_next",
           "pad_prompts"]


def sample_next(logits, key, *, temperature: float = 0.0,
                top_p: float = 1.0):
  """Next tokens from logits [batch, vocab]: greedy or top-p sampling.

  Args:
    logits: f32 [batch, vocab].
    key: a PRNG key (unused when greedy).
    temperature: 0 is greedy (argmax); > 0 divides the logits.
    top_p: nucleus mass in (0, 1]: sample among the most likely tokens
      whose cumulative probability first reaches top_p.

  Returns:
    int32 [batch].
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]            # [b, vocab]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs             # mass above each
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pad_prompts(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into int32 [batch, max_len] and their lengths.

  Args:
    prompts: int [batch, len] array, or a list of non-empty int sequences.
    pad_id: the filler id (never attended to).

  Raises:
    ValueError: for an empty batch or an empty prompt.
  """
  if isinstance(prompts, (np.ndarray, jax.Array)):
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
      raise ValueError(f"`prompts` must be int [batch, len] with batch, len "
                       f">= 1, got shape {prompts.shape}.")
    return (prompts.astype(np.int32),
            np.full((prompts.shape[0],), prompts.shape[1], np.int32))
  prompts = [list(p) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("`prompts` must hold at least one non-empty token list.")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), lengths.max()), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


@dataclasses.dataclass(frozen=True)
class _StepOptions:
  """What the compiled steps close over (hashable: a static jit argument)."""

  threshold: object
  decode_threshold: object
  temperature: float
  top_p: float
  num_splits: int | None
  max_mode: str | None
  return_stats: bool


def _static_threshold(threshold, name: str):
  """A float λ or a SkipSoftmaxConfig (compiled in: one build per value)."""
  if isinstance(threshold, SkipSoftmaxConfig):
    return threshold
  config_lib.check_threshold(threshold)
  if np.ndim(threshold):
    raise ValueError(f"`{name}` must be a float or a SkipSoftmaxConfig for "
                     f"generation, got shape {np.shape(threshold)}.")
  return float(threshold)


def _counts(stats, options: _StepOptions) -> tuple:
  """(skipped, visited) blocks summed over layers, or () without stats."""
  if not options.return_stats:
    return ()
  return (sum(jnp.sum(s.skipped_blocks) for s in stats),
          sum(jnp.sum(s.visited_blocks) for s in stats))


def _sample(logits, key, options: _StepOptions):
  return sample_next(logits, key, temperature=options.temperature,
                     top_p=options.top_p)


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("graphdef", "options"))
def _prefill(cache, params, tokens, lengths, key, *, graphdef, options):
  m = nnx.merge(graphdef, cache, params)
  result = m.prefill(tokens, lengths=lengths, threshold=options.threshold,
                     return_stats=options.return_stats)
  logits, stats = result if options.return_stats else (result, None)
  return ((_sample(logits, key, options),) + _counts(stats, options),
          nnx.state(m, nnx.Cache))


def _step_body(cache, params, tokens, key, graphdef, options):
  m = nnx.merge(graphdef, cache, params)
  result = m.decode_step(tokens, threshold=options.decode_threshold,
                         num_splits=options.num_splits,
                         max_mode=options.max_mode,
                         return_stats=options.return_stats)
  logits, stats = result if options.return_stats else (result, None)
  return ((_sample(logits, key, options),) + _counts(stats, options),
          nnx.state(m, nnx.Cache))


_step = jax.jit(_step_body, donate_argnums=0,
                static_argnames=("graphdef", "options"))


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("graphdef", "options", "steps"))
def _loop(cache, params, tokens, key, *, graphdef, options, steps):
  """`steps` decode steps in one lax.scan: int32 [batch, steps]."""
  def body(carry, k):
    cache, tok = carry
    out, cache = _step_body(cache, params, tok, k, graphdef, options)
    return (cache, out[0]), out[0]

  (cache, _), toks = jax.lax.scan(body, (cache, tokens),
                                  jax.random.split(key, steps))
  return toks.T, cache


@dataclasses.dataclass
class GenerationOutput:
  """Generated tokens.

  Attributes:
    tokens: int32 [batch, max_new_tokens]; after a sequence's EOS the rest
      repeats EOS.
    lengths: int32 [batch]: tokens up to and including the first EOS (or
      max_new_tokens).
    stats: with `return_stats`, {"prefill_sparsity", "decode_sparsity"}:
      skipped / visited blocks pooled over layers, heads and steps.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  stats: dict | None = None


class Generator:
  """A model's compiled prefill and decode step over a KV cache.

  The model's caches are allocated here (`Llama.init_cache`); the cache
  lives in the state this object carries between calls (donated to each
  step), the parameters stay in place. λ values are fixed at construction
  (one compile each: λ = 0 builds the dense kernels).
  """

  def __init__(self, model: Llama, *, batch: int, max_len: int,
               threshold=0.0, decode_threshold=None,
               temperature: float = 0.0, top_p: float = 1.0,
               page_size: int | None = None, cache_dtype=None,
               num_splits: int | None = None, max_mode: str | None = None,
               return_stats: bool = False):
    """Args:
      model: a `Llama`.
      batch: sequences generated together.
      max_len: prompt length + new tokens, at most.
      threshold: prefill λ (float or `SkipSoftmaxConfig`).
      decode_threshold: decode λ (default `threshold`; a
        `SkipSoftmaxConfig` uses its decode scale factor).
      temperature, top_p: sampling (`sample_next`).
      page_size: paged KV cache with pages of this many tokens (None:
        contiguous).
      cache_dtype: default the model's computation dtype.
      num_splits, max_mode: decode kernel options.
      return_stats: count skipped blocks (`prefill` and `step` return
        (tokens, skipped, visited) then).

    Raises:
      ValueError: for temperature < 0 or top_p outside (0, 1].
    """
    if not temperature >= 0:
      raise ValueError(f"`temperature` must be >= 0, got {temperature!r}.")
    if not 0 < top_p <= 1:
      raise ValueError(f"`top_p` must lie in (0, 1], got {top_p!r}.")
    model.init_cache(batch, max_len, dtype=cache_dtype, page_size=page_size)
    self.batch, self.max_len = int(batch), int(max_len)
    self.graphdef, self.cache, self.params = nnx.split(model, nnx.Cache, ...)
    decode_threshold = threshold if decode_threshold is None else decode_threshold
    threshold, decode_threshold = (_static_threshold(t, name) for t, name in (
        (threshold, "threshold"), (decode_threshold, "decode_threshold")))
    # Hashable options: the compiled steps are shared by every Generator of
    # the same model structure and options (repeated `generate` calls do
    # not recompile).
    self._options = _StepOptions(
        threshold=threshold, decode_threshold=decode_threshold,
        temperature=float(temperature), top_p=float(top_p),
        num_splits=num_splits, max_mode=max_mode,
        return_stats=bool(return_stats))

  def prefill(self, tokens, lengths, key=None):
    """Runs right-padded prompts int [batch, len] (real lengths int [batch])
    and returns the first generated token of each, int32 [batch] (with
    `return_stats`: (tokens, skipped, visited))."""
    key = jax.random.key(0) if key is None else key
    out, self.cache = _prefill(self.cache, self.params,
                               jnp.asarray(tokens, jnp.int32),
                               jnp.asarray(lengths, jnp.int32), key,
                               graphdef=self.graphdef, options=self._options)
    return out if len(out) > 1 else out[0]

  def step(self, tokens, key=None):
    """Feeds int [batch] tokens and returns the next ones (see `prefill`)."""
    key = jax.random.key(0) if key is None else key
    out, self.cache = _step(self.cache, self.params,
                            jnp.asarray(tokens, jnp.int32), key,
                            graphdef=self.graphdef, options=self._options)
    return out if len(out) > 1 else out[0]

  def decode_loop(self, tokens, steps: int, key=None):
    """`steps` decode steps in one compiled loop (no host round trip per
    token): feeds int [batch] tokens, returns int32 [batch, steps], the
    token each step produced (no EOS handling, no statistics)."""
    if self._options.return_stats:
      raise ValueError("decode_loop does not count statistics: build the "
                       "Generator with return_stats=False.")
    key = jax.random.key(0) if key is None else key
    out, self.cache = _loop(self.cache, self.params,
                            jnp.asarray(tokens, jnp.int32), key,
                            graphdef=self.graphdef, options=self._options,
                            steps=int(steps))
    return out


def generate(model: Llama, prompts, *, max_new_tokens: int,
             threshold=0.0, decode_threshold=None, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             page_size: int | None = None, cache_dtype=None,
             return_stats: bool = False) -> GenerationOutput:
  """Generates up to `max_new_tokens` after each prompt.

  Args:
    model: a `Llama` (its caches are (re)allocated).
    prompts: int [batch, len] or a list of token lists (right-padded here).
    max_new_tokens: >= 1.
    threshold: prefill λ (0: dense) or a `SkipSoftmaxConfig`.
    decode_threshold: decode λ, default `threshold`.
    temperature: 0 = greedy; else sampling with `top_p`.
    top_p: nucleus mass in (0, 1].
    seed: sampling seed.
    eos_id: stop token (default the model config's eos_id; None: never
      stop early).
    page_size: a paged KV cache with pages of this many tokens.
    cache_dtype: the cache dtype (default the model's dtype).
    return_stats: fill `GenerationOutput.stats` with the pooled sparsity.

  Returns:
    A `GenerationOutput`.

  Raises:
    ValueError: for bad prompts, max_new_tokens, temperature or top_p.
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"`max_new_tokens` must be an int >= 1, got "
                     f"{max_new_tokens!r}.")
  tokens, lengths = pad_prompts(prompts)
  eos_id = model.config.eos_id if eos_id is None else eos_id
  gen = Generator(model, batch=tokens.shape[0],
                  max_len=int(lengths.max()) + max_new_tokens,
                  threshold=threshold, decode_threshold=decode_threshold,
                  temperature=temperature, top_p=top_p, page_size=page_size,
                  cache_dtype=cache_dtype, return_stats=return_stats)
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  counts = {"prefill": np.zeros(2), "decode": np.zeros(2)}

  def unpack(out, phase):
    if not return_stats:
      return out
    counts[phase] += [float(out[1]), float(out[2])]
    return out[0]

  nxt = unpack(gen.prefill(tokens, lengths, keys[0]), "prefill")
  out = [np.asarray(nxt)]
  done = np.zeros(tokens.shape[0], bool)
  for i in range(1, max_new_tokens):
    if eos_id is not None:
      done |= out[-1] == eos_id
      if done.all():
        out.extend([np.full_like(out[-1], eos_id)]
                   * (max_new_tokens - len(out)))
        break
    nxt = unpack(gen.step(out[-1], keys[i]), "decode")
    nxt = np.asarray(nxt)
    if eos_id is not None:
      nxt = np.where(done, eos_id, nxt)
    out.append(nxt)
  generated = np.stack(out, axis=1).astype(np.int32)     # [b, new]
  if eos_id is None:
    gen_lengths = np.full((tokens.shape[0],), max_new_tokens, np.int32)
  else:
    is_eos = generated == eos_id
    gen_lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1,
                           max_new_tokens).astype(np.int32)
  stats = None
  if return_stats:
    stats = {f"{phase}_sparsity": float(c[0] / max(c[1], 1))
             for phase, c in counts.items()}
  return GenerationOutput(tokens=generated, lengths=gen_lengths, stats=stats)
