# keras-dmr: `make demo` runs the main job on the bundled digits (train, convert, int8, export, time);
# `make test` runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
# The tests run in one pytest-xdist worker per core, each pinned to its own core (tests/conftest.py):
# most tests are single-threaded Python for much of their time (tracing, tf2onnx, NNCF), so two
# workers finish sooner than one process on both cores. PARALLEL= runs them in one process.
PARALLEL ?= -n auto --dist worksteal

.PHONY: venv demo test slow notebooks lint docs format

venv: $(STAMP)

# Re-installs only when pyproject.toml changes (or the stamp is deleted).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# The main job: train the CIFAR MobileNetV2 (width 0.5) on the bundled digits (resuming runs/
# checkpoints), rewrite it as MobileNetV1 (verified), export it in float32 and int8 (SavedModel,
# ONNX, LiteRT under savedmodels/) and measure every form against the residual model in one table.
# DEMO_ARGS="--fresh" retrains; "--dataset fashion_mnist" with the Debian dataset; "--family
# resnet20" takes the pruning path (ResNet-20 trained for slimming, slimmed, fine-tuned).
demo: venv
	$(BIN)/keras-dmr demo $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not notebook and not slow"
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs

# The tests that train for real (the demo end to end, distributed training, Keras Tuner searches,
# the benchmark run) and the heaviest conversions and exports (50-layer networks, every family's
# export, the property tests): tens of minutes on 2 cores, so outside `make test`; CI runs them.
slow: venv
	$(BIN)/python -m pytest -q $(PARALLEL) -m "slow and not notebook"

# Every notebook, executed top to bottom in a scratch copy (a few minutes; CI runs it too).
notebooks: venv
	$(BIN)/python -m pytest -q $(PARALLEL) -m notebook tests/test_notebooks.py

# The documentation site (docs/ → site/); strict: a broken link or missing page fails.
docs: venv
	$(BIN)/mkdocs build --strict --quiet

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
