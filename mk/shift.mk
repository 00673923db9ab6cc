# `make shift`: the shadow loss bound on a shift. The real server with shadow sampling, a real
# Prometheus running deploy/prometheus/littlebig.rules.yml (durations scaled down), replaying clean test images, then
# contrast-shifted ones, then recalibrating from the shadow records and replaying shifted images again (bench/shift.py).
# Writes $(BUILD)/shift.{json,png}; RELIABILITY.md, "Shift". About 10 minutes on the 2-core reference machine.
# prometheus comes from Debian's prometheus package (apt-packages.txt), as promtool does. SHIFT_ARGS: e.g. --strength 0.5.
SHIFT_ARGS ?=

.PHONY: shift

shift: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/python -m bench.shift --build $(BUILD) $(SHIFT_ARGS)

# `make guard`: the accuracy guard on the same shift, off and on (clean -> shift -> clean), every served row compared
# with big's offline answer, then a long clean run counting false firings (bench/guard.py). Writes
# $(BUILD)/guard.{json,png}; BENCHMARKS.md, "Accuracy guard". GUARD_ARGS: e.g. --eps 0.02 --phase-rows 4000.
GUARD_ARGS ?=

.PHONY: guard

guard: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/python -m bench.guard --build $(BUILD) $(GUARD_ARGS)
