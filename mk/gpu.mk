# `make gpu-check`: the cascade on the real tritonserver on an NVIDIA GPU (GitHub issue 11; deploy/README.md).
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
# backend: ../shared/FACTS.md): --without-pip, numpy<2 unpacked from a brought wheel, a .pth to the system
# site-packages for torch/timm, pytriton's tritonserver tree linked in, and littlebig's sources mapped
# as the package layout of pyproject.toml (littlebig.export = export/, ...).
NUMPY_WHEEL ?=
PYTRITON_SITE ?=
gpu-venv:
	@test -n "$(NUMPY_WHEEL)" -a -f "$(NUMPY_WHEEL)" || { echo "NUMPY_WHEEL=<numpy 1.26 wheel for this python> is required"; exit 2; }
	@test -d "$(PYTRITON_SITE)/pytriton/tritonserver" -a -d "$(PYTRITON_SITE)/nvidia_pytriton.libs" || \
	  { echo "PYTRITON_SITE=<dir holding pytriton/ and nvidia_pytriton.libs/ from nvidia-pytriton 0.7.0> is required"; exit 2; }
	$(GPU_SYSTEM_PYTHON) -m venv --without-pip $(GPU_VENV)
	set -e; site=$$($(GPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  $(GPU_VENV)/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$(NUMPY_WHEEL)" "$$site"; \
	  $(GPU_SYSTEM_PYTHON) -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' > "$$site/littlebig-system-torch.pth"; \
	  cp -a "$(PYTRITON_SITE)/pytriton" "$(PYTRITON_SITE)/nvidia_pytriton.libs" "$$site/"; \
	  chmod +x "$$site"/pytriton/tritonserver/bin/* "$$site"/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub; \
	  rm -rf "$$site/littlebig"; mkdir "$$site/littlebig"; \
	  for f in $(CURDIR)/littlebig/*.py; do ln -s "$$f" "$$site/littlebig/"; done; \
	  ln -s $(CURDIR)/export "$$site/littlebig/export"; ln -s $(CURDIR)/client "$$site/littlebig/client"; \
	  ln -s $(CURDIR)/model_repository "$$site/littlebig/model_repository"
	$(GPU_VENV)/bin/python -c 'import numpy, torch, timm, littlebig.export.models, littlebig.model_repository.torch_standin; \
	  assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__; print("gpu venv: numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
