# GPU deployment: the gpu repository, TensorRT plans, and the offline checks of deploy/.
.PHONY: repo-gpu tensorrt deploy-check deploy-configmap

PRECISION ?= fp16
TRT_MAX_BATCH ?= 64
repo-gpu: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/littlebig repo --profile gpu --build $(BUILD) --out $(BUILD)/model_repository_gpu

# Needs a GPU and TensorRT 10.5 (the one in the Triton 24.10 image); without one it says so and fails.
tensorrt: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/littlebig export --tensorrt --precision $(PRECISION) --max-batch-size $(TRT_MAX_BATCH) --build $(BUILD)

# Offline checks of deploy/ plus the health check and production flags on the embedded tritonserver.
deploy-check: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	LITTLEBIG_BUILD=$(BUILD) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_deploy.py

# Rewrite the health-check ConfigMap from model_repository/health.py (test_deploy.py checks they agree).
deploy-configmap:
	{ printf '%s\n' '# model_repository/health.py for the probes (regenerate: make deploy-configmap).' \
	    'apiVersion: v1' 'kind: ConfigMap' 'metadata:' '  name: littlebig-healthcheck' 'data:' '  health.py: |'; \
	  sed 's/^\(.\)/    \1/' model_repository/health.py; } > deploy/k8s/healthcheck-configmap.yaml
