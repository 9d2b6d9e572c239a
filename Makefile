# `make demo` and `make test` bootstrap .venv (Python 3.12) themselves.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench-smoke clean

$(STAMP): setup.cfg pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  PY312=$$(scripts/find_python312.sh) || exit 1; \
	  echo "creating $(VENV) with $$PY312"; \
	  $$PY312 -m venv $(VENV) || exit 1; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo.py --config=configs/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10 tests

clean:
	rm -rf $(VENV) demo_output .pytest_cache .hypothesis
