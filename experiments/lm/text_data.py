"""Real English text for language-model experiments: splits, tokenizer, batches.

`experiments/prepare_text.py` collects documents (English documentation
from Debian packages: reStructuredText, HTML, POD and man pages made plain
text by `experiments.lm.text_extract`) and calls
`write_dataset`, which writes into one folder:

    tokenizer.json          byte-level BPE (`tokenizers`), trained on the
                            training split only
    train.bin, heldout.bin  uint16 token shards: the documents of a split
                            one after another, each opened by BOS_TOKEN
    train_offsets.npy, heldout_offsets.npy
                            int64 [num_documents + 1]: document i is
                            shard[offsets[i]:offsets[i + 1]]
    manifest.json           sources, versions, document names per split,
                            token counts, sha256 of every file written

The held-out split is chosen by document (a hash of its name, so it does not
depend on which other documents exist) and is never trained on: neither the
tokenizer nor the batches of the training split see it. Some long documents
are always held out, for long-context evaluation. Same documents and
arguments give byte-identical files.

    tok = text_data.load_tokenizer("data/debian_en")
    docs = text_data.load_documents("data/debian_en", "heldout")  # [[n_i]]
    source = text_data.TextBatches("data/debian_en", seed=0)
    tokens = source.batch(7, batch_size=8, seq_len=4096)      # int32 [8, 4097]

Training and tokenizing need the optional `tokenizers` package
(`pip install blasst_jax[data]`); reading shards and batching need only
numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Mapping

import numpy as np

from experiments import repo_path

BOS_TOKEN = "<|doc|>"
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1
DEFAULT_DATA_DIR = repo_path("data", "debian_en")
_PREPARE = "run python -m experiments.prepare_text"


def _tokenizers():
  """The `tokenizers` package, imported on first use."""
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "experiments.lm.text_data needs the `tokenizers` package to train or "
        "load a tokenizer: pip install 'blasst_jax[data]'.") from e
  return tokenizers


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes.

  Args:
    path: the file.

  Returns:
    The 64-character lowercase hex digest.

  Raises:
    OSError: if the file cannot be read.
  """
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _name_hash(name: str, salt: str) -> float:
  """A uniform number in [0, 1) fixed by (salt, name)."""
  digest = hashlib.sha256(f"{salt}\0{name}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


# ---------------------------------------------------------------- splitting
def heldout_split(documents: Mapping[str, str], *, heldout_fraction: float,
                  long_doc_chars: int = 40_000, min_long_heldout: int = 4,
                  salt: str = "heldout") -> list[str]:
  """Names of the held-out documents, sorted.

  A document is held out when the hash of (salt, name) falls below
  `heldout_fraction`, so the choice of one document does not depend on the
  others. If fewer than `min_long_heldout` documents longer than
  `long_doc_chars` characters are held out that way, the long documents
  with the smallest hashes are added. At least one document is held out
  and at least one is kept for training.

  Args:
    documents: {name: text}.
    heldout_fraction: in (0, 1), the expected share of held-out documents.
    long_doc_chars: what counts as a long document.
    min_long_heldout: long documents (as far as there are any) to hold out.
    salt: changes the draw.

  Returns:
    The held-out names, sorted (at least one, never all).

  Raises:
    ValueError: for fewer than 2 documents or a `heldout_fraction` outside
      (0, 1).
  """
  if len(documents) < 2:
    raise ValueError(f"`documents` needs at least 2 documents (one to train "
                     f"on, one to hold out), got {len(documents)}.")
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"`heldout_fraction` must lie in (0, 1), got "
                     f"{heldout_fraction!r}.")
  u = {name: _name_hash(name, salt) for name in documents}
  by_hash = sorted(documents, key=lambda n: (u[n], n))
  heldout = {n for n in documents if u[n] < heldout_fraction}
  long_docs = [n for n in by_hash if len(documents[n]) > long_doc_chars]
  for name in long_docs:
    if sum(n in heldout for n in long_docs) >= min_long_heldout:
      break
    heldout.add(name)
  if not heldout:
    heldout.add(by_hash[0])
  if len(heldout) == len(documents):
    heldout.discard(by_hash[-1])
  return sorted(heldout)


# ---------------------------------------------------------------- tokenizer
class TextTokenizer:
  """Byte-level BPE tokenizer with a document-start token.

  Attributes:
    vocab_size: number of token ids (the model's vocabulary).
    bos_id: id of BOS_TOKEN, which opens every document.
    tokenizer: the underlying `tokenizers.Tokenizer`.
  """

  def __init__(self, tokenizer):
    """Wraps a trained tokenizer.

    Args:
      tokenizer: a `tokenizers.Tokenizer` with BOS_TOKEN among its added
        tokens (`train_tokenizer`).

    Raises:
      ValueError: if it has no BOS_TOKEN.
    """
    self.tokenizer = tokenizer
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    bos = tokenizer.token_to_id(BOS_TOKEN)
    if bos is None:
      raise ValueError(f"The tokenizer has no {BOS_TOKEN!r} token; "
                       f"{_PREPARE} to rebuild it.")
    self.bos_id = int(bos)

  @classmethod
  def from_file(cls, path: str) -> "TextTokenizer":
    """Loads a tokenizer saved as JSON (`tokenizers.Tokenizer.save`).

    Args:
      path: the tokenizer.json file.

    Returns:
      A `TextTokenizer`.

    Raises:
      ImportError: without the `tokenizers` package.
      ValueError: if the tokenizer has no BOS_TOKEN.
      Exception: the `tokenizers` error for a missing or malformed file.
    """
    return cls(_tokenizers().Tokenizer.from_file(path))

  def encode(self, text: str) -> list[int]:
    """Token ids of text, without BOS (prepend `bos_id` for a document).

    Args:
      text: any str (byte-level: every text encodes).

    Returns:
      [int] ids in [0, vocab_size).
    """
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` of each text (in parallel).

    Args:
      texts: the texts.

    Returns:
      [[int]]: the ids of each text, in order.
    """
    return [e.ids for e in self.tokenizer.encode_batch(
        list(texts), add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of token ids (a BOS shows as BOS_TOKEN unless skipped).

    Args:
      ids: int ids (a list or an int array [n]).
      skip_special_tokens: drop BOS_TOKEN from the text.

    Returns:
      The decoded str.
    """
    return self.tokenizer.decode([int(i) for i in ids],
                                 skip_special_tokens=skip_special_tokens)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int,
                    min_frequency: int = 2) -> TextTokenizer:
  """Trains a byte-level BPE tokenizer on texts (in the order given).

  The 256 byte tokens are always in the vocabulary, so any text encodes;
  BOS_TOKEN gets id 0. Training is deterministic for a fixed text order.

  Args:
    texts: the training texts.
    vocab_size: in (257, 65536]: BOS, the 256 bytes and merges (ids fit
      uint16); a small corpus may end with fewer.
    min_frequency: BPE merges need this many occurrences.

  Returns:
    A `TextTokenizer`.

  Raises:
    ImportError: without the `tokenizers` package.
    ValueError: for a `vocab_size` outside (257, 65536].
  """
  tk = _tokenizers()
  texts = list(texts)
  if not isinstance(vocab_size, (int, np.integer)) or not (
      257 < vocab_size <= 65536):
    raise ValueError(f"`vocab_size` must be an int in (257, 65536] (256 "
                     f"bytes, {BOS_TOKEN}, merges; ids fit uint16), got "
                     f"{vocab_size!r}.")
  tokenizer = tk.Tokenizer(tk.models.BPE())
  tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=True)
  tokenizer.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
      vocab_size=int(vocab_size), min_frequency=min_frequency,
      special_tokens=[BOS_TOKEN], show_progress=False,
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return TextTokenizer(tokenizer)


# ------------------------------------------------------------------ writing
def write_dataset(documents: Mapping[str, str], out_dir: str, *,
                  vocab_size: int = 8192, heldout_fraction: float = 0.06,
                  long_doc_chars: int = 40_000, min_long_heldout: int = 4,
                  min_frequency: int = 2, salt: str = "heldout",
                  sources: list | None = None) -> dict:
  """Splits documents, trains the tokenizer, writes shards and manifest.

  Args:
    documents: {name: text}, one entry per document (names are unique
      relative paths such as "python3.11-doc/library/os.rst").
    out_dir: folder to write (created; files of an earlier run replaced).
    vocab_size: tokenizer vocabulary, BOS_TOKEN included (the result may
      be smaller on a small corpus: see the manifest's `vocab_size`).
    heldout_fraction, long_doc_chars, min_long_heldout, salt: the held-out
      split (`heldout_split`).
    min_frequency: BPE merges need this many occurrences.
    sources: JSON-able records of where the documents came from (package
      names, versions, checksums), copied into the manifest.

  Returns:
    The manifest (also written to out_dir/manifest.json).

  Raises:
    ValueError: for a document that is not a non-empty str, as
      `heldout_split` and `train_tokenizer`, or a tokenizer whose ids do
      not fit uint16.
    ImportError: without the `tokenizers` package.
  """
  for name, text in documents.items():
    if not isinstance(text, str) or not text:
      raise ValueError(f"Document {name!r} in `documents` must be a "
                       f"non-empty str.")
  heldout = set(heldout_split(
      documents, heldout_fraction=heldout_fraction,
      long_doc_chars=long_doc_chars, min_long_heldout=min_long_heldout,
      salt=salt))
  names = {"train": sorted(n for n in documents if n not in heldout),
           "heldout": sorted(heldout)}
  tokenizer = train_tokenizer((documents[n] for n in names["train"]),
                              vocab_size=vocab_size,
                              min_frequency=min_frequency)
  if tokenizer.vocab_size > 65536:
    raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit uint16.")
  os.makedirs(out_dir, exist_ok=True)
  tokenizer_path = os.path.join(out_dir, TOKENIZER)
  tokenizer.tokenizer.save(tokenizer_path, pretty=False)
  files = {TOKENIZER: file_sha256(tokenizer_path)}
  splits = {}
  source_tokens = {}
  for split in SPLITS:
    ids = tokenizer.encode_batch([documents[n] for n in names[split]])
    lengths = np.array([1 + len(x) for x in ids], np.int64)
    for name, n in zip(names[split], lengths):
      counts = source_tokens.setdefault(name.split("/")[0], {
          s: 0 for s in SPLITS} | {f"{s}_documents": 0 for s in SPLITS})
      counts[split] += int(n)
      counts[f"{split}_documents"] += 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shard = np.empty(int(offsets[-1]), np.uint16)
    for start, doc in zip(offsets[:-1], ids):
      shard[start] = tokenizer.bos_id
      shard[start + 1:start + 1 + len(doc)] = doc
    shard_name, offsets_name = f"{split}.bin", f"{split}_offsets.npy"
    shard.tofile(os.path.join(out_dir, shard_name))
    np.save(os.path.join(out_dir, offsets_name), offsets)
    for f in (shard_name, offsets_name):
      files[f] = file_sha256(os.path.join(out_dir, f))
    splits[split] = {
        "shard": shard_name, "offsets": offsets_name,
        "num_documents": len(names[split]),
        "num_tokens": int(offsets[-1]),
        "num_chars": int(sum(len(documents[n]) for n in names[split])),
        "num_long_documents": int(sum(
            len(documents[n]) > long_doc_chars for n in names[split])),
        "longest_document_tokens": int(lengths.max()),
        "documents": names[split],
    }
  import tokenizers  # pylint: disable=g-import-not-at-top
  manifest = {
      "format_version": FORMAT_VERSION,
      "sources": sources or [],
      "tokenizer": {"kind": "byte-level BPE", "file": TOKENIZER,
                    "tokenizers_version": tokenizers.__version__,
                    "requested_vocab_size": int(vocab_size),
                    "min_frequency": int(min_frequency),
                    "trained_on": "train"},
      "vocab_size": tokenizer.vocab_size,
      "bos_token": BOS_TOKEN,
      "bos_id": tokenizer.bos_id,
      "dtype": "uint16",
      "heldout": {"fraction": float(heldout_fraction),
                  "long_doc_chars": int(long_doc_chars),
                  "min_long_heldout": int(min_long_heldout), "salt": salt},
      "splits": splits,
      # Tokens (BOS included) and documents per split of each source: the
      # first component of the document names.
      "source_tokens": source_tokens,
      "sha256": files,
  }
  with open(os.path.join(out_dir, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
  return manifest


# ------------------------------------------------------------------ reading
def load_manifest(data_dir: str) -> dict:
  """The manifest of a folder written by `write_dataset`.

  Args:
    data_dir: the folder.

  Returns:
    The manifest dict ("format_version", "vocab_size", "bos_id", "splits"
    {split: {"shard", "offsets", "num_tokens", "documents", ...}}, ...).

  Raises:
    ValueError: if the folder has no manifest, or one of another
      format_version.
  """
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(
        f"`data_dir` {data_dir!r} holds no prepared text dataset ({MANIFEST} "
        f"is missing): {_PREPARE} --out_dir={data_dir} first.")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version "
                     f"{manifest.get('format_version')!r}, this reader "
                     f"expects {FORMAT_VERSION}: {_PREPARE} again.")
  return manifest


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
  return split


def load_shard(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The token stream of a split and where its documents start.

  Args:
    data_dir: a folder written by `write_dataset`.
    split: "train" or "heldout".

  Returns:
    (uint16 memmap [num_tokens], int64 offsets [num_documents + 1]:
    document i is tokens[offsets[i]:offsets[i + 1]]).

  Raises:
    ValueError: for an unknown split, a missing manifest or shard, or a
      shard whose size disagrees with the manifest.
  """
  info = load_manifest(data_dir)["splits"][_check_split(split)]
  path = os.path.join(data_dir, info["shard"])
  if not os.path.isfile(path):
    raise ValueError(f"`data_dir` {data_dir!r} lacks {info['shard']}: "
                     f"{_PREPARE} --out_dir={data_dir} again.")
  tokens = np.memmap(path, np.uint16, mode="r")
  offsets = np.load(os.path.join(data_dir, info["offsets"]))
  if tokens.size != info["num_tokens"] or offsets[-1] != tokens.size:
    raise ValueError(f"{path} has {tokens.size} tokens, the manifest "
                     f"{info['num_tokens']}: {_PREPARE} again.")
  return tokens, offsets


def load_documents(data_dir: str, split: str) -> list[np.ndarray]:
  """The documents of a split, in manifest order.

  Args:
    data_dir: a folder written by `write_dataset`.
    split: "train" or "heldout".

  Returns:
    [int32 [n_i]] per document, each starting with the tokenizer's bos_id.

  Raises:
    ValueError: as `load_shard`.
  """
  tokens, offsets = load_shard(data_dir, split)
  return [np.asarray(tokens[a:b], np.int32)
          for a, b in zip(offsets[:-1], offsets[1:])]


def document_names(data_dir: str, split: str) -> list[str]:
  """Names of the documents of a split, in the order of `load_documents`.

  Args:
    data_dir: a folder written by `write_dataset`.
    split: "train" or "heldout".

  Returns:
    [str] document names.

  Raises:
    ValueError: for an unknown split or a missing manifest.
  """
  return list(load_manifest(data_dir)["splits"][_check_split(split)][
      "documents"])


def load_tokenizer(data_dir: str) -> TextTokenizer:
  """The tokenizer written by `write_dataset` (needs `tokenizers`).

  Args:
    data_dir: a folder written by `write_dataset`.

  Returns:
    A `TextTokenizer`.

  Raises:
    ValueError: for a missing or outdated manifest.
    ImportError: without the `tokenizers` package.
  """
  load_manifest(data_dir)
  return TextTokenizer.from_file(os.path.join(data_dir, TOKENIZER))


# ------------------------------------------------------------------ passkey
# The passkey-retrieval template: `lm_eval` evaluates with it and
# `TextBatches(passkey_prob=...)` trains with it, so the two cannot drift.
# "{key}" is replaced by the key (digits).
PASSKEY_NEEDLE = ("\nThe pass key is {key}. Remember it. {key} is the pass "
                  "key.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"
# Last entropy word of the training augmentation's RNG, so its keys and
# depths come from a stream of their own (evaluation draws from
# `np.random.default_rng([seed, length, trial])`).
_PASSKEY_STREAM = 0x9A55_6B79


def passkey_parts(tokenizer, key: str, *, needle: str = PASSKEY_NEEDLE,
                  question: str = PASSKEY_QUESTION,
                  answer: str = PASSKEY_ANSWER
                  ) -> tuple[list[int], list[int], list[int]]:
  """Token ids of (needle, question, answer) for `key`.

  Args:
    tokenizer: with `encode(text) -> ids` (`TextTokenizer`).
    key: the pass key.
    needle, question, answer: templates; "{key}" is replaced by the key.

  Returns:
    ([int] needle ids, [int] question ids, [int] answer ids), each without
    BOS.
  """
  return tuple(list(tokenizer.encode(t.format(key=key)))
               for t in (needle, question, answer))


def insert_passkey(filler, *, bos_id: int, needle_ids, question_ids,
                   answer_ids, length: int, depth: float
                   ) -> tuple[np.ndarray, int, int]:
  """BOS, filler, needle at `depth`, more filler, question, answer.

  Args:
    filler: int [>= m] tokens; the first m are used, m = length - (BOS +
      needle + question + answer tokens).
    bos_id: the first token.
    needle_ids, question_ids, answer_ids: from `passkey_parts`.
    length: the sequence has length + 1 tokens (inputs [:-1], targets
      [1:]).
    depth: in [0, 1]: round(depth * m) filler tokens precede the needle.

  Returns:
    (int32 [length + 1] tokens, index of the needle's first token, index
    of the answer's first token = length + 1 - len(answer_ids)).

  Raises:
    ValueError: for a depth outside [0, 1], or a length or filler too short.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"`depth` must lie in [0, 1], got {depth!r}.")
  m = length - len(needle_ids) - len(question_ids) - len(answer_ids)
  if m < 0:
    raise ValueError(
        f"`length` {length} is too short for the needle, question and answer "
        f"({length + 1 - m} tokens): use a longer length.")
  filler = np.asarray(filler, np.int32)
  if filler.size < m:
    raise ValueError(f"`filler` has {filler.size} tokens, length {length} "
                     f"needs {m}: give more filler text.")
  p = int(round(depth * m))
  tokens = np.concatenate([
      [bos_id], filler[:p], needle_ids, filler[p:m], question_ids,
      answer_ids]).astype(np.int32)
  assert tokens.size == length + 1, tokens.size
  return tokens, 1 + p, length + 1 - len(answer_ids)


# ------------------------------------------------------------------ batches
class TextBatches:
  """Random crops of a split's token stream, deterministic in batch index.

  A drop-in for `experiments.lm.synthetic_lm.SyntheticLM` as a token source: a
  batch is a function of (seed, split, index) only, so a resumed run sees
  the batches it would have seen. Crops run across document boundaries
  (every document opens with bos_id).

  Passkey augmentation (`passkey_prob` > 0, training split only): each
  sequence, with that probability, becomes the passkey-retrieval format of
  `lm_eval` (`insert_passkey` with the PASSKEY_* template): BOS, its crop
  as filler with the needle "The pass key is 12345. ..." at a uniform
  random depth, then the question and the answer as its last tokens. Key
  (`passkey_digits` random digits), depth and which rows are chosen are
  functions of (seed, index) alone, drawn from a stream of their own. The
  held-out split is never augmented. The answer is a few tokens of a
  4096-token row, so its share of the loss is tiny; `target_weights`
  gives those targets `passkey_answer_weight` for the training loss.

  Attributes:
    vocab_size, bos_id: from the manifest.
    num_tokens: {split: tokens in its stream}.
    passkey_prob, passkey_digits, passkey_answer_weight: the augmentation.
  """

  def __init__(self, data_dir: str, *, seed: int = 0,
               start: str = "random", passkey_prob: float = 0.0,
               passkey_digits: int = 5, passkey_answer_weight: float = 1.0):
    """Opens the shards (and the tokenizer, for passkey augmentation).

    Args:
      data_dir: a folder written by `write_dataset`.
      seed: with split and index, fixes every batch.
      start: "random": crops start anywhere in the stream; "document":
        at the start (bos) of a random document.
      passkey_prob: in [0, 1]: share of training sequences turned into
        passkey-retrieval sequences (0: none, plain text; needs the
        `tokenizers` package otherwise).
      passkey_digits: digits of the keys (>= 1).
      passkey_answer_weight: > 0: loss weight of the answer's targets in
        `target_weights` (1: an ordinary token).

    Raises:
      ValueError: for an unknown `start`, a `passkey_prob` outside [0, 1],
        `passkey_digits` < 1, `passkey_answer_weight` <= 0, or a folder
        that is no prepared dataset.
      ImportError: for passkey_prob > 0 without `tokenizers`.
    """
    if start not in ("random", "document"):
      raise ValueError(f"`start` must be 'random' or 'document', got "
                       f"{start!r}.")
    if not 0.0 <= passkey_prob <= 1.0:
      raise ValueError(f"`passkey_prob` must lie in [0, 1], got "
                       f"{passkey_prob!r}.")
    if not isinstance(passkey_digits, (int, np.integer)) or (
        passkey_digits < 1):
      raise ValueError(f"`passkey_digits` must be a positive int, got "
                       f"{passkey_digits!r}.")
    if not passkey_answer_weight > 0:
      raise ValueError(f"`passkey_answer_weight` must be > 0 (1: no extra "
                       f"weight), got {passkey_answer_weight!r}.")
    manifest = load_manifest(data_dir)
    self.passkey_prob = float(passkey_prob)
    self.passkey_digits = int(passkey_digits)
    self.passkey_answer_weight = float(passkey_answer_weight)
    self._tokenizer = (load_tokenizer(data_dir) if self.passkey_prob > 0
                       else None)
    self.data_dir = data_dir
    self.seed = int(seed)
    self.start = start
    self.vocab_size = int(manifest["vocab_size"])
    self.bos_id = int(manifest["bos_id"])
    self._shards = {s: load_shard(data_dir, s) for s in SPLITS}
    self.num_tokens = {s: int(t.size) for s, (t, _) in self._shards.items()}

  def batch(self, index: int, *, batch_size: int, seq_len: int,
            split: str = "train") -> np.ndarray:
    """Batch number `index` of a split.

    Args:
      index: >= 0.
      batch_size, seq_len: >= 1; the split must hold seq_len + 1 tokens.
      split: "train" or "heldout" ("eval" is read as "heldout", the name
        `SyntheticLM` uses).

    Returns:
      int32 [batch_size, seq_len + 1]: inputs are `[:, :-1]`, next-token
      targets `[:, 1:]`.

    Raises:
      ValueError: for an unknown split, a negative index, batch_size or
        seq_len < 1, or a split shorter than seq_len + 1 tokens.
    """
    split = "heldout" if split == "eval" else _check_split(split)
    if index < 0 or batch_size < 1 or seq_len < 1:
      raise ValueError(
          f"Need index >= 0, batch_size >= 1, seq_len >= 1; got {index}, "
          f"{batch_size}, {seq_len}.")
    tokens, offsets = self._shards[split]
    n = seq_len + 1
    if tokens.size < n:
      raise ValueError(f"`seq_len` {seq_len} needs {n} tokens, the "
                       f"{split!r} split has {tokens.size}.")
    rng = np.random.default_rng([self.seed, SPLITS.index(split), int(index)])
    if self.start == "random":
      starts = rng.integers(0, tokens.size - n + 1, size=batch_size)
    else:
      starts = offsets[:-1][offsets[:-1] <= tokens.size - n]
      starts = starts[rng.integers(0, starts.size, size=batch_size)]
    out = np.asarray(tokens[starts[:, None] + np.arange(n)], np.int32)
    if split == "train":
      for row, plan in enumerate(self.passkey_plan(index, batch_size)):
        if plan is not None:
          out[row] = insert_passkey(
              out[row], bos_id=self.bos_id,
              **dict(zip(("needle_ids", "question_ids", "answer_ids"),
                         passkey_parts(self._tokenizer, plan["key"]))),
              length=seq_len, depth=plan["depth"])[0]
    return out

  def target_weights(self, index: int, *, batch_size: int, seq_len: int,
                     split: str = "train") -> np.ndarray:
    """Loss weight of each next-token target of `batch(index, ...)`.

    Args:
      index, batch_size, seq_len, split: as `batch`.

    Returns:
      f32 [batch_size, seq_len]: 1, and `passkey_answer_weight` at the
      answer targets of the passkey rows (training split only).
    """
    weights = np.ones((batch_size, seq_len), np.float32)
    if split != "train" or self.passkey_answer_weight == 1.0:
      return weights
    for row, plan in enumerate(self.passkey_plan(index, batch_size)):
      if plan is not None:
        num_answer = len(passkey_parts(self._tokenizer, plan["key"])[2])
        # Answer tokens are the row's last; target j predicts token j + 1.
        weights[row, seq_len - num_answer:] = self.passkey_answer_weight
    return weights

  def passkey_plan(self, index: int, batch_size: int) -> list[dict | None]:
    """Which training rows of batch `index` carry a passkey, and which.

    Args:
      index: the batch index (as `batch`).
      batch_size: rows in the batch.

    Returns:
      [batch_size] of None (plain text) or {"key": str, "depth": float}.
    """
    if self.passkey_prob <= 0:
      return [None] * batch_size
    rng = np.random.default_rng([self.seed, SPLITS.index("train"),
                                 int(index), _PASSKEY_STREAM])
    chosen = rng.random(batch_size) < self.passkey_prob
    d = self.passkey_digits
    keys = rng.integers(10 ** (d - 1), 10 ** d, size=batch_size)
    depths = rng.random(batch_size)
    return [{"key": str(int(k)), "depth": float(x)} if c else None
            for c, k, x in zip(chosen, keys, depths)]
