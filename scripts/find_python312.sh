#!/usr/bin/env bash
# Prints the path of a working Python 3.12 interpreter, or explains what to
# install and exits 1. `python3.12` may be a pyenv shim that fails unless a
# version is selected, so every candidate is actually run.
set -u
candidates=("${PYTHON:-}" python3.12)
if command -v pyenv >/dev/null 2>&1; then
  for p in "$(pyenv root)"/versions/3.12*/bin/python3.12; do candidates+=("$p"); done
fi
for p in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
  candidates+=("$p")
done
for p in "${candidates[@]}"; do
  [ -n "$p" ] || continue
  if "$p" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    command -v "$p" 2>/dev/null || echo "$p"
    exit 0
  fi
done
echo "error: Python 3.12 not found (jax==0.11.2 needs it)." >&2
echo "Install it, e.g. 'pyenv install 3.12' or 'apt-get install python3.12 python3.12-venv'," >&2
echo "or point PYTHON=/path/to/python3.12 at one." >&2
exit 1
