# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= runs/demo
SEED ?= 0

.PHONY: install demo test lint clean-demo

install: $(VENV)/.installed

# Re-install when the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m mme5.data.demo_world --out $(DEMO)/world --seed $(SEED)
	$(PY) -m mme5.backbones.tiny --family mllama --out $(DEMO)/backbone --seed $(SEED)
	$(PY) benchmarks/data_loader.py --world $(DEMO)/world --backbone $(DEMO)/backbone

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mme5 tests benchmarks

clean-demo:
	rm -rf $(DEMO)
