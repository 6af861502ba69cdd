# The README's two commands are `make demo` and `make test`; both do all set-up.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo demo-down bench install clean
setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/datapath.py

demo: setup
	$(PY) -m l4lb.lab.demo up

demo-down:
	$(PY) -m l4lb.lab.demo down

clean:
	rm -rf $(VENV) build *.egg-info
