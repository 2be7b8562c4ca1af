# Two entry points: `make demo` and `make test`. Both create/update .venv idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/chrono demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# core benchmarks (the others: benchmarks/{governance,dashboard_render,distributed_comm,var,semantic_moe_vs_dense,reliability_report}.py)
bench: $(STAMP)
	$(PY) benchmarks/store_ingest.py
	$(PY) benchmarks/query.py
	$(PY) benchmarks/probe_overhead.py
	$(PY) benchmarks/prometheus_scrape.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(VENV) chrono_runs .pytest_cache
