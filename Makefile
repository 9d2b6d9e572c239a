# `make demo` and `make test` bootstrap .venv (Python 3.12) themselves.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
# apt-get needs root; elsewhere go through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast bench-smoke bazel-test docs clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@if [ ! -x $(PY) ]; then \
	  PY312=$$(scripts/find_python312.sh) || exit 1; \
	  echo "creating $(VENV) with $$PY312"; \
	  $$PY312 -m venv $(VENV) || exit 1; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -c constraints.txt
	@touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,docs]' -c constraints.txt
	@touch $(DOCS_STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo --config=configs/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10 tests

# The CPU suite through Bazel, offline: Debian's bazel-bootstrap (Bazel 4.2)
# with the .venv interpreter as the Python toolchain (see WORKSPACE).
bazel-test: $(STAMP)
	@command -v bazel >/dev/null 2>&1 || { \
	  echo "installing Debian's bazel-bootstrap"; \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y bazel-bootstrap; }
	bazel test //tests:cpu

# API reference from the docstrings: docs/api/index.html. pdoc follows the
# package's __all__, which names only the submodules imported in __init__.py;
# every other module is named here.
# Private modules (_name.py) stay out.
ALL_MODULES := $(basename $(subst /,.,$(filter-out blasst_jax/_%,$(wildcard blasst_jax/*.py))))
EXPORTED_MODULES := blasst_jax.__init__ \
  $(shell sed -n 's/^from blasst_jax import \([a-z_]*\)$$/blasst_jax.\1/p' blasst_jax/__init__.py)
DOC_MODULES := blasst_jax blasst_jax.kernels \
  $(filter-out $(EXPORTED_MODULES),$(ALL_MODULES))

docs: $(DOCS_STAMP)
	rm -rf docs/api
	JAX_PLATFORMS=cpu $(PY) -m pdoc --docformat google \
	  --output-directory docs/api $(DOC_MODULES)

clean:
	rm -rf $(VENV) demo_output .pytest_cache .hypothesis docs/api
