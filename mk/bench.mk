# `make bench`: the real perf_analyzer against the embedded tritonserver (GitHub issue 6).
#
# perf_analyzer comes from the tritonclient 2.51.0 wheel in its own venv: its grpc extra caps protobuf
# below 5, which the main venv's onnx cannot live with (../shared/FACTS.md). Newer wheels carry a
# binary that needs glibc 2.38. A stamp makes the second run take a second.
PERF_VENV ?= .venv-perf
PERF_STAMP := $(PERF_VENV)/.littlebig-perf
PERF_PACKAGES := 'tritonclient[grpc,http]==2.51.0' 'numpy<2' nvidia-cuda-runtime-cu12
# The tuned deployment (BENCHMARKS.md, tuning log): a 100 us dynamic-batching delay beat ServeOptions' 500 us.
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
	$(BIN)/python -m bench.run --build $(BUILD) --perf-venv $(PERF_VENV) $(BENCH_ARGS)
