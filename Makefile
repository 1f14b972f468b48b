# Two commands on a fresh machine: `make demo` and `make test` (they set everything up themselves).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
EXTRAS := test,serve,tokenizer,notebooks

# JAX >= 0.11 needs Python >= 3.12. Take $PYTHON if set, else the first >= 3.12 on PATH, else pyenv's.
define find_python
for c in "$${PYTHON:-}" python3.12 python3.13 python3 \
         $$(ls -d "$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)"/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
  [ -n "$$c" ] && command -v "$$c" >/dev/null 2>&1 && \
  "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$$c"; exit 0; }; \
done; echo "moejax needs Python >= 3.12 and none was found (set PYTHON=/path/to/python3.12)" >&2; exit 1
endef

.PHONY: setup demo test test-fast bench-kernels bench-decode bench-host stdlib-moe fixtures fixture-stdlib-moe fixtures-venv clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@py=$$($(find_python)) && echo "using $$py ($$($$py --version))" && \
	  { [ -x $(PY) ] || $$py -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $@

demo: setup
	$(VENV)/bin/moejax generate

# Two workers (one per core; a test file stays on one worker so its fixtures are built once; files
# in tests/conftest.py's order, the slow ones first), and the slowest tests listed at the end so that
# CI time stays visible.
PYTEST := $(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

bench-kernels: setup
	$(VENV)/bin/moejax bench kernels --json benchmarks/kernels-$$(hostname).json

# moejax vs HF transformers decode throughput (the HF half runs in the fixtures venv)
bench-decode: setup fixtures-venv
	$(PY) benchmarks/decode_vs_hf.py --hf-python .venv-fixtures/bin/python

bench-host: setup
	$(PY) benchmarks/host_overhead.py

# Trains the shipped stdlib-moe checkpoint (~15 min on 2 CPU cores), then its routing statistics.
stdlib-moe: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS),train]'
	$(PY) benchmarks/train_stdlib_moe.py
	$(PY) benchmarks/stdlib_moe_routing.py

# Regenerates tests/fixtures/ from HF transformers (a Python 3.11 venv with the local CPU torch wheel).
fixtures: fixtures-venv
	.venv-fixtures/bin/python tests/fixtures/make_fixtures.py

# transformers' reference outputs of the shipped stdlib-moe checkpoint (after `make stdlib-moe`)
fixture-stdlib-moe: fixtures-venv
	.venv-fixtures/bin/python tests/fixtures/make_stdlib_moe_reference.py

fixtures-venv:
	@[ -x .venv-fixtures/bin/python ] || { python3.11 -m venv .venv-fixtures && \
	  .venv-fixtures/bin/pip install -q torch==2.13.0 && \
	  .venv-fixtures/bin/pip install -q transformers==5.23.0 safetensors tokenizers; }

clean:
	rm -rf $(VENV) .venv-fixtures build *.egg-info
