# `make test` is the project's test command (README, .ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: test test-unit test-stage test-system coverage demo demo-cluster install checkov bench bench-report bench-partition \
        docs docs-serve screenshot clean

$(PY):
	@echo "install: a virtual environment in $(VENV) (Python, then pip)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# constraints.txt: the exact versions the tests ran with (pyproject.toml holds the ranges).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	@echo "install: dermray and its pinned dependencies (torch, Ray, pyarrow, ...; several GB, a few minutes)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@echo "install: done, $$(du -sh $(VENV) | cut -f1) in $(VENV)"
	touch $(STAMP)

install: $(STAMP)

# checkov, the security scan of the Kubernetes manifests (tests/system/test_k8s_policy.py), in a virtual environment
# of its own: its pins (boto3, botocore, packaging) conflict with dermray's. Its exact versions:
# tests/system/checkov-requirements.txt (~300 MB, ~30 s).
CHECKOV = $(VENV)/tools/checkov/.installed
$(CHECKOV): tests/system/checkov-requirements.txt | $(PY)
	@echo "install: checkov in $(VENV)/tools/checkov (the manifests' security scan)"
	$(PY) -m venv $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/python -m pip install --quiet -r tests/system/checkov-requirements.txt
	touch $(CHECKOV)

checkov: $(CHECKOV)

# All three tiers (tests/unit, tests/stage, tests/system), measured on 2 cores: AMD EPYC (stop 41, 836 tests)
# 11:12, 11:20, a fresh clone's CI 11:26; Intel Xeon with AMX (stop 42, 913-914 tests) 10:38, 11:24, fresh
# clones' CI 12:17 and, at the stop's last code, 11:02; stop 43 (964 tests) 12:07, fresh clones' CI 13:11 and
# 14:39 (pytest's own times). The budget is 12: stop 43 is over it.
# The whole-process runs start in the background at the first test (tests/early.py), and the session
# runs in the order that keeps both cores busy (tests/conftest.py). The slowest 25 tests are listed at the end of
# every run (pyproject.toml's options).
test: $(STAMP) $(CHECKOV)
	$(PY) -m pytest -q tests

# The unit tier alone (no Ray, no subprocess, no network): under 90 seconds.
test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# Line coverage of dermray/ in the pytest process (Ray workers and subprocesses are not traced), all tiers.
coverage: $(STAMP) $(CHECKOV)
	$(PY) -m pytest -q tests --cov=dermray --cov-report=term --cov-report=json:coverage.json

test-stage: $(STAMP)
	$(PY) -m pytest -q tests/stage

test-system: $(STAMP) $(CHECKOV)
	$(PY) -m pytest -q tests/system

# The embedded demo: synthetic data, the whole pipeline on an in-process Ray, the report's path at the end.
demo: $(STAMP)
	$(VENV)/bin/dermray synth --output outputs/demo/data
	$(VENV)/bin/dermray pipeline --config configs/demo.yaml

# The same pipeline as a Ray job: a local head (cluster/local-up.sh), `ray job submit`, its log followed, its status
# checked, the report's path printed, the head stopped. After `make demo` (else it draws the data first).
# DEMO_ARGS: passed to the job, e.g. DEMO_ARGS="--set train.epochs=1"; DEMO_DIR, ports: see cluster/demo-cluster.sh.
DEMO_ARGS ?=
demo-cluster: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash cluster/demo-cluster.sh $(DEMO_ARGS)

# Every benchmark in sequence, each writing benchmarks/results/<name>/results.json (with the machine it ran on);
# on a quiet machine: other work on the cores skews every figure. Rough times on 2 cores: partition ~10 min,
# evaluate ~2 min, score_throughput ~4 min, score_scale ~25 min (planning at 1M and 10M rows ~5 min, 1M images
# scored ~10-20 min), train_throughput ~12 min, reliability ~5 min, near_duplicates ~3 min, transfer ~35 min,
# ham10000 ~1 hour, gpu ~3 min on a CUDA machine (elsewhere it exits at once): about 2.5-3 hours in all.
# BENCHES="partition evaluate" runs a few; DERMRAY_BENCH_SMOKE=1 runs each 100-1000x smaller (results to $TMPDIR,
# never to benchmarks/results/). Then `make bench-report` puts the figures on docs/benchmarks.md.
BENCHES ?= partition evaluate score_throughput score_scale train_throughput reliability near_duplicates transfer \
           ham10000 gpu
bench: $(STAMP)
	@failed=""; for b in $(BENCHES); do \
		echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "benchmarks that failed:$$failed"; exit 1; fi

# docs/benchmarks.md's tables, regenerated from benchmarks/results/*/results.json (stdlib only).
bench-report:
	$(PYTHON) benchmarks/report.py

bench-partition: $(STAMP)
	$(PY) benchmarks/partition.py

# The documentation site (mkdocs.yml, docs/): the generated pages (docs/generate.py: the configuration reference
# from the config models, the tables from the schemas) rewritten, then built strictly into site/ (a broken link or
# a page missing from the nav fails). docs-serve: the same site at http://127.0.0.1:8000, rebuilt on every edit.
docs: $(STAMP)
	$(PY) docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(PY) docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

# The README's picture of the report's first screen (docs/img/report.png), from `make demo`'s report, by headless
# Chromium at 1280 x 800.
screenshot: $(STAMP)
	$(PY) docs/screenshot.py

clean:
	rm -rf $(VENV) build *.egg-info site
