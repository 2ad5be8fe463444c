# keras-dmr: `make demo` trains DMRNet-14 on the bundled digits and exports its plain form;
# `make test` runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# 10 epochs: 99.4-100% test accuracy on digits (seeds 0-2), about 1 minute on 2 CPU cores.
DEMO_EPOCHS ?= 10
DEMO_ARGS ?=

.PHONY: venv demo test lint docs format

venv: $(STAMP)

# Re-installs only when pyproject.toml changes (or the stamp is deleted).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# Resumes runs/dmrnet14_digits.keras if it exists; DEMO_ARGS=--fresh starts over. Every run adds
# a new version under savedmodels/dmrnet14_digits/ (never overwriting an earlier one).
demo: venv
	$(BIN)/keras-dmr train --model dmrnet --depth 14 --dataset digits \
		--epochs $(DEMO_EPOCHS) $(DEMO_ARGS)
	$(BIN)/keras-dmr export runs/dmrnet14_digits.keras --name dmrnet14_digits

test: venv
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs

# The documentation site (docs/ → site/); strict: a broken link or missing page fails.
docs: venv
	$(BIN)/mkdocs build --strict --quiet

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
