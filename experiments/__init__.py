"""absl experiment scripts, run as modules of this package:

    python -m experiments.demo --config=configs/demo.py

from the repository root, or from anywhere with the repository on
PYTHONPATH (then give `--config` as a path that resolves from there; the
default is always the repository's own config). Inputs that live in the
repository (configs/, data/) are found through `repo_path`, so a script
reads the same files whatever the working directory; outputs go where the
config says (relative paths: the working directory).
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(*parts: str) -> str:
  """The absolute path of `parts` inside the repository, e.g.
  `repo_path("data", "debian_en")`."""
  return os.path.join(ROOT, *parts)


def config_file(name: str) -> str:
  """configs/NAME.py of the repository: a script's default `--config`."""
  return repo_path("configs", f"{name}.py")
