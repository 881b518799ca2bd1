# Two entry points do all the set-up themselves on a fresh machine:
#   make demo   -> converts resnet50 at compression 2 and prints the report
#   make test   -> the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xsurgery convert resnet50 --compress 2

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check xsurgery tests tools

bench: $(STAMP)
	$(BIN)/python tools/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
