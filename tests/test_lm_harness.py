"""The real-model harness (experiments/lm): SWORD text and token caching."""

import os
import struct
import zlib

import numpy as np
import pytest

from experiments.lm import sword

BLOCKS = [
    '<div sID="a" type="x-p"/> Psalm 1 <div eID="a" type="x-p"/>'
    '<div sID="b" type="x-p"/>Blessed is the man<note type="x-f">a note'
    '</note> that walketh &amp; <hi type="italic">standeth</hi> not.'
    '<div eID="b" type="x-p"/>' + " More words." * 30,
    "",                                        # an empty block is skipped
    "<title>Psalm 2</title> Why do the heathen rage? " * 10,
]


def _write_module(root, name, blocks):
  folder = root / "modules" / "comments" / "zcom" / name
  folder.mkdir(parents=True)
  data, index = b"", b""
  for text in blocks:
    raw = text.encode()
    packed = zlib.compress(raw) if raw else b""
    index += struct.pack("<III", len(data), len(packed), len(raw))
    data += packed
  (folder / "ot.czs").write_bytes(index)
  (folder / "ot.czz").write_bytes(data)


def test_read_module_strips_markup_and_keeps_paragraphs(tmp_path):
  _write_module(tmp_path, "TDavid", BLOCKS)   # folder names keep their case
  docs = sword.read_module(str(tmp_path), "tdavid", min_chars=50)
  assert [name for name, _ in docs] == ["tdavid/ot/0000", "tdavid/ot/0002"]
  first = docs[0][1]
  assert first.startswith("Psalm 1\n\nBlessed is the man that walketh & "
                          "standeth not.")
  assert "<" not in first and "a note" not in first
  assert docs[1][1].startswith("Psalm 2 Why do the heathen rage?")


def test_read_module_errors(tmp_path):
  with pytest.raises(ValueError, match="No SWORD module 'mhcc'"):
    sword.read_module(str(tmp_path), "mhcc")
  _write_module(tmp_path, "bad", BLOCKS)
  (tmp_path / "modules/comments/zcom/bad/ot.czs").write_bytes(b"12345")
  with pytest.raises(ValueError, match="not a SWORD block index"):
    sword.read_module(str(tmp_path), "bad")
  with pytest.raises(ValueError, match="Unknown SWORD modules"):
    sword.fetch_modules(["bad"])


def test_osis_to_text_is_idempotent_on_plain_text():
  text = "One paragraph.\n\nAnother, with 12 digits & more."
  assert sword.osis_to_text(text) == text
  assert np.all([sword.osis_to_text(sword.osis_to_text(b)) ==
                 sword.osis_to_text(b) for b in BLOCKS])


def test_load_texts_caches_tokens_and_rebuilds_when_stale(tmp_path):
  pytest.importorskip("gguf")
  from configs import eval_llm  # pylint: disable=g-import-not-at-top
  from experiments.lm import pretrained  # pylint: disable=g-import-not-at-top
  cfg = eval_llm.get_config("small")
  files = []
  for name, text in (("e.txt", "the theme\n\n\nof 12 docs"),
                     ("c.txt", "calibration text\n\n\nhere\n\n\nthree")):
    (tmp_path / name).write_text(text)
    files.append(str(tmp_path / name))
  cfg.text.files = tuple(files)
  cfg.text.cache = str(tmp_path / "cache" / "tokens.npz")
  _, tok, record = pretrained.load_model(cfg, str(tmp_path / "out"))
  assert record["num_layers"] == 2 and record["num_params"] > 0
  first = pretrained.load_texts(cfg, tok)
  assert [len(first[r]) for r in ("eval", "calibration")] == [2, 3]
  assert all(d[0] == tok.bos_id for d in first["eval"])
  assert tok.decode(first["eval"][1][1:]) == "of 12 docs"
  assert os.path.isfile(cfg.text.cache)
  again = pretrained.load_texts(cfg, tok)        # from the cache
  np.testing.assert_array_equal(again["eval"][0], first["eval"][0])
  (tmp_path / "e.txt").write_text("changed text")   # stale: rebuilt
  rebuilt = pretrained.load_texts(cfg, tok)
  assert tok.decode(rebuilt["eval"][0][1:]) == "changed text"
  cfg.text.max_tokens = 3                        # whole documents up to it
  assert len(pretrained.load_texts(cfg, tok)["calibration"]) == 1
