"""experiments.lm.text_data: splits, tokenizer, shards, batches (small texts)."""

import json
import os

import numpy as np
import pytest

from experiments.lm import text_data
from experiments.lm import text_extract

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
    with pytest.raises(ValueError, match="run python -m experiments.prepare_text"):
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


# ---------------------------------------------------------------- extraction
HTML = """<!DOCTYPE html><html><head><title>Page title</title>
<style>p { color: red }</style><script>var x = "<p>no</p>";</script></head>
<body><div class="navheader"><a href="a.html">Prev</a> <a>Next</a></div>
<div class="body"><h1>Virtual tables<a class="headerlink" href="#x">¶</a></h1>
<p>A virtual table is   an <b>object</b>
that is registered &amp; used &lt;here&gt;.</p>
<ul><li>One cannot create a trigger.</li><li>Nor an index.</li></ul>
<pre>SELECT *
  FROM t;</pre>
<div role="navigation">sidebar links</div></div>
<div id="ft"><p>Footer</p></div></body></html>"""


def test_html_to_text():
  text = text_extract.html_to_text(HTML)
  assert text == (
      "Virtual tables\n\n"
      "A virtual table is an object that is registered & used <here>.\n\n"
      "* One cannot create a trigger.\n\n* Nor an index.\n\n"
      "SELECT *\n  FROM t;\n")
  assert text_extract.html_to_text("<html><script>x</script></html>") == ""


POD = """#!/usr/bin/perl
code before pod

=head1 NAME X<name>

perlsyn - Perl syntax

=head2 Declarations

A B<scalar> holds I<undef> until C<< $x = 1 >> assigns it; see
L<perltrap> and L<the FAQ|perlfaq>, or L<perlop/"Quote and Quote-like
Operators">. E<lt>tagE<gt>

    my $x = 1;   # verbatim
    print $x;

=over 4

=item *

First point.

=item 2.

Second point.

=back

=begin html

<p>not for text</p>

=end html

=cut

sub f { 1 }
"""


def test_pod_to_text():
  assert text_extract.pod_to_text(POD) == (
      "NAME\n\nperlsyn - Perl syntax\n\nDeclarations\n\n"
      "A scalar holds undef until $x = 1 assigns it; see perltrap and the "
      'FAQ, or "Quote and Quote-like Operators" in perlop. <tag>\n\n'
      "    my $x = 1;   # verbatim\n    print $x;\n\n"
      "* First point.\n\n2. Second point.\n")


ROFF = r""".\" Copyright comment
.TH PIPE 7 2022-12-04 "Linux man-pages 6.03"
.de XX
.  bogus macro body
..
.SH NAME
pipe \- overview of pipes and FIFOs
.SH DESCRIPTION
A pipe has a
.I read end
and a
.IR "write end" .
See
.BR pipe (2)
for \fBmore\fP \(em or \[lq]less\[rq].
.PP
.EX
int fd[2];
pipe(fd);
.EE
.TP
.B O_NONBLOCK
Do not block.
.TS
l l.
A<TAB>B
.TE
""".replace("<TAB>", "\t")


def test_roff_to_text():
  assert text_extract.roff_to_text(ROFF) == (
      "PIPE(7)\n\nNAME\n\npipe - overview of pipes and FIFOs\n\n"
      "DESCRIPTION\n\nA pipe has a read end and a write end. See pipe(2) "
      "for more \u2014 or \u201cless\u201d.\n\n"
      "int fd[2];\npipe(fd);\n\nO_NONBLOCK Do not block.\n\nA  B\n")
  assert text_extract.roff_to_text(".so man2/pipe.2\n") == ""


def test_extracted_corpus_build_is_deterministic(tmp_path):
  docs = {f"web/page{i}.html": text_extract.html_to_text(HTML.replace(
      "Virtual", f"Virtual {i}")) for i in range(4)}
  docs |= {f"perl/p{i}.pod": text_extract.pod_to_text(POD) + f"Part {i}.\n"
           for i in range(4)}
  docs |= {f"man/m{i}.7": text_extract.roff_to_text(ROFF) * (i + 1)
           for i in range(4)}
  args = dict(vocab_size=300, heldout_fraction=0.25, long_doc_chars=1000,
              min_long_heldout=1)
  a = text_data.write_dataset(docs, str(tmp_path / "a"), **args)
  b = text_data.write_dataset(dict(reversed(list(docs.items()))),
                              str(tmp_path / "b"), **args)
  assert a == b
  for name in a["sha256"]:
    assert ((tmp_path / "a" / name).read_bytes()
            == (tmp_path / "b" / name).read_bytes()), name
  counts = a["source_tokens"]
  assert sorted(counts) == ["man", "perl", "web"]
  for split in text_data.SPLITS:
    assert sum(c[split] for c in counts.values()) == a["splits"][split][
        "num_tokens"]
    assert sum(c[f"{split}_documents"] for c in counts.values()) == a[
        "splits"][split]["num_documents"]


# ------------------------------------------------------------------ passkey
def _find(row, sub):
  sub = np.asarray(sub)
  for i in range(row.size - sub.size + 1):
    if np.array_equal(row[i:i + sub.size], sub):
      return i
  return -1


def test_passkey_augmentation(dataset):
  out, _ = dataset
  tok = text_data.load_tokenizer(out)
  plain = text_data.TextBatches(out, seed=1)
  assert plain.passkey_prob == 0.0
  assert plain.passkey_plan(0, 4) == [None] * 4
  aug = text_data.TextBatches(out, seed=1, passkey_prob=0.5)
  seq_len, rows = 96, 0
  chosen = 0
  for index in range(12):
    x = aug.batch(index, batch_size=8, seq_len=seq_len)
    base = plain.batch(index, batch_size=8, seq_len=seq_len)
    np.testing.assert_array_equal(
        x, text_data.TextBatches(out, seed=1, passkey_prob=0.5).batch(
            index, batch_size=8, seq_len=seq_len))
    for row, plan, crop in zip(x, aug.passkey_plan(index, 8), base):
      rows += 1
      if plan is None:
        np.testing.assert_array_equal(row, crop)    # plain text untouched
        continue
      chosen += 1
      key = plan["key"]
      assert len(key) == 5 and key.isdigit()
      needle, question, answer = text_data.passkey_parts(tok, key)
      assert row[0] == tok.bos_id
      # Question then answer close the sequence.
      np.testing.assert_array_equal(row[-len(answer):], answer)
      np.testing.assert_array_equal(
          row[-len(answer) - len(question):-len(answer)], question)
      # The needle sits at the requested depth of the filler.
      m = seq_len - len(needle) - len(question) - len(answer)
      p = int(round(plan["depth"] * m))
      np.testing.assert_array_equal(row[1 + p:1 + p + len(needle)], needle)
      np.testing.assert_array_equal(row[1:1 + p], crop[:p])
      assert tok.decode(row[1 + p:1 + p + len(needle)]) == (
          text_data.PASSKEY_NEEDLE.format(key=key))
  assert 0.3 < chosen / rows < 0.7
  # Held-out batches are never augmented.
  np.testing.assert_array_equal(
      aug.batch(0, batch_size=8, seq_len=seq_len, split="heldout"),
      plain.batch(0, batch_size=8, seq_len=seq_len, split="heldout"))
  every = text_data.TextBatches(out, seed=1, passkey_prob=1.0)
  plans = every.passkey_plan(3, 16)
  assert all(p is not None for p in plans)
  assert len({p["key"] for p in plans}) > 1
  with pytest.raises(ValueError, match="too short"):
    every.batch(0, batch_size=1, seq_len=8)
  with pytest.raises(ValueError, match="passkey_prob"):
    text_data.TextBatches(out, passkey_prob=1.5)
  with pytest.raises(ValueError, match="passkey_digits"):
    text_data.TextBatches(out, passkey_prob=0.1, passkey_digits=0)


def test_target_weights_mark_the_answer_of_passkey_rows(dataset):
  out, _ = dataset
  tok = text_data.load_tokenizer(out)
  weight = float(np.random.default_rng(3).uniform(2.0, 500.0))
  aug = text_data.TextBatches(out, seed=2, passkey_prob=0.5,
                              passkey_answer_weight=weight)
  seq_len, weighted_rows = 120, 0
  for index in range(6):
    x = aug.batch(index, batch_size=8, seq_len=seq_len)
    w = aug.target_weights(index, batch_size=8, seq_len=seq_len)
    assert w.shape == (8, seq_len) and w.dtype == np.float32
    for row, plan, row_w in zip(x, aug.passkey_plan(index, 8), w):
      if plan is None:
        np.testing.assert_array_equal(row_w, 1.0)
        continue
      weighted_rows += 1
      answer = text_data.passkey_parts(tok, plan["key"])[2]
      heavy = np.flatnonzero(row_w != 1.0)
      # Exactly the targets that are the answer's tokens (target j is
      # token j + 1 of the row).
      np.testing.assert_array_equal(
          heavy, np.arange(seq_len - len(answer), seq_len))
      np.testing.assert_array_equal(row[heavy + 1], answer)
      np.testing.assert_allclose(row_w[heavy], weight)
  assert weighted_rows > 0
  np.testing.assert_array_equal(
      aug.target_weights(0, batch_size=8, seq_len=seq_len, split="heldout"),
      1.0)
  unweighted = text_data.TextBatches(out, seed=2, passkey_prob=0.5)
  np.testing.assert_array_equal(
      unweighted.target_weights(0, batch_size=8, seq_len=seq_len), 1.0)
  with pytest.raises(ValueError, match="passkey_answer_weight"):
    text_data.TextBatches(out, passkey_prob=0.5, passkey_answer_weight=0.0)


def test_passkey_template_shared_with_eval():
  lm_eval = pytest.importorskip("experiments.lm.lm_eval")
  assert lm_eval.NEEDLE == text_data.PASSKEY_NEEDLE
  assert lm_eval.QUESTION == text_data.PASSKEY_QUESTION
  assert lm_eval.ANSWER == text_data.PASSKEY_ANSWER
