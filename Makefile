# cxr-triage: `make demo` runs the shipped model on the bundled samples; `make test` runs lint + all tests
# (tests/unit and tests/integration); `make test-unit` runs tests/unit alone, a quick loop without lint;
# `make serve` builds a light venv (.venv-serve: predict + web page, no torch) and starts the page.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
HEATMAPS ?= demo-heatmaps
SERVE_VENV := .venv-serve
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: demo test test-unit lint serve venv-base venv-full clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# base install: everything `predict` needs (onnxruntime, no torch)
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# full install: training, service, DICOM node, archive scoring (Ray Data) and dev tools
$(VENV)/.full: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,serve,dicom,scale,dev]'
	touch $@ $(VENV)/.base

venv-base: $(VENV)/.base
venv-full: $(VENV)/.full

# the web page's light install: the [serve] extra only (no torch, no pandas/matplotlib). For speed: the venv gets
# no pip of its own when $(PYTHON) has one (pip --python installs into it), and nothing is byte-compiled up front.
$(SERVE_VENV)/.serve: pyproject.toml
	if $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	  $(PYTHON) -m venv --without-pip $(SERVE_VENV) && \
	  $(PYTHON) -m pip --python $(SERVE_VENV)/bin/python install -q --no-compile -e '.[serve]'; \
	else \
	  $(PYTHON) -m venv $(SERVE_VENV) && $(SERVE_VENV)/bin/pip install -q --no-compile -e '.[serve]'; \
	fi
	touch $@

serve: $(SERVE_VENV)/.serve
	@echo "cxr-triage page: http://$(HOST):$(PORT)/  (API docs: /docs; Ctrl-C stops it)"
	$(SERVE_VENV)/bin/cxr-triage serve --host $(HOST) --port $(PORT)

demo: $(VENV)/.base
	$(BIN)/cxr-triage predict src/cxr_triage/assets/samples --heatmaps $(HEATMAPS)
	$(BIN)/cxr-triage segment src/cxr_triage/assets/samples --out $(HEATMAPS)/lungs
	@echo "Heatmap overlays (lung outlines in cyan) in $(HEATMAPS)/, lung masks in $(HEATMAPS)/lungs/"

lint: $(VENV)/.full
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

# pure functions and in-process tests: no server, DICOM node, browser, Orthanc, Ray or training run
test-unit: $(VENV)/.full
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(HEATMAPS) .pytest_cache .import_linter_cache .grimp_cache

# --- the shipped model, end to end (needs ../shared/data; about 1.5 h on a 2-core CPU) ---
DATASET ?= ../shared/data/COVID-19_Radiography_Dataset
EXTERNAL ?= ../shared/data/external
RUN ?= r18-160
BUNDLE := src/cxr_triage/assets/model
# inference border trim, chosen on validation (benchmarks/RESULTS.md)
BORDER ?= 0.06

SEG_RUN ?= lungs8b-128
SEGMENTER ?= runs/lungs8b-fp32

.PHONY: data eda train-model bundle reports train-seg seg-bundle seg-ship
data: $(VENV)/.full
	$(BIN)/cxr-triage ingest $(DATASET) --out runs/data
eda: data
	$(BIN)/cxr-triage eda runs/data/manifest.csv --out runs/eda
train-model: $(VENV)/.full
	$(BIN)/cxr-triage train --config configs/default.yaml name=$(RUN)
# the lung segmenter (about 20 minutes on 2 busy cores): ../shared/data/lung-masks -> runs/$(SEG_RUN) -> $(SEGMENTER)
train-seg: $(VENV)/.full
	$(BIN)/cxr-triage train-seg --config configs/segment.yaml name=$(SEG_RUN)
seg-bundle: $(VENV)/.full
	$(BIN)/cxr-triage export-seg runs/$(SEG_RUN)/best.pt --out $(SEGMENTER) --quantize none
# put that segmenter into the shipped (whole-image) classifier bundle and re-seal it
seg-ship: $(VENV)/.full
	$(BIN)/cxr-triage seal $(BUNDLE) --segmenter $(SEGMENTER)
bundle: $(VENV)/.full
	$(BIN)/cxr-triage export runs/$(RUN)/best.pt --out $(BUNDLE) --border $(BORDER) --segmenter $(SEGMENTER)
reports: $(VENV)/.full
	$(BIN)/cxr-triage evaluate --model $(BUNDLE) --data runs/data/manifest.csv --split test --out reports/test --record
	$(BIN)/cxr-triage evaluate --model $(BUNDLE) --data $(EXTERNAL) --out reports/external
