"""A synthetic, language-like token source for training small LMs offline.

Nothing can be downloaded at run time, so training experiments use token
streams generated here. Each sequence mixes two kinds of structure:

- local: a seeded sparse random Markov chain (every token has a few likely
  successors with Zipf-like probabilities), which an MLP over the previous
  token can learn;
- long-range: with probability `copy_prob` per position a span of
  `copy_len` tokens from `min_copy_distance` or more positions earlier is
  copied verbatim. Predicting a copy needs attention to the earlier span,
  which is what gives attention (and skip-softmax sparsity) something to do.

With `prompt_len` > 0 a sequence opens with a prompt of distinct tokens
from a reserved range, and with probability `recall_prob` per position a
`recall` token is followed by the whole prompt again: retrieval from the
start of the context (as from a system prompt), the first attention pattern
small models learn.

With `bos` (default) every sequence starts with a beginning-of-sequence
token (id `vocab_size - 1`, never emitted elsewhere), as real LM data does.
Heads with nothing to look at learn to park their attention on it (an
attention sink): a first block that dominates the scores of later rows is
what lets skip-softmax drop the blocks in between. Without it the only
large scores are recent ones, which come last in the kernel's walk.

Batches are deterministic functions of (seed, split, batch index), so a
resumed run sees exactly the batches it would have seen, and the held-out
split never overlaps training.

    source = SyntheticLM(vocab_size=256, seed=0)
    tokens = source.batch(7, batch_size=8, seq_len=512)   # int32 [8, 513]
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "eval")


class SyntheticLM:
  """Markov chain + copy spans; see the module docstring.

  Attributes:
    vocab_size: tokens are ints in [0, vocab_size).
    successors: int [vocab_size, branching], the likely next tokens.
    cumprobs: f64 [vocab_size, branching], their cumulative probabilities.
  """

  def __init__(self, vocab_size: int = 256, *, seed: int = 0,
               branching: int = 4, copy_prob: float = 0.02,
               copy_len: int = 16, min_copy_distance: int = 32,
               bos: bool = True, prompt_len: int = 0,
               recall_prob: float = 0.0):
    """Builds the chain.

    Args:
      vocab_size: number of token ids, >= 2.
      seed: seeds the chain and, with split and batch index, every batch.
      branching: successors per token (1 <= branching <= vocab_size).
      copy_prob: probability in [0, 1) that a copy span starts at a position.
      copy_len: tokens per copy span, >= 1.
      min_copy_distance: a span is copied from at least this far back
        (>= copy_len, so the source is complete before it is copied).
      bos: start every sequence with the token `vocab_size - 1`, which the
        chain and the copies never produce elsewhere.
      prompt_len: tokens of the prompt after bos (0: none); they are
        distinct, drawn from the ids `[recall - 2 * prompt_len, recall)`,
        where `recall = vocab_size - 1 - bos` is the recall token. The
        chain never produces these ids.
      recall_prob: probability in [0, 1) that a recall (the recall token,
        then the prompt) starts at a position after the prompt.

    Raises:
      ValueError: for an argument outside the ranges above, or a
        `branching` larger than the ids left for the chain.
    """
    for name, value, low in (("vocab_size", vocab_size, 2),
                             ("branching", branching, 1),
                             ("copy_len", copy_len, 1),
                             ("min_copy_distance", min_copy_distance, 1)):
      if not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    if not isinstance(prompt_len, (int, np.integer)) or prompt_len < 0:
      raise ValueError(f"`prompt_len` must be an int >= 0, got "
                       f"{prompt_len!r}.")
    if not 0 <= recall_prob < 1 or (recall_prob and not prompt_len):
      raise ValueError(f"`recall_prob` must lie in [0, 1) and needs "
                       f"prompt_len > 0, got {recall_prob!r}.")
    self.recall_token = vocab_size - 1 - int(bos) if prompt_len else None
    n_regular = vocab_size - int(bos) - (1 + 2 * prompt_len if prompt_len
                                         else 0)
    if branching > n_regular:
      raise ValueError(f"`branching` ({branching}) must be <= vocab_size "
                       f"({vocab_size}) less the bos, recall and prompt "
                       f"ids ({vocab_size - n_regular}).")
    if not 0 <= copy_prob < 1:
      raise ValueError(f"`copy_prob` must lie in [0, 1), got {copy_prob!r}.")
    if min_copy_distance < copy_len:
      raise ValueError(f"`min_copy_distance` ({min_copy_distance}) must be >= "
                       f"copy_len ({copy_len}).")
    self.vocab_size = int(vocab_size)
    self.seed = int(seed)
    self.copy_prob = float(copy_prob)
    self.copy_len = int(copy_len)
    self.min_copy_distance = int(min_copy_distance)
    self.bos = bool(bos)
    self.bos_token = vocab_size - 1 if bos else None
    self.prompt_len = int(prompt_len)
    self.recall_prob = float(recall_prob)
    self.n_regular = n_regular
    rng = np.random.default_rng([self.seed, 12345])
    # Distinct successors per token, Zipf-like weights (1, 1/2, 1/3, ...).
    self.successors = np.stack([
        rng.choice(n_regular, size=branching, replace=False)
        for _ in range(vocab_size)])
    weights = 1.0 / np.arange(1, branching + 1)
    self.cumprobs = np.broadcast_to(np.cumsum(weights / weights.sum()),
                                    (vocab_size, branching)).copy()

  def batch(self, index: int, *, batch_size: int, seq_len: int,
            split: str = "train") -> np.ndarray:
    """Batch number `index` of a split.

    Args:
      index: batch number, >= 0; the same index and split give the same
        tokens.
      batch_size: sequences, >= 1.
      seq_len: input length, >= 1.
      split: one of `SPLITS` ("train" or the held-out split).

    Raises:
      ValueError: for an unknown split or a value below its minimum.

    Returns:
      int32 [batch_size, seq_len + 1]: inputs are `[:, :-1]`, next-token
      targets `[:, 1:]`.
    """
    if split not in SPLITS:
      raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    if index < 0 or batch_size < 1 or seq_len < 1:
      raise ValueError(
          f"Need index >= 0, batch_size >= 1, seq_len >= 1; got {index}, "
          f"{batch_size}, {seq_len}.")
    rng = np.random.default_rng([self.seed, SPLITS.index(split), int(index)])
    n = seq_len + 1
    out = np.empty((batch_size, n), np.int32)
    rows = np.arange(batch_size)
    if self.bos:
      out[:, 0] = self.bos_token
    first = int(self.bos)   # the first position the chain fills
    prompt = None
    if self.prompt_len:     # [batch, prompt_len], distinct per row
      ids = self.recall_token - 2 * self.prompt_len + np.argsort(
          rng.random((batch_size, 2 * self.prompt_len)), axis=1)
      prompt = ids[:, :self.prompt_len]
      end = min(first + self.prompt_len, n)
      out[:, first:end] = prompt[:, :end - first]
      first = end
    if first < n:
      out[:, first] = rng.integers(self.n_regular, size=batch_size)
    uniform = rng.random((batch_size, n))
    recall_start = rng.random((batch_size, n)) < self.recall_prob
    recalled = np.full(batch_size, -1, np.int64)  # prompt tokens replayed
    copy_start = rng.random((batch_size, n)) < self.copy_prob
    distance = rng.integers(self.min_copy_distance,
                            max(2 * self.min_copy_distance, n),
                            size=(batch_size, n))
    remaining = np.zeros(batch_size, np.int64)   # tokens left in a copy
    offset = np.zeros(batch_size, np.int64)      # how far back it copies
    for t in range(1 + first, n):
      # Start a copy only where the source span lies inside the sequence
      # (after the bos token).
      start = (remaining == 0) & copy_start[:, t] & (
          distance[:, t] <= t - first)
      remaining = np.where(start, self.copy_len, remaining)
      offset = np.where(start, distance[:, t], offset)
      copying = remaining > 0
      prev = out[:, t - 1]
      choice = (uniform[:, t, None] > self.cumprobs[prev]).sum(-1)
      choice = np.minimum(choice, self.successors.shape[1] - 1)
      markov = self.successors[prev, choice]
      copied = out[rows, np.maximum(t - offset, 0)]
      out[:, t] = np.where(copying, copied, markov)
      remaining = np.maximum(remaining - 1, 0)
      if prompt is not None:   # A recall takes over from copy and chain.
        replaying = recalled >= 0
        out[:, t] = np.where(
            replaying, prompt[rows, np.maximum(recalled, 0)], out[:, t])
        recalled = np.where(replaying, recalled + 1, -1)
        recalled = np.where(recalled >= self.prompt_len, -1, recalled)
        begin = ~replaying & (remaining == 0) & recall_start[:, t]
        out[:, t] = np.where(begin, self.recall_token, out[:, t])
        recalled = np.where(begin, 0, recalled)
    return out
