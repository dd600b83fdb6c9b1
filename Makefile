# The two entry points of the README. Each creates its own environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject.toml: 2.13.0 is the CPU build these machines install without a network.
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: demo test test-all install
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/egaku generate "a large red circle in the center on a navy background" -n 4 --seed 0 --out outputs/demo
	@echo "open outputs/demo/ to see the images and the grid"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# slow tests (multi-minute training runs) on top of the default ones
test-all: $(STAMP)
	EGAKU_SLOW=1 $(BIN)/python -m pytest -q tests
