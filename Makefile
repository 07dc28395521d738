# Every target sets up what it needs: on a fresh machine `make test` creates .venv and installs the project.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; GPU users run e.g. `make setup TORCH_SPEC="torch"` for their CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test lint benchmark clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed,post-training]"
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 $(BIN)/python -m pytest -q

benchmark: setup
	$(BIN)/python benchmarks/model_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
