# Two commands are the whole set-up: `make quickstart` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test smoke install clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
