# The README's two commands are `make demo` and `make test`; both do all set-up.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test files run in parallel, a file per worker (module fixtures stay shared): most tests
# wait on daemons, namespaces and timers, so two workers halve the wall time on 2 cores.
TEST_JOBS ?= 2

.PHONY: setup test demo demo-down bench install clean
setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --durations=25 $(PYTEST_ARGS)

bench: setup
	$(PY) bench/datapath.py

# `make demo KEEP=1` leaves the lab up until Ctrl-C (see the README's quick start).
demo: setup
	$(PY) -m l4lb.lab.demo up $(if $(KEEP),--keep)

demo-down:
	$(PY) -m l4lb.lab.demo down

# l4lbd as a systemd service: `make install [DESTDIR=/tmp/root] [PREFIX=/opt/l4lb]
# [INSTALL_ARGS=--no-venv]` (scripts/install.sh says what it does; idempotent).
install:
	@DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" bash scripts/install.sh $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
