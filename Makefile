# `make test` is the project's test command (README, .ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: test demo demo-cluster install bench-partition clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# constraints.txt: the exact versions the tests ran with (pyproject.toml holds the ranges).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

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

bench-partition: $(STAMP)
	$(PY) benchmarks/partition.py

clean:
	rm -rf $(VENV) build *.egg-info
