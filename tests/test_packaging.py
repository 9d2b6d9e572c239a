"""`python -m build` makes a wheel that works outside this checkout.

The wheel is built the way a user builds it (`python -m build`: an sdist,
then a wheel from the unpacked sdist, so a file missing from the sdist shows
up here) and installed with pip into a fresh venv. What runs there must be
the installed copy, never this checkout or its editable install:

- the fresh venv has no system site-packages, and Python runs isolated
  (`-I`: no PYTHONPATH, no user site, no script directory) from a temporary
  working directory;
- the package's third-party dependencies (jax, flax, matplotlib, ...) are
  not downloaded again (about a gigabyte, minutes): the wheel is installed
  with `--no-deps`, and a `.pth` line adds a directory of symlinks to the
  test interpreter's site-packages entries *minus* every `blasst_jax*`,
  `__editable__*`, `.pth` and `.egg-link` entry, so neither the editable
  finder nor a path to this checkout can be reached;
- `pip check` in the fresh venv then proves the wheel's pinned requirements
  are exactly satisfied by what it sees, and the test asserts that
  `blasst_jax.__file__` lies inside the fresh venv.

The wheel holds the library only (no research harness), and the library
imports without optax and matplotlib except where a module needs them (see
NEEDS_FLAX_NNX and NEEDS_MATPLOTLIB).

Needs pip's build isolation to fetch setuptools (from PyPI or pip's cache).
"""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs inside the fresh venv: imports the installed package and checks one
# kernel call against the oracle (Pallas Triton kernel in interpret mode).
SMOKE = textwrap.dedent("""
    import importlib.metadata, json, sys
    import jax, jax.numpy as jnp
    import blasst_jax as bj
    from blasst_jax import patterns

    q, k, v = patterns.sink_local_qkv(jax.random.PRNGKey(0), batch=1,
                                      seq_len=128, q_heads=2, kv_heads=1,
                                      head_dim=16, sharpness=20.0, window=16)
    options = dict(threshold=1e-2, causal=True, block_q=16, block_kv=16,
                   return_stats=True)
    out, stats = bj.attention(q, k, v, implementation="pallas_triton",
                              **options)
    ref, ref_stats = bj.attention(q, k, v, implementation="reference",
                                  **options)
    print(json.dumps(dict(
        file=bj.__file__, prefix=sys.prefix, version=bj.__version__,
        dist_version=importlib.metadata.version("blasst_jax"),
        max_err=float(jnp.max(jnp.abs(out - ref))),
        skipped=int(stats.skipped_blocks.sum()),
        ref_skipped=int(ref_stats.skipped_blocks.sum()),
        sparsity=float(stats.total_sparsity),
        # The library imports without the experiments' dependencies.
        imported_extras=sorted(m for m in ("matplotlib", "ml_collections")
                               if m in sys.modules))))
""")

# Runs inside the fresh venv: imports each module named on the command line
# with the listed packages made unimportable (a None entry in sys.modules
# makes `import name` raise ImportError); prints {module: error} for those
# that fail.
IMPORT_WITHOUT = textwrap.dedent("""
    import importlib, json, sys
    blocked, modules = sys.argv[1].split(","), sys.argv[2:]
    for name in blocked:
      sys.modules[name] = None
    failed = {}
    for module in modules:
      try:
        importlib.import_module(module)
      except ImportError as e:
        failed[module] = str(e)
    print(json.dumps(failed))
""")

# What needs optax: flax.nnx imports it (optax is a flax requirement, so it
# is always installed with the library), hence every module built on nnx.
NEEDS_FLAX_NNX = {"blasst_jax.nn", "blasst_jax.models",
                  "blasst_jax.models.generate", "blasst_jax.models.llama",
                  "blasst_jax.models.testing", "blasst_jax.models.tokenizer",
                  "blasst_jax.models.weights"}
# What needs the `plot` extra.
NEEDS_MATPLOTLIB = {"blasst_jax.plotting"}

# The research harness (experiments/lm) and the old public name of the
# progress bar (now private) stay out of the wheel.
HARNESS = ("gpt", "synthetic_lm", "toy_model", "progress", "lm_eval",
           "text_data", "text_extract", "lm_checkpoint", "pretrained",
           "sword")

_HIDDEN_PREFIXES = ("blasst_jax", "__editable__", "_blasst_jax")
_HIDDEN_SUFFIXES = (".pth", ".egg-link")


def _run(args, **kwargs):
  proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                        **kwargs)
  assert proc.returncode == 0, (
      f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc.stdout


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
  env.update(extra)
  return env


def _dependency_farm(directory):
  """Symlinks to the test venv's packages, without any blasst_jax entry."""
  os.makedirs(directory)
  site = sysconfig.get_paths()["purelib"]
  for name in sorted(os.listdir(site)):
    if (name.startswith(_HIDDEN_PREFIXES) or name.endswith(_HIDDEN_SUFFIXES)
        or name == "__pycache__"):
      continue
    os.symlink(os.path.join(site, name), os.path.join(directory, name))
  return directory


def test_wheel_installs_and_runs_in_fresh_venv(tmp_path):
  dist = tmp_path / "dist"
  # Build isolation fetches setuptools; the checkout is only read (setuptools
  # refreshes the ignored blasst_jax.egg-info there, as `pip install -e` does).
  _run([sys.executable, "-m", "build", "--outdir", str(dist), ROOT],
       env=_clean_env())
  wheels = sorted(dist.glob("blasst_jax-*.whl"))
  sdists = sorted(dist.glob("blasst_jax-*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
  with zipfile.ZipFile(wheels[0]) as whl:
    names = set(whl.namelist())
  assert "blasst_jax/kernels/pallas_triton.py" in names
  assert not any(n.startswith(("tests/", "experiments/", "configs/"))
                 for n in names), sorted(names)
  assert "blasst_jax/_progress.py" in names
  harness = {n for n in names
             if n.rsplit("/", 1)[-1].removesuffix(".py") in HARNESS}
  assert not harness, harness
  modules = sorted(n.removesuffix("/__init__.py").removesuffix(".py")
                   .replace("/", ".") for n in names
                   if n.startswith("blasst_jax/") and n.endswith(".py"))
  assert set(modules) >= NEEDS_FLAX_NNX | NEEDS_MATPLOTLIB, modules

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  python = str(venv / "bin" / "python")
  purelib = _run([python, "-I", "-c",
                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                 ).strip()
  farm = _dependency_farm(str(tmp_path / "deps"))
  with open(os.path.join(purelib, "test_dependencies.pth"), "w") as f:
    f.write(farm + "\n")

  pip = [sys.executable, "-m", "pip", "--python", python]
  _run(pip + ["install", "--no-deps", "--no-index", "--no-cache-dir",
              str(wheels[0])], env=_clean_env())
  _run(pip + ["check"], env=_clean_env())

  work = tmp_path / "elsewhere"
  work.mkdir()
  out = _run([python, "-I", "-c", SMOKE], cwd=work,
             env=_clean_env(JAX_PLATFORMS="cpu"))
  result = json.loads(out.strip().splitlines()[-1])
  assert result["file"].startswith(purelib + os.sep), result
  assert os.path.realpath(result["prefix"]) == os.path.realpath(venv)
  assert result["version"] == result["dist_version"]
  assert result["max_err"] < 1e-4, result
  assert result["skipped"] == result["ref_skipped"] > 0, result
  assert result["imported_extras"] == [], result

  # Every module imports without optax and matplotlib but those that need
  # flax.nnx (which imports optax) or the plot extra; with only matplotlib
  # missing, everything but plotting imports.
  def failing_imports(blocked):
    out = _run([python, "-I", "-c", IMPORT_WITHOUT, ",".join(blocked),
                *modules], cwd=work, env=_clean_env(JAX_PLATFORMS="cpu"))
    return json.loads(out.strip().splitlines()[-1])
  failed = failing_imports(["optax", "matplotlib"])
  assert set(failed) == NEEDS_FLAX_NNX | NEEDS_MATPLOTLIB, failed
  assert all("optax" in failed[m] for m in NEEDS_FLAX_NNX), failed
  assert all("matplotlib" in failed[m] for m in NEEDS_MATPLOTLIB), failed
  failed = failing_imports(["matplotlib"])
  assert set(failed) == NEEDS_MATPLOTLIB, failed
