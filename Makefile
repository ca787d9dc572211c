# Two commands do everything: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: demo test lint bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(RAY_STAMP): $(STAMP) requirements-ray.txt
	$(BIN)/python -m pip install --quiet -r requirements-ray.txt
	touch $(RAY_STAMP)

demo: $(STAMP)
	$(BIN)/fedloom simulate examples/keyboard.toml

test: $(RAY_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run wa
	$(BIN)/python -m benchmarks.run wb
	$(BIN)/python -m benchmarks.run wa-scaled

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
