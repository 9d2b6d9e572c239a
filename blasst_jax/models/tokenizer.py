"""Byte-level BPE tokenizers of pretrained Llama-family checkpoints.

    tok = LlamaTokenizer.from_gguf(reader)          # from the GGUF metadata
    tok = LlamaTokenizer.from_file("tokenizer.json")  # a Hugging Face folder
    ids = tok.encode("The pass key is 73914.")      # [int], no BOS
    text = tok.decode(ids)

Needs the `tokenizers` package (`pip install blasst_jax[lm]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LlamaTokenizer"]

# GPT-2's pre-tokenizer pattern; llama.cpp's "smollm" and "gpt2" pre-types
# use it (smollm splits digits one by one first).
_GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"
                 r"| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
# GGUF `tokenizer.ggml.pre` values whose digits are split one by one.
_SINGLE_DIGIT_PRE = ("smollm", "starcoder", "refact")
_SUPPORTED_PRE = _SINGLE_DIGIT_PRE + ("gpt2", "default")


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Tokenizers of pretrained models need the `tokenizers` "
                      "package: pip install 'blasst_jax[lm]'.") from e
  return tokenizers


class LlamaTokenizer:
  """A `tokenizers.Tokenizer` with the ids an evaluation needs.

  The interface `experiments.lm.lm_eval` reads (`encode`, `decode`, `bos_id`).

  Attributes:
    tokenizer: the underlying `tokenizers.Tokenizer`.
    vocab_size: number of ids.
    bos_id: the token that opens a document.
    eos_id: the token that ends generation (or None).
  """

  def __init__(self, tokenizer, *, bos_id: int, eos_id: int | None = None):
    self.tokenizer = tokenizer
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
      if value is not None and not 0 <= int(value) < self.vocab_size:
        raise ValueError(f"`{name}` {value!r} is outside the vocabulary "
                         f"[0, {self.vocab_size}).")
    self.bos_id = int(bos_id)
    self.eos_id = None if eos_id is None else int(eos_id)

  @classmethod
  def from_gguf(cls, reader, *, bos_token: str | None = None
                ) -> "LlamaTokenizer":
    """From the `tokenizer.ggml.*` metadata of a GGUF file.

    Args:
      reader: a `gguf.GGUFReader`.
      bos_token: the token that opens a document (e.g. "<|endoftext|>");
        default the metadata's bos_token_id.

    Returns:
      A `LlamaTokenizer`.

    Raises:
      ValueError: for a tokenizer model other than byte-level BPE ("gpt2"),
        an unknown pre-tokenizer, or missing fields (named).
    """
    from blasst_jax.models import weights  # pylint: disable=g-import-not-at-top
    field = lambda key, default=weights.REQUIRED: weights.gguf_field(  # pylint: disable=g-long-lambda
        reader, key, default)
    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(f"GGUF field tokenizer.ggml.model is {kind!r}: only "
                       "byte-level BPE ('gpt2') tokenizers are supported.")
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in _SUPPORTED_PRE:
      raise ValueError(f"GGUF field tokenizer.ggml.pre is {pre!r}; supported: "
                       f"{_SUPPORTED_PRE}.")
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges")
    types = field("tokenizer.ggml.token_type", [1] * len(tokens))
    tokenizer = build_bpe(
        tokens, [tuple(m.split(" ", 1)) for m in merges],
        special=[t for t, kind in zip(tokens, types) if kind == 3],
        single_digits=pre in _SINGLE_DIGIT_PRE)
    bos = field("tokenizer.ggml.bos_token_id", None)
    if bos_token is not None:
      bos = tokenizer.token_to_id(bos_token)
      if bos is None:
        raise ValueError(f"`bos_token` {bos_token!r} is not in the vocabulary.")
    if bos is None:
      raise ValueError("The GGUF has no tokenizer.ggml.bos_token_id: pass "
                       "`bos_token`.")
    return cls(tokenizer, bos_id=bos,
               eos_id=field("tokenizer.ggml.eos_token_id", None))

  @classmethod
  def from_file(cls, path: str, *, bos_token: str | None = None,
                eos_token: str | None = None) -> "LlamaTokenizer":
    """From a Hugging Face `tokenizer.json`.

    Args:
      path: the tokenizer.json file.
      bos_token, eos_token: token strings; default the first of
        "<|begin_of_text|>", "<s>", "<|endoftext|>" (BOS) and of
        "<|end_of_text|>", "</s>", "<|endoftext|>" (EOS) in the vocabulary.

    Raises:
      ValueError: if no BOS token is found.
    """
    tokenizer = _tokenizers().Tokenizer.from_file(path)

    def find(given, candidates):
      for name in ([given] if given is not None else candidates):
        i = tokenizer.token_to_id(name)
        if i is not None:
          return i
      return None

    bos = find(bos_token, ("<|begin_of_text|>", "<s>", "<|endoftext|>"))
    if bos is None:
      raise ValueError(f"No BOS token found in {path}: pass `bos_token`.")
    eos = find(eos_token, ("<|end_of_text|>", "</s>", "<|endoftext|>"))
    return cls(tokenizer, bos_id=bos, eos_id=eos)

  def encode(self, text: str) -> list[int]:
    """Ids of text, without BOS (prepend `bos_id` for a document)."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, in order."""
    return [e.ids for e in self.tokenizer.encode_batch(
        list(texts), add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of int ids (a list or an int array [n])."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).ravel()],
                                 skip_special_tokens=skip_special_tokens)


def build_bpe(tokens: Sequence[str], merges: Sequence[tuple[str, str]], *,
              special: Sequence[str] = (), single_digits: bool = False):
  """A byte-level BPE `tokenizers.Tokenizer` from its vocabulary and merges.

  Args:
    tokens: the token strings in id order (byte-level alphabet).
    merges: the merge rules, in priority order.
    special: tokens matched whole before pre-tokenization (e.g.
      "<|endoftext|>").
    single_digits: split digits one by one before the GPT-2 pattern.
  """
  tk = _tokenizers()
  vocab = {t: i for i, t in enumerate(tokens)}
  tokenizer = tk.Tokenizer(tk.models.BPE(vocab, list(merges),
                                         fuse_unk=False))
  pre = [tk.pre_tokenizers.Split(tk.Regex(_GPT2_PATTERN), behavior="isolated"),
         tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  if single_digits:
    pre.insert(0, tk.pre_tokenizers.Digits(individual_digits=True))
  tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(pre)
  tokenizer.decoder = tk.decoders.ByteLevel()
  if special:
    tokenizer.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                  for t in special])
  return tokenizer
