# The README's two commands: `make demo` and `make test`. Each bootstraps everything it needs on a
# fresh machine: system libraries for FFCV (apt, as root), a .venv, pinned torch, the package in
# editable mode with its C++ extension. A second run finds the stamp file and starts in seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dinovmf-installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# pip, quiet, minus the machine's find-links notices ("Location ... is ignored") that drown real errors.
PIP = PIP_CONSTRAINT=$(VENV)/constraints.txt $(PY) -m pip install -q
QUIET_PIP_NOTICES = 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# Triton kernels run on the CPU through the interpreter when there is no GPU.
export TRITON_INTERPRET ?= $(shell $(PYTHON) -c "import shutil;print(0 if shutil.which('nvidia-smi') else 1)" 2>/dev/null || echo 1)

.PHONY: demo test install sysdeps bench clean-venv cuda-check gpu-check kernel-model

demo: $(STAMP)
	$(VENV)/bin/dinovmf train --config demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

# FFCV builds against OpenCV and libjpeg-turbo and finds them through pkg-config.
sysdeps:
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "[make] installing FFCV's system libraries (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config libopencv-dev libturbojpeg0-dev >/dev/null; \
	else \
	  echo "[make] FFCV needs pkg-config, libopencv-dev and libturbojpeg0-dev; install them (as root:"; \
	  echo "       apt-get install -y pkg-config libopencv-dev libturbojpeg0-dev) or run as root."; \
	  echo "       Continuing without FFCV: dinovmf falls back to its PIL loader."; \
	fi

$(STAMP): setup.py Makefile $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(PY) || { echo "[make] creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(PY) -m pip install -q --upgrade pip setuptools wheel ninja $(QUIET_PIP_NOTICES)
	@# Keep an existing torch (a CUDA build, say); otherwise install the pinned CPU wheel.
	@$(PY) -c "import torch" 2>/dev/null || { echo "[make] installing torch==$(TORCH_VERSION)"; $(PY) -m pip install -q torch==$(TORCH_VERSION) $(QUIET_PIP_NOTICES); }
	@# Constrain every later install to the torch we have, so no dependency swaps it for a CUDA build. Read
	@# from the metadata: importing torch before numpy is installed warns "Failed to initialize NumPy".
	@$(PY) -c "import importlib.metadata as m;print('torch=='+m.version('torch'))" > $(VENV)/constraints.txt
	@echo "[make] installing dinovmf and its dependencies"
	@$(PIP) triton==3.9.0 numpy scipy mpmath pytest pyyaml tqdm matplotlib safetensors tensorboard pillow $(QUIET_PIP_NOTICES)
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  $(PIP) ffcv==1.0.2 $(QUIET_PIP_NOTICES) || echo "[make] ffcv failed to build: the PIL fallback loader will be used"; fi
	@echo "[make] building dinovmf (editable) and its C++ extension"
	@$(PIP) --no-build-isolation --no-deps -e . $(QUIET_PIP_NOTICES)
	@touch $(STAMP)

# Compile every launched Triton kernel for sm_90 and sm_80 with the signatures the host code uses (no GPU
# needed; tools/triton_cases.py is the registry). `make test` compiles a representative subset.
cuda-check: $(STAMP)
	$(PY) -m tools.triton_aot --arch 90 --arch 80 --stats

# Static per-kernel report (registers, spills, CTAs/SM, fences in loops, bytes moved vs minimum) for sm_90 at
# the issue sizes -> bench/results/kernel_model.{csv,png}. CPU only, about 45 minutes on 2 cores.
kernel-model: $(STAMP)
	$(PY) -m tools.kernel_model

# The first minutes on a GPU (tools/gpu_check.py): installs the package with the machine's own python (no
# network, no .venv needed), runs the GPU tests and benchmarks in <= 8 minutes, writes one results folder.
# GPU_CHECK_DRY=1 runs every step on CPU at tiny sizes.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PYTHON) -m tools.gpu_check

bench: $(STAMP)
	$(PY) -m bench.run_all

clean-venv:
	rm -rf $(VENV)
