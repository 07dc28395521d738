# Every target sets up what it needs: on a fresh machine `make test` creates .venv and installs the project.
PYTHON ?= python3
VENV ?= .venv
# The torch the lock is resolved against and CI tests. TORCH_SPEC defaults to its CPU build; GPU users run e.g.
# `make setup TORCH_SPEC="torch"` for their CUDA build. The lock never pins torch (nor what only torch needs).
TORCH_VERSION := 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
EXTRAS := dev,deepspeed,post-training,eval,plots
# One tested set of every other dependency, compiled by `make lock` from pyproject.toml's ranges.
LOCK := requirements/lock.txt
BIN := $(VENV)/bin

.PHONY: setup lock drift pretrain sft qrpo-data qrpo dpo apertus-tiny alignment-tiny ablation-tiny chat test test-fast lint benchmark clean

# `pip install -c` moves every locked package to its pin (up or down) in a venv made before a lock change; the check
# after it fails, naming the package, if anything still differs from the lock.
$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	$(BIN)/python requirements/lock.py check $(LOCK) --extras $(EXTRAS)
	touch $@

setup: $(BIN)/.installed

# `make lock` refreshes the lock to the newest versions pyproject.toml allows (LOCK_UPGRADE= keeps the current pins and
# only adds what is new), re-syncs .venv to it and reruns the suite. A universal lock (any OS, Python from
# requires-python's floor), resolved against torch==$(TORCH_VERSION) but emitted without it; uv lives in $(TOOLS).
TOOLS := .tools
UV_SPEC ?= uv==0.13.9
LOCK_PYTHON := 3.11
LOCK_EXTRAS := dev deepspeed post-training eval tracking plots
LOCK_UPGRADE ?= --upgrade
$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet "$(UV_SPEC)"
lock: $(TOOLS)/bin/uv
	echo "torch==$(TORCH_VERSION)" > $(TOOLS)/torch.txt
	if [ -f $(LOCK) ]; then cp $(LOCK) $(TOOLS)/lock-full.txt; fi
	UV_PYTHON_DOWNLOADS=never $(TOOLS)/bin/uv pip compile --quiet pyproject.toml $(LOCK_EXTRAS:%=--extra %) \
		--universal --python-version $(LOCK_PYTHON) --python $(PYTHON) -c $(TOOLS)/torch.txt $(LOCK_UPGRADE) \
		--custom-compile-command "make lock" -o $(TOOLS)/lock-full.txt
	$(PYTHON) requirements/lock.py prune $(TOOLS)/lock-full.txt $(LOCK)
	$(MAKE) --no-print-directory test

# `make drift`: a throwaway venv with the NEWEST versions pyproject.toml allows (no lock), then the fast tests, so an
# upstream release that breaks us shows up before a user meets it. Torch is not "newest" but DRIFT_TORCH_SPEC (the CPU
# wheel by default): the newest torch on PyPI for Linux is a multi-GB CUDA build; on a GPU machine pass
# DRIFT_TORCH_SPEC=torch. The test list is DRIFT_TESTS; tests marked slow or cuda are left out.
DRIFT_VENV := .venv-drift
DRIFT_TORCH_SPEC ?= $(TORCH_SPEC)
DRIFT_TESTS := tests/test_upstream_contracts.py tests/test_modeling.py tests/test_interop.py tests/test_configuration.py tests/test_compile.py \
	tests/trainers/test_sft.py tests/trainers/test_qrpo_trainer.py tests/trainers/test_dpo.py
DRIFT_PACKAGES := torch transformers accelerate trl peft datasets deepspeed
drift:
	rm -rf $(DRIFT_VENV)
	$(PYTHON) -m venv $(DRIFT_VENV)
	$(DRIFT_VENV)/bin/python -m pip install --quiet "$(DRIFT_TORCH_SPEC)"
	$(DRIFT_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager "$(DRIFT_TORCH_SPEC)" \
		-e ".[$(EXTRAS)]"
	$(DRIFT_VENV)/bin/python requirements/lock.py versions $(LOCK) $(DRIFT_PACKAGES)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 $(DRIFT_VENV)/bin/python -m pytest -q \
		-m "not slow and not cuda" $(DRIFT_TESTS)

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

# The whole Apertus pipeline at tiny scale, each step from the model of the one before: pretraining in three data
# stages with its schedule counted in samples and a batch that doubles, the long-context extension 128 -> 256 -> 512,
# SFT, QRPO's reference completions and rewards, QRPO, evaluation, and the card of the final model (`recipes/publish.py
# --dry-run`; with HUB_MODEL_ID=ORG/NAME it is uploaded). Each step writes its own folder in outputs/apertus-tiny/.
TINY := outputs/apertus-tiny
LAUNCH := $(BIN)/accelerate launch $(ACCELERATE_ARGS)
HUB_MODEL_ID ?=
apertus-tiny: setup
	$(LAUNCH) recipes/pretrain.py --config recipes/configs/tiny/pretrain_staged.yaml --output_dir $(TINY)/pretrain
	$(LAUNCH) recipes/long_context.py --config recipes/configs/tiny/long_context.yaml \
		--init_from $(TINY)/pretrain/model --output_dir $(TINY)/long-context
	$(LAUNCH) recipes/sft.py --config recipes/configs/tiny/sft.yaml \
		--model_name_or_path $(TINY)/long-context/512/model --output_dir $(TINY)/sft
	$(LAUNCH) recipes/qrpo_prepare.py --config recipes/configs/tiny/qrpo_prepare.yaml \
		--model_name_or_path $(TINY)/sft --output_dir $(TINY)/qrpo-data
	$(LAUNCH) recipes/qrpo.py --config recipes/configs/tiny/qrpo.yaml \
		--model_name_or_path $(TINY)/sft --dataset $(TINY)/qrpo-data --output_dir $(TINY)/qrpo
	$(BIN)/python eval/perplexity.py --model $(TINY)/qrpo --data data/corpus/*.jsonl --group_by language
	$(BIN)/python eval/multiple_choice.py --model $(TINY)/qrpo \
		--task eval/tasks/apertus_toy_mc/apertus_toy_mc.jsonl
	$(BIN)/python recipes/publish.py --model $(TINY)/qrpo --repo-id $(or $(HUB_MODEL_ID),ORG/apertus-tiny) \
		$(if $(HUB_MODEL_ID),,--dry-run)

# Alignment as Apertus did it, at tiny scale, from the default SFT model (`make sft`, which pretrains first if needed):
# a reward model trained on data/preferences; a tiny LLM judge (SFT on data/judge, the example charter's rules); the
# prompts of data/judge_prompts labelled contested or not by that judge; QRPO data scored by the judge (contested
# prompts, 1-9 from its digit probabilities, top 5 re-ranked in pairs) and the reward model (the others) on the train
# split; QRPO; the reward before and after QRPO, with standard errors, on the held-out test split (contested topics that
# neither the judge nor QRPO saw) and on data/chat test; a chat transcript of the aligned model.
# Everything goes to outputs/alignment-tiny/; README "Alignment at tiny scale" describes the steps.
ALIGNMENT := outputs/alignment-tiny
CHARTER := data/charters/example_charter.yaml
alignment-tiny: setup $(SFT_MODEL)
	$(LAUNCH) recipes/reward.py --output_dir $(ALIGNMENT)/reward
	$(LAUNCH) recipes/sft.py --config recipes/configs/tiny/sft.yaml --model_name_or_path outputs/pretrain-tiny/model \
		--dataset data/judge --max_length 512 --num_train_epochs 2 --eval_strategy no --eval_on_start false \
		--output_dir $(ALIGNMENT)/judge
	$(LAUNCH) recipes/label_prompts.py --model_name_or_path $(ALIGNMENT)/judge --charter $(CHARTER) \
		--output_dir $(ALIGNMENT)/prompts
	$(LAUNCH) recipes/qrpo_prepare.py --config recipes/configs/tiny/qrpo_prepare_judge.yaml --dataset $(ALIGNMENT)/prompts \
		--reward_model $(ALIGNMENT)/reward --reward_function null --judge_model $(ALIGNMENT)/judge --charter $(CHARTER) \
		--output_dir $(ALIGNMENT)/qrpo-data
	$(LAUNCH) recipes/qrpo.py --dataset $(ALIGNMENT)/qrpo-data --output_dir $(ALIGNMENT)/qrpo
	$(BIN)/python eval/reward.py --model outputs/sft-tiny $(ALIGNMENT)/qrpo --dataset $(ALIGNMENT)/prompts \
		--split test --reward_model $(ALIGNMENT)/reward --judge_model $(ALIGNMENT)/judge --charter $(CHARTER) \
		--route_column contested --max_new_tokens 32 --output_dir $(ALIGNMENT)/eval-prompts
	$(BIN)/python eval/reward.py --model outputs/sft-tiny $(ALIGNMENT)/qrpo --dataset data/chat --split test \
		--reward_model $(ALIGNMENT)/reward --answer_similarity --max_new_tokens 32 --output_dir $(ALIGNMENT)/eval-chat
	$(BIN)/python recipes/chat.py $(ALIGNMENT)/qrpo --prompts data/chat_prompts.txt --temperature 0 \
		--output $(ALIGNMENT)/chat.jsonl

# The Apertus report's architecture and optimizer ablations at tiny scale (docs/ablations.md): a Llama-style baseline,
# +QK-norm, +xIELU, +AdEMAMix, +WSD, +Goldfish and the whole recipe, 3 seeds each, the same tokens in the same order;
# each run in its own `accelerate launch`, resumable, finished runs skipped. Table and plot in
# outputs/ablations/apertus-tiny/.
ablation-tiny: setup
	$(BIN)/python recipes/ablate.py --config recipes/configs/ablations/apertus_tiny.yaml --launcher "$(LAUNCH)"

# An interactive chat with a model (default: the QRPO model of `make qrpo`): make chat MODEL=outputs/sft-tiny
MODEL ?= outputs/qrpo-tiny
chat: setup
	$(BIN)/python recipes/chat.py $(MODEL) $(ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks recipes data eval requirements
	$(BIN)/ruff format --check src tests benchmarks recipes data eval requirements

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 $(BIN)/python -m pytest -q

# The inner loop: the suite without the tests marked slow (end-to-end runs in subprocesses, about 15 s or more each on
# 2 CPU cores). `make test`, which CI runs, includes them.
test-fast: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 $(BIN)/python -m pytest -q -m "not slow"

benchmark: setup
	$(BIN)/python benchmarks/model_speed.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/qrpo_step.py

clean:
	rm -rf $(VENV) $(DRIFT_VENV) $(TOOLS) build src/*.egg-info .pytest_cache .ruff_cache outputs
