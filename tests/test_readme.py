"""The README is a front page whose code runs as pasted and whose links resolve."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_is_a_front_page():
  lines = README.read_text().splitlines()
  assert len(lines) <= 200, f"README has {len(lines)} lines; move detail to docs/"
  assert python_blocks(README.read_text()), "the README lost its quickstart"


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_code_runs_as_pasted(index, capsys):
  code = python_blocks(README.read_text())[index]
  exec(compile(code, f"README.md python block {index}", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip(), "the block printed nothing"


def test_readme_and_docs_links_resolve():
  """Every relative link of the README and of docs/*.md names a file that
  exists (anchors and web addresses aside)."""
  pages = [README] + sorted((ROOT / "docs").glob("*.md"))
  missing = []
  for page in pages:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
      if re.match(r"[a-z]+://", target) or target.startswith("#"):
        continue
      path = (page.parent / target.split("#")[0]).resolve()
      if not path.exists():
        missing.append(f"{page.relative_to(ROOT)} -> {target}")
  assert not missing, "links to nothing: " + ", ".join(missing)
