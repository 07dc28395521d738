# Every target sets up what it needs: on a fresh machine `make test` creates .venv and installs the project.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; GPU users run e.g. `make setup TORCH_SPEC="torch"` for their CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup pretrain sft qrpo-data qrpo dpo test lint benchmark clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed,post-training,eval]"
	touch $@

setup: $(BIN)/.installed

# The embedded default run; extra options go through ARGS, e.g. make pretrain ARGS="--max_steps 50". Without
# --num_cpu_threads_per_process, `accelerate launch` would limit a non-CPU-config run to one CPU thread.
CPU_COUNT := $(shell $(PYTHON) -c "import os; print(os.cpu_count())")
ACCELERATE_ARGS ?= --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(CPU_COUNT)
pretrain: setup
	$(BIN)/accelerate launch $(ACCELERATE_ARGS) recipes/pretrain.py $(ARGS)

# SFT starts from the model the default pretraining exports; `make pretrain` (with its defaults) builds it if missing.
PRETRAINED_MODEL := outputs/pretrain-tiny/model/config.json
$(PRETRAINED_MODEL):
	$(MAKE) --no-print-directory pretrain ARGS=
sft: setup $(PRETRAINED_MODEL)
	$(BIN)/accelerate launch $(ACCELERATE_ARGS) recipes/sft.py $(ARGS)

# QRPO and the DPO baseline train the SFT model on the pairs sampled from it; each step builds the one before.
SFT_MODEL := outputs/sft-tiny/config.json
QRPO_DATA := outputs/qrpo-data-tiny/prepare_stats.json
$(SFT_MODEL):
	$(MAKE) --no-print-directory sft ARGS=
$(QRPO_DATA):
	$(MAKE) --no-print-directory qrpo-data ARGS=
qrpo-data: setup $(SFT_MODEL)
	$(BIN)/accelerate launch $(ACCELERATE_ARGS) recipes/qrpo_prepare.py $(ARGS)
qrpo: setup $(QRPO_DATA)
	$(BIN)/accelerate launch $(ACCELERATE_ARGS) recipes/qrpo.py $(ARGS)
dpo: setup $(QRPO_DATA)
	$(BIN)/accelerate launch $(ACCELERATE_ARGS) recipes/dpo.py $(ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks recipes data eval
	$(BIN)/ruff format --check src tests benchmarks recipes data eval

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 $(BIN)/python -m pytest -q

benchmark: setup
	$(BIN)/python benchmarks/model_speed.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/qrpo_step.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache outputs
