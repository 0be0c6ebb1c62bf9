# Two commands for a fresh clone: `make quickstart` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/quickstart.yaml
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
# The browser tests drive Debian's chromium through pip's playwright, never a downloaded browser build.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD ?= 1
CHROMIUM ?= /usr/bin/chromium

.PHONY: install quickstart test lint bench clean

install: $(VENV)/.installed

# Re-installs whenever pyproject.toml or constraints.txt change. constraints.txt pins the tested versions
# (torch==2.13.0 resolves to the local CPU wheel on CPU machines).
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

quickstart: install
	$(VENV)/bin/diffusion-pipeline run --config $(CONFIG)

# Installed only when missing (CI runs as root; elsewhere run it once with sudo).
$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

test: install $(CHROMIUM)
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check diffusion_core pipelines tests benchmarks

bench: install
	$(PY) benchmarks/core_overhead.py
	$(PY) benchmarks/unet_throughput.py
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/train_scaling.py
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf $(VENV) workspace .pytest_cache
