# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test stress lint venv system-packages clean

demo: $(STAMP)
	$(BIN)/relman demo

test: $(STAMP) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Stress tests: repeated crashes and races, bounded by RELMAN_STRESS_ROUNDS.
stress: $(STAMP) system-packages
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check relman tests bench
	$(BIN)/ruff format --check relman tests bench

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the project metadata changes.
$(STAMP): $(VENV)/bin/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The interoperability tests run the real openssl command.
system-packages:
	@command -v openssl >/dev/null || { \
	  echo "installing openssl (needed by the interoperability tests)"; \
	  apt-get update -q && apt-get install -y -q openssl; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
