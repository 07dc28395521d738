"""Fixtures of the pretraining tests: a small corpus cut from the shipped one, and tiny run configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TOKENIZER = REPO_ROOT / "data" / "tokenizer"

# A model small enough that a test run of a few dozen steps takes seconds on 2 CPU cores.
TINY_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A jsonl file with the first documents of every language of the shipped corpus, cut to 1500 characters."""
    folder = tmp_path_factory.mktemp("corpus")
    records = []
    for path in sorted((REPO_ROOT / "data" / "corpus").glob("*.jsonl")):
        with path.open() as handle:
            for _, line in zip(range(12), handle, strict=False):
                records.append({"text": json.loads(line)["text"][:1500]})
    corpus = folder / "small.jsonl"
    corpus.write_text("".join(json.dumps(record) + "\n" for record in records))
    return corpus


def tiny_run(output_dir: Path, corpus: Path, **overrides) -> dict:
    """Options of a tiny, fast, float32 run on `corpus` (a PretrainConfig as a dict)."""
    return {
        "output_dir": str(output_dir),
        "tokenizer": str(SHIPPED_TOKENIZER),
        "data": [{"path": str(corpus)}],
        "eval_documents": 4,
        "model_overrides": dict(TINY_MODEL),
        "seq_len": 64,
        "per_device_batch_size": 4,
        "max_steps": 12,
        "warmup_steps": 2,
        "learning_rate": 3e-3,
        "logging_steps": 4,
        "eval_steps": 6,
        "checkpoint_steps": 4,
        "progress_bar": False,
        **overrides,
    }


def write_recipe(path: Path, options: dict) -> Path:
    path.write_text(json.dumps(options))  # JSON is YAML
    return path


def run_recipe(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.Popen:
    """Start recipes/pretrain.py in a fresh interpreter (or under `launcher`, e.g. accelerate launch)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*(launcher or [sys.executable]), str(REPO_ROOT / "recipes" / "pretrain.py"), *args]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )
