# `make gpu-check`: the cascade on the real tritonserver on an NVIDIA GPU (deploy/README.md).
#
# little and big are STAND-INS for Triton's onnxruntime/TensorRT backends (not on PyPI): Python-backend
# torch models on KIND_GPU from the checkpoints (profile gpu-standin). Without a CUDA device the check prints
# "skipped: no CUDA device" and exits 0. It needs no package registry on the GPU machine:
#
#   here (make setup done):   make gpu-check-bundle      -> build/gpu-check/ (repositories, test images, T)
#   on the GPU machine:       make gpu-venv NUMPY_WHEEL=numpy-1.26.4-cp312-...whl PYTRITON_SITE=<dir>
#                             make gpu-check PERF_ANALYZER=<tritonclient 2.51.0 wheel's perf_analyzer>
#
# The check runs with $(GPU_CHECK_PYTHON): .venv-gpu when it exists, else the main venv, else python3.
GPU_VENV ?= .venv-gpu
GPU_SYSTEM_PYTHON ?= python3
GPU_CHECK_PYTHON ?= $(firstword $(wildcard $(GPU_VENV)/bin/python $(BIN)/python) $(GPU_SYSTEM_PYTHON))
GPU_CHECK_ARGS ?=
PERF_ANALYZER ?=
export PERF_ANALYZER

.PHONY: gpu-check gpu-check-bundle gpu-venv

# No `setup` prerequisite: the GPU machine has no registry, and without a GPU this prints one line.
gpu-check:
	@$(GPU_CHECK_PYTHON) -m bench.gpu_check --build $(BUILD) $(GPU_CHECK_ARGS)

# The GPU-independent half (generator, dataset): run where `make setup` was done; bring build/gpu-check/.
gpu-check-bundle: setup
	$(MAKE) --no-print-directory $(BUILD)/calibration.json
	$(BIN)/python -m bench.gpu_check --build $(BUILD) --prepare-only

# A venv for the GPU machine's python3 (torch+CUDA and timm, but numpy 2, which breaks the 2.51 Python
# backend): --without-pip, numpy<2 from a brought wheel, torch/timm through a .pth, pytriton's tritonserver
# tree, littlebig's package layout. bench/gpu_venv.py says why each step; it needs only the stdlib.
NUMPY_WHEEL ?=
PYTRITON_SITE ?=
gpu-venv:
	$(GPU_SYSTEM_PYTHON) bench/gpu_venv.py --venv $(GPU_VENV) --numpy-wheel "$(NUMPY_WHEEL)" --pytriton-site "$(PYTRITON_SITE)"
