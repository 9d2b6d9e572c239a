"""Public-domain prose from Debian's SWORD modules, as plain-text documents.

    docs = sword.read_module("/usr/share/sword", "tdavid")  # [(name, text)]

SWORD "zText"/"zCom" modules keep their text in zlib blocks (`.bzz`/`.czz`,
one block per chapter or book) indexed by 12-byte little-endian records
(offset, compressed size, size) in `.bzs`/`.czs`; the text is OSIS markup.
Each block becomes one document (a psalm of Spurgeon's Treasury of David,
a book of the Bible...), paragraphs separated by blank lines.

`fetch_modules` gets the Debian packages (`apt-get download`, no root
install) on a machine that reaches Debian's archive.
"""

from __future__ import annotations

import glob
import html
import os
import re
import struct
import subprocess
import tempfile
import zlib

# Module name -> (Debian package, what it is).
MODULES = {
    "tdavid": ("sword-comm-tdavid", "C. H. Spurgeon, The Treasury of David "
               "(1869-1885)"),
    "mhcc": ("sword-comm-mhcc", "Matthew Henry, Concise Commentary (1706)"),
    "engWEB2015eb": ("sword-text-web", "World English Bible (2015)"),
    "engKJV2006eb": ("sword-text-kjv", "King James Version (1611/1769)"),
}

_PARAGRAPH = re.compile(r'<(?:div|p|lg|l)\b[^>]*(?:eID|/)[^>]*>|</p>|<lb\b[^>]*>')
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANKS = re.compile(r"\n\s*\n+")


def osis_to_text(markup: str) -> str:
  """OSIS markup -> plain text (notes dropped, paragraphs on blank lines)."""
  text = _NOTE.sub(" ", markup)
  text = _PARAGRAPH.sub("\n\n", text)
  text = html.unescape(_TAG.sub(" ", text))
  text = _SPACES.sub(" ", text)
  lines = [line.strip() for line in text.split("\n")]
  return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def module_dir(root: str, name: str) -> str:
  """The data folder of module `name` under a SWORD root (usr/share/sword)."""
  hits = [d for d in glob.glob(os.path.join(root, "modules", "*", "*", "*"))
          if os.path.basename(d).lower() == name.lower()]
  if not hits:
    raise ValueError(f"No SWORD module {name!r} under {root!r} (expected "
                     f"modules/*/*/{name.lower()}); fetch it with "
                     "fetch_modules.")
  return hits[0]


def read_module(root: str, name: str, *, min_chars: int = 200
                ) -> list[tuple[str, str]]:
  """Every block of a module as (name, plain text), Old then New Testament.

  Args:
    root: the SWORD root (holding modules/ and mods.d/).
    name: the module (see MODULES).
    min_chars: blocks with less text are dropped (headers, empty books).

  Raises:
    ValueError: for a missing module or a corrupt index.
  """
  folder = module_dir(root, name)
  docs = []
  for testament in ("ot", "nt"):
    index = glob.glob(os.path.join(folder, f"{testament}.?zs"))
    if not index:
      continue
    data_path = index[0][:-1] + "z"
    with open(index[0], "rb") as f:
      records = f.read()
    with open(data_path, "rb") as f:
      data = f.read()
    if len(records) % 12:
      raise ValueError(f"{index[0]} is not a SWORD block index (size "
                       f"{len(records)} is no multiple of 12).")
    for i in range(0, len(records), 12):
      offset, size, _ = struct.unpack("<III", records[i:i + 12])
      if size == 0:
        continue
      text = osis_to_text(zlib.decompress(data[offset:offset + size])
                          .decode("utf-8", "replace"))
      if len(text) >= min_chars:
        docs.append((f"{name}/{testament}/{i // 12:04d}", text))
  return docs


def fetch_modules(names, root: str | None = None) -> str:
  """Downloads and unpacks the Debian packages of SWORD modules.

  Args:
    names: module names (keys of MODULES).
    root: where to unpack (default a new temporary folder).

  Returns:
    The SWORD root (root/usr/share/sword).

  Raises:
    ValueError: for an unknown module, or when apt-get cannot download
      them (with what to do instead).
    subprocess.CalledProcessError: when dpkg-deb cannot unpack one.
  """
  unknown = sorted(set(names) - set(MODULES))
  if unknown:
    raise ValueError(f"Unknown SWORD modules {unknown}; known: "
                     f"{sorted(MODULES)}.")
  root = root or tempfile.mkdtemp(prefix="sword_")
  debs = os.path.join(root, "debs")
  os.makedirs(debs, exist_ok=True)
  packages = [MODULES[n][0] for n in names]
  download = ["apt-get", "download", *packages]
  if subprocess.run(download, cwd=debs, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL).returncode:
    # Stale or missing package lists: refresh them (root only) and retry.
    if os.geteuid() == 0:
      subprocess.run(["apt-get", "update", "-qq"], check=False,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if subprocess.run(download, cwd=debs, stdout=subprocess.DEVNULL
                      ).returncode:
      raise ValueError(
          f"`apt-get download {' '.join(packages)}` failed: run `apt-get "
          "update` (as root) first, or unpack the packages yourself and "
          "pass their usr/share/sword as text.sword_root, or use "
          "text.source='files'.")
  for deb in glob.glob(os.path.join(debs, "*.deb")):
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
  return os.path.join(root, "usr", "share", "sword")
