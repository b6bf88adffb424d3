# Two commands on a fresh machine: `make demo` and `make test`. Each creates its
# own virtualenv (.venv) and installs what it needs; nothing but Python is assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint format bench clean help

help:
	@echo "make demo       install and run the demo fleet (embedded nats-server, controller, 2 agents)"
	@echo "make test       install and run the whole test suite (slow fault tests included)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make lint       ruff check and ruff format --check"
	@echo "make bench      run the benchmarks in bench/"
	@echo "make clean      remove the venv and demo state"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install whenever pyproject.toml changes. torch is pinned (==2.13.0) in the extras.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[all,dev]'
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/trainfleet up examples/fleet.toml

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .trainfleet build *.egg-info
