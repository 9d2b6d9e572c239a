r"""Prepare the real-text dataset: documents, held-out split, tokenizer, shards.

Downloads Debian packages with `apt-get download` (no install, no root
needed unless the package lists are missing), unpacks them with `dpkg -x`
into a temporary folder and collects one document per file:

  python3.11-doc       the reStructuredText sources of the Python 3.11
                       documentation (html/_sources/**/*.rst.txt, ~500
                       files, ~12 MB)
  debian-reference-en  the Debian Reference as plain text, one document
                       per chapter (~0.9 MB)

then `blasst_jax.text_data.write_dataset` holds out documents by a hash of
their names (some long ones always), trains a byte-level BPE tokenizer on
the training documents and writes uint16 shards, offsets and a manifest to
--out_dir. Same packages and flags give byte-identical files.

    python experiments/prepare_text.py                     # -> data/pydoc/
    python experiments/prepare_text.py --deb_dir=/tmp/debs # reuse .debs
    python experiments/prepare_text.py --packages=python3.11-doc \
        --vocab_size=4096 --out_dir=/tmp/pydoc4k
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from blasst_jax import text_data  # pylint: disable=g-import-not-at-top

PACKAGES = ("python3.11-doc", "debian-reference-en")

_OUT_DIR = flags.DEFINE_string("out_dir", text_data.DEFAULT_DATA_DIR,
                               "Folder to write the dataset to.")
_PACKAGES = flags.DEFINE_list("packages", list(PACKAGES),
                              f"Debian packages to read, of {PACKAGES}.")
_DEB_DIR = flags.DEFINE_string(
    "deb_dir", "", "Folder with the packages' .deb files already "
    "downloaded (NAME_*.deb); empty: apt-get download into a temp folder.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192,
                                   "Tokenizer vocabulary (with <|doc|>).")
_HELDOUT_FRACTION = flags.DEFINE_float(
    "heldout_fraction", 0.06, "Expected share of documents held out.")
_LONG_DOC_CHARS = flags.DEFINE_integer(
    "long_doc_chars", 40_000, "Documents longer than this count as long.")
_MIN_LONG_HELDOUT = flags.DEFINE_integer(
    "min_long_heldout", 4, "Long documents always held out (long-context "
    "evaluation).")


# ------------------------------------------------------------------- fetch
def _run(cmd: list[str], cwd: str | None = None) -> str:
  proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
  return proc.stdout


def find_deb(folder: str, package: str) -> str | None:
  debs = sorted(glob.glob(os.path.join(folder, f"{package}_*.deb")))
  return debs[-1] if debs else None


def download(package: str, folder: str) -> str:
  """`apt-get download package` into folder; returns the .deb path."""
  try:
    _run(["apt-get", "download", package], cwd=folder)
  except RuntimeError as e:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
      print("apt-get download failed; running apt-get update", flush=True)
      _run(["apt-get", "update"])
      _run(["apt-get", "download", package], cwd=folder)
    else:
      raise RuntimeError(f"{e}\nIf the package lists are missing, run "
                         "`sudo apt-get update` (or pass --deb_dir).") from e
  deb = find_deb(folder, package)
  if deb is None:
    raise RuntimeError(f"apt-get download {package} left no .deb in {folder}.")
  return deb


# ----------------------------------------------------------------- collect
def python_doc_documents(root: str) -> dict[str, str]:
  """{"python3.11-doc/<path>.rst": text} for every html/_sources file."""
  sources = os.path.join(root, "usr/share/doc/python3.11/html/_sources")
  paths = sorted(glob.glob(os.path.join(sources, "**", "*.rst.txt"),
                           recursive=True))
  if not paths:
    raise RuntimeError(f"No *.rst.txt files under {sources}.")
  docs = {}
  for path in paths:
    rel = os.path.relpath(path, sources)[:-len(".txt")]
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if text.strip():
      docs[f"python3.11-doc/{rel}"] = text
  return docs


# Headings separate number and title with no-break spaces.
_HEADING = re.compile(
    r"^(?:Preface|Chapter\s(\d+)\.\s.+|Appendix\s([A-Z])\.\s.+)$",
    re.MULTILINE)


def debian_reference_documents(root: str) -> dict[str, str]:
  """{"debian-reference-en/<section>": text}, one per chapter.

  The text before the first heading (title page) is dropped; a heading
  that repeats (the table of contents lists "Preface") keeps its last,
  full section.
  """
  path = os.path.join(root, "usr/share/debian-reference/"
                      "debian-reference.en.txt.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    text = f.read()
  matches = list(_HEADING.finditer(text))
  if not matches:
    raise RuntimeError(f"No chapter headings in {path}.")
  docs = {}
  for i, m in enumerate(matches):
    end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
    chapter, appendix = m.group(1), m.group(2)
    key = (f"chapter{int(chapter):02d}" if chapter else
           f"appendix{appendix.lower()}" if appendix else "preface")
    docs[f"debian-reference-en/{key}"] = text[m.start():end].strip() + "\n"
  return docs


COLLECTORS = {"python3.11-doc": python_doc_documents,
              "debian-reference-en": debian_reference_documents}


def collect(packages, deb_dir: str) -> tuple[dict[str, str], list[dict]]:
  """({name: text}, [source record]) of the packages."""
  documents, sources = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    for package in packages:
      if package not in COLLECTORS:
        raise ValueError(f"`packages` must be drawn from {PACKAGES}, got "
                         f"{package!r}.")
      deb = find_deb(deb_dir, package) if deb_dir else None
      if deb is None:
        if deb_dir:
          print(f"no {package}_*.deb in {deb_dir}; downloading", flush=True)
        deb = download(package, tmp)
      root = os.path.join(tmp, package)
      _run(["dpkg", "-x", deb, root])
      docs = COLLECTORS[package](root)
      documents.update(docs)
      sources.append({
          "package": package,
          "version": _run(["dpkg-deb", "-f", deb, "Version"]).strip(),
          "deb": os.path.basename(deb),
          "deb_sha256": text_data.file_sha256(deb),
          "num_documents": len(docs),
          "num_chars": sum(len(t) for t in docs.values())})
      print(f"{package} {sources[-1]['version']}: {len(docs)} documents, "
            f"{sources[-1]['num_chars'] / 1e6:.2f} M characters", flush=True)
  return documents, sources


def main(argv):
  del argv
  t0 = time.perf_counter()
  documents, sources = collect(_PACKAGES.value, _DEB_DIR.value)
  t1 = time.perf_counter()
  manifest = text_data.write_dataset(
      documents, _OUT_DIR.value, vocab_size=_VOCAB_SIZE.value,
      heldout_fraction=_HELDOUT_FRACTION.value,
      long_doc_chars=_LONG_DOC_CHARS.value,
      min_long_heldout=_MIN_LONG_HELDOUT.value, sources=sources)
  t2 = time.perf_counter()
  print(f"vocab_size {manifest['vocab_size']} (bos id {manifest['bos_id']})")
  for split, info in manifest["splits"].items():
    print(f"{split:8s} {info['num_documents']:4d} documents "
          f"({info['num_long_documents']} > {_LONG_DOC_CHARS.value} chars), "
          f"{info['num_tokens']:,} tokens, {info['num_chars']:,} chars "
          f"({info['num_chars'] / info['num_tokens']:.2f} chars/token), "
          f"longest {info['longest_document_tokens']:,} tokens")
  print(f"collected in {t1 - t0:.1f} s, tokenizer + shards in "
        f"{t2 - t1:.1f} s; written to {os.path.abspath(_OUT_DIR.value)}")


if __name__ == "__main__":
  app.run(main)
