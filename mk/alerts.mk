# Drift alert rules (deploy/prometheus/): `make test` checks them and runs their unit tests.
# promtool comes from Debian's prometheus package (apt-packages.txt: make setup installs it as root).
PROMTOOL ?= promtool

.PHONY: alert-rules

alert-rules:
	@command -v $(PROMTOOL) >/dev/null || { echo "promtool not found: it comes from Debian's prometheus package (apt-packages.txt); run make setup as root"; exit 1; }
	$(PROMTOOL) check rules deploy/prometheus/littlebig.rules.yml
	$(PROMTOOL) test rules deploy/prometheus/littlebig.rules.test.yml
