# The two commands of the README: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup train test test-slow benchmark clean
setup: $(VENV)/.installed

# torch is pinned by constraints.txt (the CPU wheel); pyproject.toml keeps a normal range.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

train: setup
	$(VENV)/bin/vaelab train $(ARGS)

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

benchmark: setup
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache
