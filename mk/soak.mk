# `make soak`: reliability under load (figures in RELIABILITY.md).
#
# 1. the mixed good/bad load at full size (10,000 requests at concurrency 32, every good answer checked
#    against the offline reference), plus the fault-injection and fuzz tests, on the real tritonserver;
# 2. SOAK_MINUTES of mixed load on a fresh server: 0 errors on good requests, RSS of tritonserver and
#    its stubs (from /proc) growing < 5% after SOAK_WARMUP_MINUTES; figures in $(BUILD)/soak.json.
SOAK_MINUTES ?= 10
SOAK_WARMUP_MINUTES ?= 2
SOAK_REQUESTS ?= 10000

.PHONY: soak

soak: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	LITTLEBIG_BUILD=$(BUILD) LITTLEBIG_LOAD_REQUESTS=$(SOAK_REQUESTS) LITTLEBIG_FUZZ_EXAMPLES=500 \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_reliability.py tests/test_fuzz.py
	$(BIN)/python -m tests.soak --build $(BUILD) --minutes $(SOAK_MINUTES) --warmup-minutes $(SOAK_WARMUP_MINUTES)

# `make qa`: Triton's Python-backend QA mirrored on the served cascade (tests/backend_qa.py, RELIABILITY.md):
# /dev/shm of the server over QA_REQUESTS mixed requests (good, bad, timed out, cancelled), and the first
# request's latency after ready against warm ones.
QA_REQUESTS ?= 10000

.PHONY: qa

qa: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/python -m tests.backend_qa shm --build $(BUILD) --requests $(QA_REQUESTS)
	$(BIN)/python -m tests.backend_qa warmup --build $(BUILD)
