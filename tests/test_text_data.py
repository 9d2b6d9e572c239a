"""blasst_jax.text_data: splits, tokenizer, shards, batches (small texts)."""

import json
import os

import numpy as np
import pytest

from blasst_jax import text_data

pytest.importorskip("tokenizers")

WORDS = ("the attention kernel skips a block when its scores are far below "
         "running maximum of each row so exponentials and value loads are "
         "never computed for that tile python module function returns list "
         "string object class method argument default").split()


def make_documents(n: int = 24, seed: int = 0) -> dict[str, str]:
  """Pseudo-English documents; every fifth one long (> 3000 chars)."""
  rng = np.random.default_rng(seed)
  docs = {}
  for i in range(n):
    words = rng.choice(WORDS, size=800 if i % 5 == 0 else 60)
    lines = [" ".join(words[j:j + 12]).capitalize() + "."
             for j in range(0, len(words), 12)]
    docs[f"src/doc{i:02d}.rst"] = f"Title {i}\n=======\n\n" + "\n".join(
        lines) + "\n"
  docs["src/unicode.rst"] = "Ünïcödé — naïve café, 東京, emoji 🙂.\n"
  return docs


ARGS = dict(vocab_size=320, heldout_fraction=0.2, long_doc_chars=3000,
            min_long_heldout=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("text") / "data")
  manifest = text_data.write_dataset(make_documents(), out, **ARGS,
                                     sources=[{"package": "test"}])
  return out, manifest


def test_deterministic_bytes(dataset, tmp_path):
  out, _ = dataset
  again = tmp_path / "again"
  # Insertion order of the documents does not matter.
  docs = dict(reversed(list(make_documents().items())))
  text_data.write_dataset(docs, str(again), **ARGS,
                          sources=[{"package": "test"}])
  names = sorted(os.listdir(out))
  assert names == sorted(os.listdir(again)) == sorted([
      "manifest.json", "tokenizer.json", "train.bin", "heldout.bin",
      "train_offsets.npy", "heldout_offsets.npy"])
  for name in names:
    assert (again / name).read_bytes() == open(
        os.path.join(out, name), "rb").read(), name


def test_split_disjoint_by_document_with_long_heldout(dataset):
  out, manifest = dataset
  train = text_data.document_names(out, "train")
  heldout = text_data.document_names(out, "heldout")
  docs = make_documents()
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == sorted(docs)
  assert train == sorted(train) and heldout == sorted(heldout)
  assert sum(len(docs[n]) > 3000 for n in heldout) >= 2
  assert manifest["splits"]["heldout"]["num_long_documents"] >= 2
  # The held-out choice of a document does not depend on the others.
  fewer = {n: t for n, t in docs.items() if n in heldout or n < "src/doc10"}
  assert set(heldout) <= set(text_data.heldout_split(
      fewer, heldout_fraction=0.2, long_doc_chars=3000, min_long_heldout=2))
  # The tokenizer never saw held-out text: its manifest says so, and
  # the shards hold exactly the split's documents.
  assert manifest["tokenizer"]["trained_on"] == "train"
  assert len(text_data.load_documents(out, "heldout")) == len(heldout)


def test_documents_round_trip(dataset):
  out, manifest = dataset
  tok = text_data.load_tokenizer(out)
  assert tok.vocab_size == manifest["vocab_size"] <= 320
  assert tok.bos_id == manifest["bos_id"] == 0
  docs = make_documents()
  for split in text_data.SPLITS:
    names = text_data.document_names(out, split)
    for name, ids in zip(names, text_data.load_documents(out, split)):
      assert ids.dtype == np.int32 and ids[0] == tok.bos_id
      assert tok.bos_id not in ids[1:]
      assert tok.decode(ids[1:]) == docs[name]
      assert tok.decode(ids, skip_special_tokens=True) == docs[name]
  text = "A new sentence, unseen: Ωmega 42!\n"
  ids = tok.encode(text)
  assert max(ids) < tok.vocab_size and tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids).startswith(text_data.BOS_TOKEN)
  info = manifest["splits"]["train"]
  tokens, offsets = text_data.load_shard(out, "train")
  assert tokens.dtype == np.uint16 and tokens.size == info["num_tokens"]
  assert offsets.shape == (info["num_documents"] + 1,)
  assert np.all(tokens[offsets[:-1]] == tok.bos_id)


def test_manifest_records_checksums(dataset):
  out, manifest = dataset
  assert manifest["sources"] == [{"package": "test"}]
  on_disk = json.loads(open(os.path.join(out, "manifest.json")).read())
  assert on_disk == manifest
  for name, digest in manifest["sha256"].items():
    assert text_data.file_sha256(os.path.join(out, name)) == digest


def test_batches_shapes_and_determinism(dataset):
  out, manifest = dataset
  source = text_data.TextBatches(out, seed=3)
  assert source.vocab_size == manifest["vocab_size"]
  x = source.batch(5, batch_size=4, seq_len=64)
  assert x.shape == (4, 65) and x.dtype == np.int32
  assert x.min() >= 0 and x.max() < source.vocab_size
  np.testing.assert_array_equal(
      x, text_data.TextBatches(out, seed=3).batch(5, batch_size=4,
                                                  seq_len=64))
  assert not np.array_equal(x, source.batch(6, batch_size=4, seq_len=64))
  assert not np.array_equal(
      x, text_data.TextBatches(out, seed=4).batch(5, batch_size=4,
                                                  seq_len=64))
  # Crops are contiguous pieces of the split's stream.
  stream = np.asarray(text_data.load_shard(out, "train")[0], np.int32)
  windows = np.lib.stride_tricks.sliding_window_view(stream, 65)
  assert all((windows == row).all(axis=1).any() for row in x)
  heldout = source.batch(0, batch_size=2, seq_len=32, split="heldout")
  np.testing.assert_array_equal(
      heldout, source.batch(0, batch_size=2, seq_len=32, split="eval"))
  held_stream = np.asarray(text_data.load_shard(out, "heldout")[0], np.int32)
  held_windows = np.lib.stride_tricks.sliding_window_view(held_stream, 33)
  assert all((held_windows == row).all(axis=1).any() for row in heldout)
  docs = text_data.TextBatches(out, start="document").batch(
      0, batch_size=8, seq_len=16)
  np.testing.assert_array_equal(docs[:, 0], manifest["bos_id"])


def test_errors(dataset, tmp_path):
  out, _ = dataset
  missing = str(tmp_path / "nothing")
  for load in (text_data.load_tokenizer, text_data.load_manifest,
               lambda d: text_data.load_documents(d, "train"),
               text_data.TextBatches):
    with pytest.raises(ValueError, match="run experiments/prepare_text.py"):
      load(missing)
  with pytest.raises(ValueError, match="split"):
    text_data.load_documents(out, "test")
  source = text_data.TextBatches(out)
  with pytest.raises(ValueError, match="seq_len"):
    source.batch(0, batch_size=1, seq_len=10**7)
  with pytest.raises(ValueError, match="index"):
    source.batch(-1, batch_size=1, seq_len=8)
  with pytest.raises(ValueError, match="start"):
    text_data.TextBatches(out, start="middle")
  with pytest.raises(ValueError, match="heldout_fraction"):
    text_data.write_dataset(make_documents(4), str(tmp_path / "x"),
                            heldout_fraction=1.0)
  with pytest.raises(ValueError, match="vocab_size"):
    text_data.write_dataset(make_documents(4), str(tmp_path / "x"),
                            vocab_size=100)
  with pytest.raises(ValueError, match="at least 2"):
    text_data.write_dataset({"a": "text"}, str(tmp_path / "x"))
  with pytest.raises(ValueError, match="non-empty"):
    text_data.write_dataset({"a": "text", "b": ""}, str(tmp_path / "x"))
