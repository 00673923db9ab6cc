# littlebig: `make demo` runs the main job end to end, `make test` the fast test tier (`make test-all`: all).
# All set up first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
BUILD ?= build
STAMP := $(VENV)/.littlebig-setup
APT_PACKAGES := $(shell grep -v '^\#' apt-packages.txt)
EXTRAS ?= export,serve,client,dev
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
export HTTP_PORT GRPC_PORT METRICS_PORT

.PHONY: setup system-packages demo test test-all lint export calibrate report three repo serve clean

setup: system-packages $(STAMP)

# Idempotent: dpkg is asked first, so a second run installs nothing and takes a second.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "littlebig needs these Debian packages; run as root:"; \
	    echo "  apt-get update && apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or pass PYTHON=..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip check
	touch $@

# Train only when a checkpoint is missing: the committed ones are used otherwise.
checkpoints/%.safetensors: | $(STAMP)
	$(BIN)/littlebig train $*

$(BUILD)/export/export.json: checkpoints/little.safetensors checkpoints/big.safetensors | $(STAMP)
	$(BIN)/littlebig export --build $(BUILD)

# The rules' code is a prerequisite: a changed rule recalibrates (the cached logits make it take seconds).
$(BUILD)/calibration.json: $(BUILD)/export/export.json export/calibrate.py
	$(BIN)/littlebig calibrate --build $(BUILD)

$(BUILD)/report.json: $(BUILD)/calibration.json export/report.py
	$(BIN)/littlebig report --build $(BUILD)

# The three-stage cascade (little -> middle -> big; README, "Cascades of any length") in a build of its own.
# `make report` reports both cascades; its table puts two stages and three side by side.
BUILD3 ?= $(BUILD)/three
THREE_MODELS ?= mobilenetv3_small_075,resnet10t,resnet18

$(BUILD3)/export/export.json: checkpoints/little.safetensors checkpoints/middle.safetensors checkpoints/big.safetensors | $(STAMP)
	$(BIN)/littlebig export --models $(THREE_MODELS) --build $(BUILD3)

$(BUILD3)/calibration.json: $(BUILD3)/export/export.json export/calibrate.py
	$(BIN)/littlebig calibrate --build $(BUILD3)

$(BUILD3)/report.json: $(BUILD3)/calibration.json export/report.py
	$(BIN)/littlebig report --build $(BUILD3)

export: setup $(BUILD)/export/export.json
calibrate: setup $(BUILD)/calibration.json
report: setup $(BUILD)/report.json $(BUILD3)/report.json
three: setup $(BUILD3)/calibration.json

$(BUILD)/model_repository/littlebig/config.pbtxt: $(BUILD)/calibration.json
	$(BIN)/littlebig repo --profile cpu --build $(BUILD) --out $(BUILD)/model_repository

repo: setup $(BUILD)/model_repository/littlebig/config.pbtxt

# The embedded tritonserver on 127.0.0.1:$(HTTP_PORT)/$(GRPC_PORT)/$(METRICS_PORT); Ctrl-C stops it.
serve: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/littlebig serve --build $(BUILD) --repository $(BUILD)/model_repository

demo: setup
	$(MAKE) --no-print-directory $(BUILD)/report.json $(BUILD)/model_repository/littlebig/config.pbtxt
	$(BIN)/littlebig demo --build $(BUILD)

lint: setup
	$(BIN)/ruff check .

# `make test`: the fast tier (under 5 min on 2 cores), every test not marked slow, against one shared server.
# `make test-all` (CI): everything, the slow tier too. Both list the 25 slowest tests.
# perf_analyzer (its own venv, mk/bench.mk) too: the suite checks it sends our real images.
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider --durations=25
test: TIER := -m 'not slow'
test test-all: setup perf-analyzer alert-rules
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/ruff check .
	LITTLEBIG_BUILD=$(BUILD) $(PYTEST) $(TIER) tests

clean:
	rm -rf $(BUILD)

# Role-specific targets (bench, overload, deploy checks, soak, alert rules) live beside this file, in mk/*.mk.
include $(wildcard mk/*.mk)
