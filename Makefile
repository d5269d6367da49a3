# The two set-up commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast check bench up clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline demo

# Chromium for the browser tests (Flower, the HTML report), when missing and installable: root with apt-get.
test: $(STAMP)
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: its tests will skip"
	$(BIN)/pytest

# Unit tests of pure logic: no PostgreSQL, Redis or worker process (`-m "not services"`).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not services" -p no:cacheprovider

# Lint, format and types: what CI runs before the tests (and .pre-commit-config.yaml runs on commit).
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Issue 5's benchmark; e.g. `make bench BENCH_ARGS="--pipeline digits --rows 20000"`.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

up: $(STAMP)
	$(BIN)/pipeline up

clean:
	-$(BIN)/pipeline down
	rm -rf $(VENV) .pipeline
