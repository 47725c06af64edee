# Set-up and everyday commands. Only python3 (3.11 or newer) and make are
# needed: the first target that needs the virtual environment creates it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install, so later runs skip pip until
# pyproject.toml changes.
STAMP := $(VENV)/.installed-test
DEMO_DIR := .demo
# Extra snakemake options for the demo, e.g. DEMO_FLAGS=--verbose.
DEMO_FLAGS ?=
LINT_PATHS := snakemake_executor_plugin_vastai vastai_pool tests benchmarks examples

.PHONY: help install demo test test-openssh lint format bench clean distclean

help:
	@echo "make demo       run the digits example on a local sandbox pool (1 to 2 minutes)"
	@echo "make test       ruff check, ruff format --check, then the test suite"
	@echo "make test-openssh  the end-to-end tests with OpenSSH sandbox hosts (root)"
	@echo "make lint       ruff check and ruff format --check only"
	@echo "make format     reformat the code with ruff"
	@echo "make bench      run the benchmarks in benchmarks/"
	@echo "make clean      remove the demo copy and caches (keeps .venv)"
	@echo "make distclean  clean, and remove .venv too"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# Copies only the workflow's sources, never results of a run made in
# examples/digits itself.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)/digits
	mkdir -p $(DEMO_DIR)/digits
	cp examples/digits/Snakefile examples/digits/README.md $(DEMO_DIR)/digits/
	mkdir -p $(DEMO_DIR)/digits/scripts
	cp examples/digits/scripts/*.py $(DEMO_DIR)/digits/scripts/
	cd $(DEMO_DIR)/digits && ../../$(BIN)/snakemake \
		--executor vastai --vastai-sandbox --jobs 2 $(DEMO_FLAGS)
	@echo
	@echo "Results: $(DEMO_DIR)/digits/results/report.md"
	$(BIN)/python benchmarks/pool_summary.py $(DEMO_DIR)/digits

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)

# Most tests wait on subprocesses, SSH and the sandbox's clocks rather than
# the CPU, so two workers cut the wall time by about a third on two cores.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/pytest -n $(TEST_WORKERS)
	$(MAKE) test-openssh

# End-to-end tests again, with every sandbox instance served by the system's
# OpenSSH sshd (VASTAI_SANDBOX_HOSTS=openssh), which needs root and
# openssh-server; skipped with a message otherwise.
OPENSSH_TESTS := tests/test_pool.py tests/test_signals.py \
	tests/test_example.py::test_pool_run_matches_local_run \
	tests/test_snakemake_suite.py::TestWorkflows::test_simple_workflow \
	tests/test_faults.py::test_offline_host_job_retried_elsewhere \
	tests/test_faults.py::test_destroyed_busy_instance_job_retried

test-openssh: $(STAMP)
	@if [ "$$(id -u)" != 0 ] || [ ! -x /usr/sbin/sshd ]; then \
		echo "test-openssh: skipped, it needs root and /usr/sbin/sshd (openssh-server)"; \
	else \
		VASTAI_SANDBOX_HOSTS=openssh $(BIN)/pytest -n $(TEST_WORKERS) $(OPENSSH_TESTS); \
	fi

bench: $(STAMP)
	$(BIN)/python benchmarks/demo_walltime.py
	$(BIN)/python benchmarks/warm_overhead.py
	$(BIN)/python benchmarks/run_job_overhead.py
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
