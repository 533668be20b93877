# Quick start: `make demo` (set up + run the V4-Flash block demo), `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test parity info bench
install:
	scripts/install.sh $(VENV)
demo: install
	$(PY) -m v4kernels demo
test: install
	$(PY) -m pytest -q
parity: install
	$(PY) -m v4kernels parity
info: install
	$(PY) -m v4kernels info
bench: install
	$(PY) -m v4kernels bench --quick
