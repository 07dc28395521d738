#!/usr/bin/env bash
# Every GPU check the project has code for, in one run, for the rare session that is lent a GPU machine. Each check
# has its own time limit, so one that hangs or fails does not cost the others; logs go to $OUT (default gpu-checks/)
# and the last lines of each are printed. Record the figures in benchmarks/RESULTS.md with the date and device.
#
#   bash benchmarks/gpu_checks.sh
#   CHECKS="pretrain_1b_zero3 train_step" bash benchmarks/gpu_checks.sh     # only these
#
# On a machine whose Python lacks this project's pinned packages, put their wheels in .whl/ first (see
# benchmarks/RESULTS.md, "GPU checks"): they are installed to /tmp/site ahead of the system's packages.
set -u
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

check() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${CHECKS:-}" ] && [[ " $CHECKS " != *" $name "* ]]; then return; fi
    echo "=== $name (limit ${limit}s) at $(date -u +%T)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    tail -n "${TAIL_LINES:-20}" "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PYTHON" -c "import torch, transformers, accelerate, deepspeed, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__, \
'datasets', datasets.__version__)"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# Correctness on CUDA: fused xIELU, chunked loss in bf16, SDPA/flash parity with the stock model, a bf16 pretraining run.
check cuda_tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/data/test_document_masking.py \
    tests/pretraining/test_cuda_pretraining.py tests/test_modeling.py tests/test_runtime.py

# Issue 14: activation memory of a long-context step (8B layer shape, 8k..64k, checkpointing, chunked loss).
check long_context_memory 60 "$PYTHON" benchmarks/long_context_memory.py

# Our model against transformers' Apertus: a ~1.1B model, seq 4096, bf16, fused xIELU, compiled layers.
check model_speed 120 "$PYTHON" benchmarks/model_speed.py --compile-layers --rounds 1

# Issue 15: ZeRO-3 on one GPU, a ~1B model (16 x 2048, MLP 10752) in bf16 with fused xIELU; MFU. Not with
# compile_layers: under ZeRO-3 the compiled layers hit dynamo's recompile limit and then an inductor kernel failed
# with "misaligned address" (H200, torch 2.11, deepspeed 0.19.8; benchmarks/RESULTS.md).
check pretrain_1b_zero3 150 "$PYTHON" -m accelerate.commands.launch --config_file accelerate_configs/zero3.yaml --num_processes 1 \
    --mixed_precision bf16 recipes/pretrain.py --config recipes/configs/1b/pretrain.yaml \
    --output_dir /tmp/pretrain-1b --tokenizer data/tokenizer --data '[{path: data/corpus}]' --streaming false \
    --eval_documents 0 --batch_ramp '[]' --max_steps 40 --warmup_steps 4 --ademamix_warmup_steps 40 \
    --logging_steps 10 --checkpoint_steps 0 --report_to '[]' --progress_bar false --xielu_implementation compiled
tail -n 4 /tmp/pretrain-1b/metrics.jsonl >>"$OUT/pretrain_1b_zero3.log" 2>/dev/null

# Issue 15: our loop against the transformers Trainer with the stock model, same ~1B shape; batch 4, as the stock
# model runs out of the H200's memory at 8 rows of 4096 (its full fp32 logits and eager xIELU).
check train_step 120 "$PYTHON" benchmarks/train_step.py --seq-len 4096 --batch-size 4 --steps 10 --warmup 3 \
    --rounds 1 --override hidden_size=2048 --override intermediate_size=10752 --override num_hidden_layers=16 \
    --override num_attention_heads=16 --override num_key_value_heads=4
