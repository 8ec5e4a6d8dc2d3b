# Two set-up commands: `make run` and `make test`. Both create .venv on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-integration lint bench demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build first so no other package pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/lfm sweep sweeps/quickstart.yaml

demo: $(STAMP)
	$(BIN)/python -m lfm_core.demo

# One thread per test process: tests start Ray workers and servers beside pytest, and on 2 cores
# oversubscribed OpenMP threads made small training steps up to 60x slower. The fast suite holds
# one cluster run: the two-node rehearsal (tests/test_orch_cluster.py, issue 12).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not integration" tests

# The heavy integration tests: Ray Train fits, Tune sweeps, ray job submit, S3 sweeps with a
# killed driver, two sweeps racing on one storage, folder data sets through Ray Data.
test-integration: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m integration tests

lint: $(STAMP)
	$(BIN)/ruff check lfm_core orchestrator tests benchmarks
	$(BIN)/ruff format --check lfm_core orchestrator tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
