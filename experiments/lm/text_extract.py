"""Plain text out of documentation markup: HTML, POD and roff (man pages).

Standard library only (`html.parser`, `re`); deterministic. Used by
`experiments/prepare_text.py` to turn Debian's documentation packages into
documents for `experiments.lm.text_data.write_dataset`:

    text = text_extract.html_to_text(open("page.html").read())
    text = text_extract.pod_to_text(open("perlfunc.pod").read())
    text = text_extract.roff_to_text(open("ls.1").read())
"""

from __future__ import annotations

import html
from html import parser as html_parser
import re

# Each function maps markup to text deterministically; paragraphs are
# separated by blank lines, code blocks keep their lines.
_HTML_SKIP_TAGS = frozenset({
    "script", "style", "head", "nav", "noscript", "svg", "form", "button",
    "select", "textarea", "template", "map"})
# class / id values of page furniture in Sphinx, DocBook and hand-written
# pages (navigation bars, sidebars, search boxes, permalink markers).
HTML_SKIP_CLASSES = frozenset({
    "navheader", "navfooter", "sphinxsidebar", "sidebar", "related",
    "footer", "nosearch", "menu", "searchmenu", "submenu", "searchbox",
    "headerlink", "global-nav", "hd", "ft", "breadcrumbs", "toc",
    "toctree-wrapper", "skip-link", "rst-footer-buttons", "docnav",
    "banner"})
_HTML_BLOCK = frozenset({
    "p", "div", "section", "article", "main", "aside", "br", "hr", "li",
    "ul", "ol", "dl", "dt", "dd", "table", "tr", "thead", "tbody", "pre",
    "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "title", "caption",
    "figure", "figcaption", "body", "html", "center", "address"})
_HTML_VOID = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link",
    "meta", "param", "source", "track", "wbr"})


class _HTMLText(html_parser.HTMLParser):
  """Collects the text of an HTML page (see `html_to_text`)."""

  def __init__(self, skip_classes):
    super().__init__(convert_charrefs=True)
    self.skip_classes = skip_classes
    self.parts = []          # str pieces; "\n" marks a block boundary
    self.skip = None         # [tag, depth] of the element being skipped
    self.pre = 0

  def _skipped(self, tag, attrs) -> bool:
    if tag in _HTML_SKIP_TAGS:
      return True
    for k, v in attrs:
      if k in ("class", "id", "role") and v and (
          set(v.split()) & self.skip_classes or v == "navigation"):
        return True
    return False

  def handle_starttag(self, tag, attrs):
    if self.skip is not None:
      if tag == self.skip[0] and tag not in _HTML_VOID:
        self.skip[1] += 1
      return
    if tag not in _HTML_VOID and self._skipped(tag, attrs):
      self.skip = [tag, 1]
      return
    if tag == "pre":
      self.pre += 1
    if tag in _HTML_BLOCK:
      self.parts.append("\n")
      if tag == "li":
        self.parts.append("* ")
    elif tag in ("td", "th"):
      self.parts.append(" ")

  def handle_startendtag(self, tag, attrs):
    if self.skip is None and tag in _HTML_BLOCK:
      self.parts.append("\n")

  def handle_endtag(self, tag):
    if self.skip is not None:
      if tag == self.skip[0]:
        self.skip[1] -= 1
        if not self.skip[1]:
          self.skip = None
      return
    if tag == "pre" and self.pre:
      self.pre -= 1
    if tag in _HTML_BLOCK:
      self.parts.append("\n")

  def handle_data(self, data):
    if self.skip is not None:
      return
    if self.pre:
      # Keep the lines of code; a block boundary after each line.
      lines = data.split("\n")
      for i, line in enumerate(lines):
        if i:
          self.parts.append("\n")
        self.parts.append("\0" + line if line else "")
    else:
      self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str, *, skip_classes=HTML_SKIP_CLASSES) -> str:
  """Visible text of an HTML page, one paragraph per block element.

  Drops <head>, scripts, styles, navigation and elements whose class, id
  or role names page furniture (`skip_classes`); keeps the lines of <pre>
  blocks; list items start with "* ". Character references are decoded.

  Args:
    html: the page source.
    skip_classes: class / id values whose elements (with their contents)
      are dropped.

  Returns:
    The text: blocks separated by single blank lines, words by single
    spaces, "" for a page without text.
  """
  parser = _HTMLText(frozenset(skip_classes))
  parser.feed(html)
  parser.close()
  blocks, lines = [], []
  for line in "".join(parser.parts).split("\n"):
    if line.startswith("\0"):            # a <pre> line: verbatim
      lines.append(line.replace("\0", "").rstrip())
      continue
    line = line.replace("\0", "").strip()
    line = re.sub(r" {2,}", " ", line)
    if line:
      lines.append(line)
    elif lines:
      blocks.append("\n".join(lines))
      lines = []
  if lines:
    blocks.append("\n".join(lines))
  text = "\n\n".join(b.strip("\n") for b in blocks if b.strip())
  return text + "\n" if text else ""


# C<text>, and C<< text >> / C<<< text >>> (n brackets each side).
_POD_CODES = tuple(
    re.compile(r"([A-Z])" + "<" * n + r"\s+(.*?)\s+" + ">" * n, re.DOTALL)
    for n in (4, 3, 2)) + (re.compile(r"([A-Z])<([^<>]*)>"),)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/",
                "quot": '"', "amp": "&", "apos": "'", "nbsp": " "}


def _pod_inline(text: str) -> str:
  """Text of a POD paragraph with its formatting codes (B<>, L<>...) resolved."""

  def repl(m):
    code, body = m.group(1), m.group(2)
    if code in ("X", "Z"):
      return ""
    if code == "E":
      if body.isdigit():
        return chr(int(body))
      if body.lower().startswith("0x"):
        return chr(int(body, 16))
      return _POD_ESCAPES.get(body, html.unescape(f"&{body};"))
    if code == "L":
      if "|" in body:
        return body.split("|", 1)[0]
      name, _, section = body.partition("/")
      section = section.strip('"')
      return f'"{section}" in {name}' if name and section else (
          section or name)
    return body

  # Innermost single-bracket codes first, until none is left.
  for pattern in _POD_CODES:
    for _ in range(16):
      new = pattern.sub(repl, text)
      if new == text:
        break
      text = new
  return text


def pod_to_text(pod: str) -> str:
  """Text of a Perl POD document.

  Headings become their own paragraphs, `=item` paragraphs start with
  "* " (bullets) or their label, formatting codes are resolved (L<text|x>
  reads "text", E<gt> reads ">", X<> and Z<> vanish), verbatim (indented)
  paragraphs are kept as code, `=begin`/`=end` and `=for` blocks for other
  formatters and everything outside `=pod` ... `=cut` are dropped.

  Args:
    pod: the POD source (a .pod file, or Perl code with POD in it).

  Returns:
    The text, paragraphs separated by single blank lines.
  """
  out = []
  in_pod = False
  begin = []                 # formats of open =begin blocks
  paragraphs = re.split(r"\n[ \t]*\n", pod.replace("\r\n", "\n"))
  for para in paragraphs:
    if not para.strip():
      continue
    if para.startswith("="):
      m = re.match(r"=(\w+)\s*(.*)", para, re.DOTALL)
      command, arg = (m.group(1), m.group(2).strip()) if m else ("", "")
      if command == "cut":
        in_pod = False
        continue
      in_pod = True
      if command == "begin":
        begin.append(arg.split()[0] if arg else "")
      elif command == "end":
        if begin:
          begin.pop()
      elif begin and begin[-1] not in ("text", ":text"):
        continue
      elif command.startswith("head"):
        out.append(" ".join(_pod_inline(arg).split()))
      elif command == "item":
        label = " ".join(_pod_inline(arg).split())
        if label in ("", "*"):
          out.append("*")
        elif re.fullmatch(r"\d+\.?", label):
          out.append(label.rstrip(".") + ".")
        else:
          out.append(label)
      # =pod, =over, =back, =encoding, =for: nothing to show.
      continue
    if not in_pod:
      continue
    if begin and begin[-1] not in ("text", ":text"):
      continue
    if para[0] in " \t":                   # verbatim
      out.append(para.rstrip())
    else:
      body = _pod_inline(" ".join(para.split()))
      if out and (out[-1] == "*" or re.fullmatch(r"\d+\.", out[-1])):
        out[-1] = f"{out[-1]} {body}"
      else:
        out.append(body)
  text = "\n\n".join(p for p in out if p.strip())
  return text + "\n" if text else ""


_ROFF_NAMED = {
    "em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "ha": "^", "ti": "~",
    "rs": "\\", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae",
    "tm": "\u2122", "de": "\u00b0", "mu": "\u00d7", "di": "\u00f7",
    "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260",
    "->": "\u2192", "<-": "\u2190", "hy": "-", "mi": "-", "pl": "+",
    "eq": "=", "sl": "/", "ba": "|", "or": "|", "at": "@", "sh": "#",
    "Do": "$", "ga": "`", "aa": "\u00b4", "sc": "\u00a7", "ps": "\u00b6",
    "dg": "\u2020", "fo": "\u2039", "fc": "\u203a", "Fo": "\u00ab",
    "Fc": "\u00bb", "ss": "\u00df", "lB": "[", "rB": "]", "lC": "{",
    "rC": "}", "la": "\u27e8", "ra": "\u27e9", "ua": "\u2191",
    "da": "\u2193", "u2002": " "}
_ROFF_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"              # font: \fB \f(CW \f[CR]
    r"|s[-+]?(?:\d|\(\d\d|\[\d+\])"        # size
    r"|\*(?:\[([^\]]*)\]|\((..)|(.))"      # string: \*(lq \*[x] \*R
    r"|\((..)"                             # named character \(em
    r"|\[([^\]]*)\]"                       # named character \[em]
    r"|[kmnMgVY](?:\[[^\]]*\]|\(..|.)"     # registers, colours
    r"|[hvwlLDoHSbxXNRzAZ]'[^']*'"         # motions, widths, ...
    r"|(.)"                                # one-character escapes
    r")", re.DOTALL)
_ROFF_SIMPLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ",
                "0": " ", "'": "\u00b4", "`": "`", ".": ".", "t": "\t",
                "_": "_", "%": "", "&": "", "|": "", "^": "", "c": "",
                "/": "", ",": "", ")": "", ":": "", "d": "", "u": "",
                "r": "", "p": "", "{": "", "}": "", "!": "", "E": ""}
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae",
                 "Tm": "\u2122", "S": "", "(Tm": "\u2122"}


def _roff_escapes(line: str) -> str:
  def repl(m):
    string = m.group(1) or m.group(2) or m.group(3)
    if string is not None:
      return _ROFF_STRINGS.get(string, "")
    named = m.group(4) or m.group(5)
    if named is not None:
      if named.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", named):
        return chr(int(named[1:], 16))
      return _ROFF_NAMED.get(named, "")
    simple = m.group(6)
    if simple is not None:
      return _ROFF_SIMPLE.get(simple, simple)
    return ""
  return _ROFF_ESCAPE.sub(repl, line)


def _roff_args(rest: str) -> list[str]:
  """Macro arguments: words, or "quoted strings" ("" is a quote)."""
  return [a[1:-1].replace('""', '"') if a.startswith('"') else a
          for a in re.findall(r'"(?:[^"]|"")*"?|\S+', rest)]


# Alternating-font macros: the arguments joined without spaces.
_ROFF_ALTERNATING = frozenset({"BR", "RB", "IR", "RI", "BI", "IB"})
_ROFF_PARAGRAPH = frozenset({"PP", "P", "LP", "sp", "HP", "IP", "TP", "TQ",
                             "SH", "SS", "RS", "RE", "EX", "EE", "nf", "fi",
                             "TS", "TE", "in", "br", "SY", "YS", "UE", "ME"})


def roff_to_text(roff: str) -> str:
  """Text of a man(7) page (roff source).

  `.TH` becomes a "name(section)" title line, `.SH`/`.SS` headings their
  own paragraphs; filled text is joined into paragraphs, `.nf`/`.EX` and
  tbl blocks keep their lines; font and size escapes vanish, named
  characters (\\(em, \\[aq], \\-) become their Unicode characters; comments,
  macro definitions, conditionals and other requests are dropped. A page
  that only sources another (`.so`) has no text of its own.

  Args:
    roff: the page source.

  Returns:
    The text, paragraphs separated by single blank lines ("" for `.so`
    pages).
  """
  out, para = [], []
  fill = True
  table = None               # None, "format" or "data"
  skip_until = None          # end of a macro definition / ignore block

  def flush():
    if para:
      out.append((" ".join(para) if fill else "\n".join(para)).rstrip())
      para.clear()

  lines = roff.replace("\r\n", "\n").split("\n")
  i = 0
  while i < len(lines):
    line = lines[i]
    i += 1
    while line.endswith("\\") and not line.endswith("\\\\") and i < len(
        lines):                                    # continuation
      line = line[:-1] + lines[i]
      i += 1
    if skip_until is not None:
      if line.strip() == skip_until:
        skip_until = None
      continue
    if re.match(r"^[.']\s*\\\"", line) or line.startswith('\\"'):
      continue                                     # comment
    line = re.sub(r'\\".*$', "", line)
    if table is not None:
      if line.startswith(".TE"):
        table = None
        flush()
        continue
      if table == "format":
        if line.rstrip().endswith("."):
          table = "data"
        continue
      if line.startswith((".", "'")):
        continue
      cells = [_roff_escapes(c).strip() for c in line.split("\t")]
      cells = [c for c in cells if c not in ("T{", "T}", "_", "=")]
      text = "  ".join(c.replace("T{", "").replace("T}", "") for c in cells)
      if text.strip():
        para.append(text.strip())
      continue
    m = re.match(r"^[.']\s*(\S+)\s*(.*)$", line)
    if not m:
      text = _roff_escapes(line)
      if fill:
        text = text.strip()
        if text:
          para.append(text)
        else:
          flush()
      else:
        para.append(text.rstrip())
      continue
    macro, rest = m.group(1), m.group(2)
    if macro == "so":
      return ""
    if macro in ("de", "de1", "am", "ig"):
      skip_until = ".." if macro != "ig" or not rest.strip() else (
          "." + rest.strip())
      continue
    if macro == "TH":
      args = _roff_args(rest)
      flush()
      if args:
        out.append(_roff_escapes(
            f"{args[0]}({args[1]})" if len(args) > 1 else args[0]))
      continue
    if macro in ("SH", "SS"):
      flush()
      fill = True
      heading = rest.strip() or (lines[i] if i < len(lines) else "")
      if not rest.strip():
        i += 1
      out.append(_roff_escapes(" ".join(_roff_args(heading))))
      continue
    if macro in ("TS",):
      flush()
      table = "format"
      continue
    if macro in ("nf", "EX"):
      flush()
      fill = False
      continue
    if macro in ("fi", "EE"):
      flush()
      fill = True
      continue
    if macro in ("TP", "TQ"):
      flush()
      continue
    if macro == "IP":
      flush()
      args = _roff_args(rest)
      if args and args[0] not in ("", r"\(bu", r"\[bu]", "*", r"\(em"):
        para.append(_roff_escapes(args[0]))
      elif args:
        para.append("*")
      continue
    if macro in _ROFF_PARAGRAPH:
      flush()
      continue
    if macro in ("B", "I", "SM", "SB", "R", "UR", "MT", "OP"):
      args = _roff_args(rest)
      if macro in ("UR", "MT"):
        args = [f"<{a}>" for a in args]
      if macro == "OP":
        args = ["[" + " ".join(args) + "]"]
      if not args and i < len(lines):               # applies to next line
        continue
      para.append(_roff_escapes(" ".join(args)))
      continue
    if macro in _ROFF_ALTERNATING:
      para.append(_roff_escapes("".join(_roff_args(rest))))
      continue
    # Any other request (.ad, .ft, .if, .ie, .el, .ne, .ds, .nr, .hy, .ll,
    # .PD, .ti, ...): no text.
  flush()
  text = "\n\n".join(p for p in out if p.strip())
  return text + "\n" if text else ""
