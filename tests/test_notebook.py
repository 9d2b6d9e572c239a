"""The Colab tour notebook runs top to bottom (headless, CPU, small sizes).

`BLASST_NOTEBOOK_SMALL=1` makes the notebook's parameter cell pick tiny
sizes; the install cell skips itself because blasst_jax is importable (this
checkout is put on the kernel's PYTHONPATH). Every cell must run without an
error and the figures must render.
"""

import os
import re

import pytest

# Test extras (setup.cfg); a bare GPU image may lack them.
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "blasst_jax_tour.ipynb")


def test_tour_notebook_executes(tmp_path, monkeypatch):
  # The kernel is a subprocess: it inherits this environment.
  monkeypatch.setenv("BLASST_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # XLA's optimisation passes dominate the small CPU run; the checks below
  # do not depend on them.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      "commit the notebook without outputs")
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()   # raises CellExecutionError with the traceback

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "already installed: skipping the install" in text
  skipped = re.search(r"skipped blocks, kernel vs oracle: (\d+) (\d+)", text)
  assert skipped, text[-3000:]
  assert skipped[1] == skipped[2] != "0", skipped[0]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 5, f"{len(images)} figures rendered"
