# `make bench`: the real perf_analyzer against the embedded tritonserver: little, big
# and littlebig each at the best deployment a time-budgeted search finds (bench/search.py), best against best.
#
# perf_analyzer comes from the tritonclient 2.51.0 wheel in its own venv: its grpc extra caps protobuf
# below 5, which the main venv's onnx cannot live with (it wants protobuf 5 or later). Newer wheels carry a
# binary that needs glibc 2.38. A stamp makes the second run take a second.
PERF_VENV ?= .venv-perf
PERF_STAMP := $(PERF_VENV)/.littlebig-perf
PERF_PACKAGES := 'tritonclient[grpc,http]==2.51.0' 'numpy<2' nvidia-cuda-runtime-cu12
# Seconds for the deployment search (screen + confirmation); the whole `make bench` takes about this plus
# a minute or two. 900 s: 19 minutes on the 2-core reference machine (BENCHMARKS.md).
BENCH_BUDGET_S ?= 900
BENCH_ARGS ?=

.PHONY: bench perf-analyzer

perf-analyzer: system-packages $(PERF_STAMP)

$(PERF_STAMP): mk/bench.mk
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or pass PYTHON=..."; exit 1; }
	test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install -q --upgrade pip
	$(PERF_VENV)/bin/pip install -q $(PERF_PACKAGES)
	LD_LIBRARY_PATH=$$($(PERF_VENV)/bin/python -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))') \
	  $(PERF_VENV)/bin/perf_analyzer --version
	touch $@

# Starts its own server on free loopback ports, measures, stops it; writes $(BUILD)/bench.{json,png}.
bench: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(MAKE) --no-print-directory perf-analyzer
	$(BIN)/python -m bench.run --build $(BUILD) --perf-venv $(PERF_VENV) --budget-s $(BENCH_BUDGET_S) $(BENCH_ARGS)

# `make bench-stages`: big alone, the two-stage cascade of $(BUILD) and the three-stage cascade of
# $(BUILD3), each at the best deployment the search finds on one time budget split between them, in one run on the
# same test images (bench/stages.py); little and middle alone too, for each cascade's R*. Writes
# $(BUILD)/bench-stages.{json,png}. The whole run takes about the budget plus a few minutes.
BENCH_STAGES_BUDGET_S ?= 1500
BENCH_STAGES_ARGS ?=

.PHONY: bench-stages

bench-stages: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json $(BUILD3)/calibration.json
	$(MAKE) --no-print-directory perf-analyzer
	$(BIN)/python -m bench.stages --build $(BUILD) --build-three $(BUILD3) --perf-venv $(PERF_VENV) \
	  --budget-s $(BENCH_STAGES_BUDGET_S) $(BENCH_STAGES_ARGS)

# `make bench-shadow`: what shadow sampling costs. littlebig at the best deployment of the newest
# `make bench` record in bench/results, at shadow rates 0, 0.01 and 0.05, each its own repository and server (one at
# a time), interleaved over 2 rounds, the real perf_analyzer on 512 real test images at the record's headline batch
# and concurrency (bench/shadow.py). Writes $(BUILD)/bench-shadow.{json,png} and copies them to
# bench/results/bench-shadow-<UTC stamp>.{json,png}. About 5 minutes on the 2-core reference machine (6 x 30 s
# measured, ~15 s per server around each).
BENCH_SHADOW_ARGS ?=

.PHONY: bench-shadow

bench-shadow: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(MAKE) --no-print-directory perf-analyzer
	$(BIN)/python -m bench.shadow --build $(BUILD) --perf-venv $(PERF_VENV) --copy-to bench/results $(BENCH_SHADOW_ARGS)
