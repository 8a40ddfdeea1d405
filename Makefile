# Two entry points (README): `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv on first use. The CPU wheel of torch is pinned so that no multi-GB CUDA build
# is pulled on a CPU machine; see README "GPU install" for CUDA machines.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.locore-deps

# SYSTEM_PYTHON=python3: use an interpreter that already has torch + triton (e.g. a CUDA machine with
# no network) instead of creating .venv; only the extension is built.
ifdef SYSTEM_PYTHON
PY    := $(SYSTEM_PYTHON)
PIP   := $(PY) -m pip --disable-pip-version-check -q
STAMP := system-python
# no install into the system interpreter: build the extension in place and import from the checkout
BUILD_CMD := $(PY) setup.py -q build_ext --inplace
export PYTHONPATH := $(CURDIR)/python:$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
endif
BUILD_CMD ?= $(PIP) install --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true

TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0

.PHONY: venv build demo test test-gpu bench bench-cpu bench-micro gpu-static clean

ifdef SYSTEM_PYTHON
$(STAMP):
	$(PY) -c "import torch, triton, pybind11"
.PHONY: $(STAMP)
else
$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel pybind11 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install "$(TORCH_SPEC)" "$(TRITON_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install numpy safetensors h5py tqdm matplotlib psutil faiss-cpu \
	    pytest pytest-benchmark hypothesis transformers 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, triton, transformers, pybind11, h5py, safetensors"
	touch $(STAMP)
endif

venv: $(STAMP)

# Editable install; setuptools rebuilds the extension whenever a csrc/ source is newer than the .so.
build: $(STAMP)
	$(BUILD_CMD)
	$(PY) -c "import locore_kernels._cpu"

clean:
	rm -rf build *.egg-info python/*.egg-info locore_kernels/_cpu*.so

demo: $(STAMP)
	@$(PY) -c "import locore_kernels._cpu" 2>/dev/null || $(MAKE) --no-print-directory build
	$(VENV)/bin/locore demo

# The test command builds the extension from clean so a stale .so can never hide a broken build.
test: $(STAMP)
	$(MAKE) --no-print-directory clean build
	$(PY) -m pytest -q tests

test-gpu: $(STAMP) build
	$(PY) -m pytest -q tests -m gpu

# GPU machine: the whole model + attention benchmark (about 8 minutes on an H100).
bench: $(STAMP) build
	$(PY) benchmarks/bench_model.py --time-limit 280
	$(PY) benchmarks/bench_attention.py --time-limit 80

# CPU machine like CI's (fp32; tiny and small; about 12 minutes on 2 cores).
bench-cpu: $(STAMP) build
	$(PY) benchmarks/bench_model.py --cpu --time-limit 420
	$(PY) benchmarks/bench_attention.py --cpu --time-limit 240

# No GPU needed: compile every Triton kernel for an H100 (sm_90a) in every autotune config and report
# registers, spills, shared memory, occupancy and tensor-core use (benchmarks/results/gpu-static-sm90.*).
gpu-static: $(STAMP)
	$(PY) benchmarks/gpu_static.py

# pytest-benchmark micro-benchmarks (attention op, one encoder layer); not part of `make test`.
bench-micro: $(STAMP) build
	$(PY) -m pytest -q -o addopts="" benchmarks/micro
