# vitpipe: `make pretrain` and `make test` work on a fresh clone (they install what they need).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vitpipe-installed
CONFIG ?= configs/tiny.yaml
ADDRESS ?=
ARGS   ?=
PYTEST_ARGS ?=
BENCHES ?= bench/ingest.py bench/loader.py bench/loader_latency.py bench/train_step.py bench/gpu_mfu.py

.PHONY: install pretrain test bench submit lint clean help

help:
	@echo "make pretrain   install (if needed) and run $(CONFIG) on an embedded local Ray instance"
	@echo "make test       install (if needed) and run the whole test suite"
	@echo "make bench      run the benchmarks in bench/ (ratios vs. baselines, JSON in bench/out)"
	@echo "make submit     submit $(CONFIG) as a Ray job (ADDRESS=http://HEAD:8265, default: a local head)"
	@echo "make lint       ruff over the code"

# Re-installs only when pyproject.toml changes; a no-op otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

pretrain: install
	$(BIN)/vitpipe run $(CONFIG) $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	@mkdir -p bench/out
	@set -e; for b in $(BENCHES); do echo "== $$b"; $(BIN)/python $$b; done

submit: install
	@set -e; addr="$(ADDRESS)"; \
	if [ -z "$$addr" ]; then addr=$$($(BIN)/python -m cluster.local_head start); fi; \
	$(BIN)/vitpipe submit $(CONFIG) --address "$$addr" --wait $(ARGS)

lint: install
	$(BIN)/ruff check pipeline stages cluster tests bench

clean:
	rm -rf runs bench/out .pytest_cache
