# Two commands do everything: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray
EXTRAS_STAMP := $(VENV)/.installed-extras

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

$(EXTRAS_STAMP): $(STAMP) requirements-extras.txt
	$(BIN)/python -m pip install --quiet -r requirements-extras.txt
	touch $(EXTRAS_STAMP)

test: $(RAY_STAMP) $(EXTRAS_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run wa
	$(BIN)/python -m benchmarks.run wb
	$(BIN)/python -m benchmarks.run wa-scaled

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
