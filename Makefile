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

.PHONY: install quickstart test lint bench clean cluster-deps cluster-up cluster-down cluster-status cluster-demo

install: $(VENV)/.installed

# Re-installs whenever pyproject.toml or constraints.txt change. constraints.txt pins the tested versions
# (torch==2.13.0 resolves to the local CPU wheel on CPU machines). pip byte-compiles one file at a time (155 s of
# install here); compileall -j 0 does it on every core (56 + 34 s). The .pyc files must exist: where
# PYTHONDONTWRITEBYTECODE is set (as on our build machine), every Ray worker would compile torch and Ray anew.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q --no-compile -c constraints.txt -e ".[dev,cluster]"
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null \
	  || echo "compileall: a few files did not compile (torch ships Python 3.12-only test helpers)"
	@touch $@

quickstart: install
	$(VENV)/bin/diffusion-pipeline run --config $(CONFIG)

# Installed only when missing (CI runs as root; elsewhere run it once with sudo).
$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

test: install cluster-deps $(CHROMIUM)
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check diffusion_core pipelines tests benchmarks

bench: install
	$(PY) benchmarks/core_overhead.py
	$(PY) benchmarks/unet_throughput.py
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/train_scaling.py
	$(PY) benchmarks/serve_load.py

# ---- the local cluster (infra/local/cluster.py): 2 Ray nodes, PostgreSQL, MLflow server, S3 API on 127.0.0.1
CLUSTER := $(PY) infra/local/cluster.py
CLUSTER_CONFIG ?= configs/cluster_local.yaml

# PostgreSQL's server binaries (Debian: /usr/lib/postgresql/*/bin). Installed with apt when missing and we are
# root, without the distribution's default database cluster (cluster-up makes its own under workspace/cluster).
cluster-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  mkdir -p /etc/postgresql-common && \
	  { test -f /etc/postgresql-common/createcluster.conf || \
	    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; } && \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
	else echo "PostgreSQL server binaries not found: install postgresql (e.g. apt-get install postgresql)"; exit 1; fi

cluster-up: install cluster-deps
	$(CLUSTER) up

cluster-down:
	@if [ -f workspace/cluster/state.json ]; then $(CLUSTER) down; else echo "[cluster] not running"; fi

cluster-status:
	$(CLUSTER) status

# cluster-up (unless it runs), then the README's `ray job submit --working-dir .` of the whole DAG; the Serve app
# stays up afterwards. Stop everything with `make cluster-down`.
cluster-demo: install cluster-deps
	@$(CLUSTER) status >/dev/null 2>&1 || $(CLUSTER) up
	$(CLUSTER) submit --config $(CLUSTER_CONFIG)

clean:
	rm -rf $(VENV) workspace .pytest_cache
