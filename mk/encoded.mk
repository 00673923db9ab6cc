# `make bench-encoded`: files sent as JPEG bytes (server-side decoding) against pixels
# (client-side decoding) at 224, 384 and 600 px on scikit-image's photos: bytes on the wire, images/s end to end,
# decode time per image, and decode threads vs instances under perf_analyzer. Starts its own servers on free
# loopback ports; writes $(BUILD)/bench-encoded.json (BENCHMARKS.md, "Encoded images"). About 3 minutes.
BENCH_ENCODED_ARGS ?=

.PHONY: bench-encoded

bench-encoded: setup
	$(MAKE) --no-print-directory perf-analyzer
	$(BIN)/python -m bench.encoded --work $(BUILD)/bench-encoded --out $(BUILD)/bench-encoded.json \
	  --perf-venv $(PERF_VENV) $(BENCH_ENCODED_ARGS)
