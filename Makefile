# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install edgevl with its extras, run the whole flow on edgevl-tiny
#   make test   the same set-up, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgevl-installed
OUT    ?= out

.PHONY: setup demo test test-fast test-arm64 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[export,openvino,camera,dev]"
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), 'torch was changed to ' + torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m edgevl.demo --out $(OUT)/demo

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not tensorrt"

# aarch64 under qemu-user emulation (root, binfmt_misc); see tools/arm64_check.sh --help.
# ARM64_ARGS passes options, e.g. make test-arm64 ARM64_ARGS="--scenes 10 --profiles a57"
ARM64_ARGS ?=
test-arm64: setup
	bash tools/arm64_check.sh $(ARM64_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
