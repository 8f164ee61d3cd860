# moeplan: `make plan` runs the main job on a built-in default; `make test` runs the whole suite.
# Both create .venv when it is missing and install what they need from the project's own files.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: plan test lint bench calibrate dashboard notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.core
	$(BIN)/python -m pip install --quiet -e '.[dev,jax,app]'
	touch $@

$(VENV)/.app: pyproject.toml $(VENV)/.core
	$(BIN)/python -m pip install --quiet -e '.[app]'
	touch $@

dashboard: $(VENV)/.app
	$(BIN)/moeplan dashboard

# Execute every notebook and render it with its outputs to docs/notebooks/ (Markdown, figures as SVG).
notebooks: $(VENV)/.dev
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python notebooks/render.py

calibrate: $(VENV)/.dev
	$(BIN)/moeplan calibrate --quick --out profiles/cpu-host.yaml

$(VENV)/.report: pyproject.toml $(VENV)/.core
	$(BIN)/python -m pip install --quiet -e '.[report]'
	touch $@

# The main job on a built-in default: an ST-MoE-like model searched on a TPU v5p slice and on 4 H100 nodes.
plan: $(VENV)/.report
	$(BIN)/moeplan plan --html artifacts/plan.html

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check moeplan tests benchmarks

bench: $(VENV)/.dev
	@for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis artifacts
