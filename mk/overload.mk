# `make overload`: a step load on littlebig, 1x, 2x, then 1x of big alone's saturation
# rate (measured first, in the same run), with the load governor off (static T) and on, on real test images.
# Starts its own servers on free loopback ports; writes $(BUILD)/overload.{json,png} (RELIABILITY.md, "Overload").
# About 5 minutes on the 2-core reference machine (270-293 s measured). OVERLOAD_ARGS: e.g. --slo-p99-ms 150 --phase-seconds 20,20,40.
OVERLOAD_ARGS ?=

.PHONY: overload

overload: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(MAKE) --no-print-directory perf-analyzer
	$(BIN)/python -m bench.overload --build $(BUILD) --perf-venv $(PERF_VENV) $(OVERLOAD_ARGS)
