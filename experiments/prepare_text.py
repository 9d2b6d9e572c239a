r"""Prepare the real-text dataset: documents, held-out split, tokenizer, shards.

Downloads Debian packages (all from Debian main) with `apt-get download`
(no install; an `apt-get update` is run if the package lists are missing
and we are root), unpacks them with `dpkg -x` into a temporary folder and
extracts one document of plain English text per file or chapter. Named
corpora (--corpus; the output goes to data/<corpus>/):

  debian_en (default, 17 packages, ~78 M characters, ~21.6 M tokens):
    python3.11-doc        Python 3.11 documentation, reStructuredText
                          sources (html/_sources/**/*.rst.txt)
    debian-reference-en   the Debian Reference, plain text, per chapter
    linux-doc-6.1         the Linux kernel documentation, reStructuredText
                          sources (translations/ left out: not English)
    perl-doc              the Perl manuals, POD (pod/*.pod)
    postgresql-doc-15     the PostgreSQL 15 manual, HTML
    python-django-doc     the Django 3.2 documentation, HTML
    sqlite3-doc           the SQLite documentation, HTML
    git-doc               the Git manuals and guides, AsciiDoc (*.txt)
    manpages, manpages-dev
                          the Linux man-pages project, roff
    python-sqlalchemy-doc the SQLAlchemy 1.4 documentation, reStructuredText
    sphinx-doc, python-pytest-doc, python-celery-doc
                          Sphinx, pytest and Celery documentation,
                          reStructuredText sources
    debian-policy, developers-reference
                          Debian Policy and Developer's Reference,
                          reStructuredText sources
    debian-handbook       The Debian Administrator's Handbook, HTML (en-US)
  pydoc (the first two only, ~13 M characters, ~3 M tokens)

HTML, POD and roff become plain text with `text_extract.html_to_text`,
`pod_to_text` and `roff_to_text`; reStructuredText, AsciiDoc and plain text
are kept as they are. Pages without prose of their own (indexes, search
pages, `.so` man-page links, highlighted source code) are left out, as are
documents under --min_doc_chars characters and exact duplicates (the
first name in sorted order is kept). Then
`experiments.lm.text_data.write_dataset` holds out documents by a hash of their
names (some long ones always), trains a byte-level BPE tokenizer on the
training documents and writes uint16 shards, offsets and a manifest
(sources, package versions and sha256, token counts per source) to
--out_dir. Same packages and flags give byte-identical files.

    python -m experiments.prepare_text                     # -> data/debian_en/
    python -m experiments.prepare_text --corpus=pydoc      # -> data/pydoc/
    python -m experiments.prepare_text --deb_dir=/tmp/debs # reuse .debs
    python -m experiments.prepare_text --packages=python3.11-doc,perl-doc \
        --vocab_size=4096 --out_dir=/tmp/small4k
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time

from absl import app
from absl import flags

from experiments import repo_path
from experiments.lm import text_data
from experiments.lm import text_extract

CORPORA = {
    "debian_en": ("python3.11-doc", "debian-reference-en", "linux-doc-6.1",
                  "perl-doc", "postgresql-doc-15", "python-django-doc",
                  "sqlite3-doc", "git-doc", "manpages", "manpages-dev",
                  "python-sqlalchemy-doc", "sphinx-doc", "debian-handbook",
                  "debian-policy", "developers-reference",
                  "python-pytest-doc", "python-celery-doc"),
    "pydoc": ("python3.11-doc", "debian-reference-en"),
}
DEFAULT_CORPUS = "debian_en"
PACKAGES = CORPORA[DEFAULT_CORPUS]

_CORPUS = flags.DEFINE_enum("corpus", DEFAULT_CORPUS, list(CORPORA),
                           "Named corpus: its packages and data/<corpus>/.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", "", "Folder to write the dataset to; empty: the "
    "repository's data/<corpus>.")
_PACKAGES = flags.DEFINE_list(
    "packages", [], f"Debian packages to read (of {PACKAGES}); empty: "
    "those of --corpus.")
_MIN_DOC_CHARS = flags.DEFINE_integer(
    "min_doc_chars", 200, "Shorter documents are left out (all sources "
    "but the two of the pydoc corpus).")
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


def read_text(path: str) -> str:
  """A file's text (gunzipped if .gz): UTF-8, else Latin-1."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return data.decode("latin-1")


def tree_documents(root: str, base: str, patterns, prefix: str, convert=None,
                   *, exclude=(), strip_suffix: str = "") -> dict[str, str]:
  """{"<prefix>/<path under base>": text} of the files matching patterns.

  Args:
    root: where the package was unpacked.
    base: folder inside root (may hold one glob, e.g. a version).
    patterns: glob patterns relative to base ("**" recurses).
    prefix: first component of the document names (the package).
    convert: text -> plain text (None: kept as it is).
    exclude: regular expressions; a relative path that matches one (from
      its start) is skipped.
    strip_suffix: removed from the end of the names (".txt" of
      "x.rst.txt", ".gz").
  """
  bases = sorted(glob.glob(os.path.join(root, base)))
  if len(bases) != 1:
    raise RuntimeError(f"Expected one folder {base} under {root}, found "
                       f"{len(bases)}.")
  paths = sorted({p for pattern in patterns for p in glob.glob(
      os.path.join(bases[0], pattern), recursive=True)})
  if not paths:
    raise RuntimeError(f"No {patterns} files under {bases[0]}.")
  docs = {}
  for path in paths:
    rel = os.path.relpath(path, bases[0])
    if any(re.match(x, rel) for x in exclude) or not os.path.isfile(path):
      continue
    if strip_suffix and rel.endswith(strip_suffix):
      rel = rel[:-len(strip_suffix)]
    text = read_text(path)
    if convert is not None:
      text = convert(text)
    if text.strip():
      docs[f"{prefix}/{rel}"] = text
  return docs


def _sphinx_sources(root: str, base: str, prefix: str) -> dict[str, str]:
  """The reStructuredText sources a Sphinx HTML build keeps in _sources/."""
  return tree_documents(root, base, ["**/*.txt"], prefix, strip_suffix=".txt")


_SPHINX_NOT_PROSE = (r"(.*/)?(_modules|_static|_images)/",
                     r"(genindex|search|py-modindex|contents)\.html$")

COLLECTORS = {
    "python3.11-doc": python_doc_documents,
    "debian-reference-en": debian_reference_documents,
    "linux-doc-6.1": lambda r: tree_documents(
        r, "usr/share/doc/linux-doc-6.1/html/_sources", ["**/*.rst.txt"],
        "linux-doc-6.1", exclude=[r"translations/"], strip_suffix=".txt"),
    # perlcn / perljp / perlko / perltw are written in Chinese, Japanese
    # and Korean.
    "perl-doc": lambda r: tree_documents(
        r, "usr/share/perl/5.*/pod", ["*.pod"], "perl-doc",
        text_extract.pod_to_text, exclude=[r"perl(cn|jp|ko|tw)\.pod$"]),
    "postgresql-doc-15": lambda r: tree_documents(
        r, "usr/share/doc/postgresql-doc-15/html", ["*.html"],
        "postgresql-doc-15", text_extract.html_to_text,
        exclude=[r"(bookindex|index)\.html$"]),
    "python-django-doc": lambda r: tree_documents(
        r, "usr/share/doc/python-django-doc/html", ["**/*.html"],
        "python-django-doc", text_extract.html_to_text,
        exclude=_SPHINX_NOT_PROSE),
    # syntax/: railroad diagrams.
    "sqlite3-doc": lambda r: tree_documents(
        r, "usr/share/doc/sqlite3", ["**/*.html"], "sqlite3-doc",
        text_extract.html_to_text,
        exclude=[r"syntax/", r"(sitemap|keyword_index|toc|docs)\.html$"]),
    "git-doc": lambda r: tree_documents(
        r, "usr/share/doc/git-doc", ["**/*.txt"], "git-doc"),
    "manpages": lambda r: tree_documents(
        r, "usr/share/man", ["man*/*.gz"], "manpages",
        text_extract.roff_to_text, strip_suffix=".gz"),
    "manpages-dev": lambda r: tree_documents(
        r, "usr/share/man", ["man*/*.gz"], "manpages-dev",
        text_extract.roff_to_text, strip_suffix=".gz"),
    "python-sqlalchemy-doc": lambda r: tree_documents(
        r, "usr/share/doc/python-sqlalchemy-doc/rst", ["**/*.rst"],
        "python-sqlalchemy-doc"),
    "sphinx-doc": lambda r: _sphinx_sources(
        r, "usr/share/doc/sphinx-doc/html/_sources", "sphinx-doc"),
    "python-pytest-doc": lambda r: _sphinx_sources(
        r, "usr/share/doc/python-pytest-doc/html/_sources",
        "python-pytest-doc"),
    "python-celery-doc": lambda r: _sphinx_sources(
        r, "usr/share/doc/python-celery-doc/html/_sources",
        "python-celery-doc"),
    "debian-policy": lambda r: _sphinx_sources(
        r, "usr/share/doc/debian-policy/policy.html/_sources",
        "debian-policy"),
    "developers-reference": lambda r: _sphinx_sources(
        r, "usr/share/developers-reference/_sources",
        "developers-reference"),
    # en-US/ only: the other folders are translations.
    "debian-handbook": lambda r: tree_documents(
        r, "usr/share/doc/debian-handbook/html/en-US", ["*.html"],
        "debian-handbook", text_extract.html_to_text,
        exclude=[r"(index|ix01)\.html$"]),
}
# Kept exactly as extracted (the original, small corpus).
_UNFILTERED = frozenset(CORPORA["pydoc"])


def _version_component(package: str, version: str) -> str | None:
  """The archive component ("main", ...) of package=version, if apt knows."""
  try:
    info = _run(["apt-cache", "show", f"{package}={version}"])
  except (RuntimeError, OSError):
    return None
  m = re.search(r"^Filename: pool/([^/]+)/", info, re.MULTILINE)
  return m.group(1) if m else None


def filter_documents(docs: dict[str, str], *, min_chars: int,
                     seen: dict[str, str]) -> tuple[dict[str, str], dict]:
  """Drops short documents and exact duplicates of earlier ones.

  Args:
    docs: {name: text} of one package.
    min_chars: shorter documents are dropped.
    seen: {sha256 of text: name} of the documents kept so far (updated).

  Returns:
    (kept documents, {"short": n, "duplicate": n} dropped).
  """
  kept, dropped = {}, {"short": 0, "duplicate": 0}
  for name in sorted(docs):
    text = docs[name]
    if len(text) < min_chars:
      dropped["short"] += 1
      continue
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest in seen:
      dropped["duplicate"] += 1
      continue
    seen[digest] = name
    kept[name] = text
  return kept, dropped


def collect(packages, deb_dir: str, *, min_doc_chars: int = 200
            ) -> tuple[dict[str, str], list[dict]]:
  """({name: text}, [source record]) of the packages, in the order given."""
  documents, sources, seen = {}, [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for package in packages:
      if package not in COLLECTORS:
        raise ValueError(f"`packages` must be drawn from {tuple(COLLECTORS)}, "
                         f"got {package!r}.")
      t0 = time.perf_counter()
      deb = find_deb(deb_dir, package) if deb_dir else None
      if deb is None:
        if deb_dir:
          print(f"no {package}_*.deb in {deb_dir}; downloading", flush=True)
        deb = download(package, tmp)
      root = os.path.join(tmp, package)
      _run(["dpkg", "-x", deb, root])
      docs = COLLECTORS[package](root)
      shutil.rmtree(root)
      dropped = {"short": 0, "duplicate": 0}
      if package not in _UNFILTERED:
        docs, dropped = filter_documents(docs, min_chars=min_doc_chars,
                                         seen=seen)
      else:
        seen.update((hashlib.sha256(t.encode()).hexdigest(), n)
                    for n, t in sorted(docs.items()))
      clash = set(docs) & set(documents)
      if clash:
        raise RuntimeError(f"Document names of {package} repeat: "
                           f"{sorted(clash)[:3]}")
      documents.update(docs)
      version = _run(["dpkg-deb", "-f", deb, "Version"]).strip()
      sources.append({
          "package": package,
          "version": version,
          "section": _run(["dpkg-deb", "-f", deb, "Section"]).strip(),
          "component": _version_component(package, version),
          "deb": os.path.basename(deb),
          "deb_sha256": text_data.file_sha256(deb),
          "num_documents": len(docs),
          "num_chars": sum(len(t) for t in docs.values()),
          "dropped": dropped})
      print(f"{package} {version}: {len(docs)} documents, "
            f"{sources[-1]['num_chars'] / 1e6:.2f} M characters (dropped "
            f"{dropped['short']} short, {dropped['duplicate']} duplicate; "
            f"{time.perf_counter() - t0:.1f} s)", flush=True)
  return documents, sources


def main(argv):
  del argv
  t0 = time.perf_counter()
  packages = _PACKAGES.value or list(CORPORA[_CORPUS.value])
  out_dir = _OUT_DIR.value or repo_path("data", _CORPUS.value)
  documents, sources = collect(packages, _DEB_DIR.value,
                               min_doc_chars=_MIN_DOC_CHARS.value)
  t1 = time.perf_counter()
  manifest = text_data.write_dataset(
      documents, out_dir, vocab_size=_VOCAB_SIZE.value,
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
  print("tokens per source (train / heldout):")
  for name, info in sorted(manifest["source_tokens"].items()):
    print(f"  {name:24s} {info['train']:>12,} {info['heldout']:>10,}")
  print(f"collected in {t1 - t0:.1f} s, tokenizer + shards in "
        f"{t2 - t1:.1f} s; written to {os.path.abspath(out_dir)}")


if __name__ == "__main__":
  app.run(main)
