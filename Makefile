# Two entry points: `make demo` (the main job) and `make test` (the test suite). Both create
# .venv when missing and install everything once; a second run skips what is done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

# nvcc lives here on our machines; torch would otherwise guess /usr/local.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS ?= $(shell nproc)

.PHONY: demo test install bench clean

demo: install
	$(VENV)/bin/usfmae-fast demo --out outputs/demo

# The library was built just before: USFMAE_EXPECT_EXT=1 makes a run where it fails to load fail
# (tests/conftest.py) instead of skipping its tests.
test: install
	USFMAE_EXPECT_EXT=1 $(PY) -m pytest -q

install: $(VENV)/.built

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(PY)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# --no-build-isolation: build against the torch in .venv instead of downloading another one.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build usfmae_fast/_C*.so *.egg-info $(VENV)/.built
