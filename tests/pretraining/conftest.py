"""Fixtures of the pretraining tests: a small corpus cut from the shipped one, tiny run configs, and the toy
memorization models (trained with and without Goldfish; their session fixtures are in tests/conftest.py, shared
with the memorization audit)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from transformers import AutoTokenizer

from apertus_hf.pretraining import PretrainConfig, pretrain

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


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process run builds its own Accelerator, as a fresh process would."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


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
    # One thread per run, pinned for MKL too: tests compare the losses of separate processes bit for bit, and a
    # matmul's rounding depends on how many threads split it. MKL otherwise picks that number per call (MKL_DYNAMIC),
    # and a CI run once saw a resumed process round differently from the uninterrupted one.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    command = [*(launcher or [sys.executable]), str(REPO_ROOT / "recipes" / "pretrain.py"), *args]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


# The toy memorization setup: a model trained for 150 steps on four passages (one per language) memorizes them.
MEMORIZATION_SEQ_LEN = 64
MEMORIZATION_LANGUAGES = ("en", "fr", "it", "es")
# The Goldfish options of the toy model trained with Goldfish: a quarter of the targets dropped, by 8-token contexts.
MEMORIZATION_GOLDFISH_K = 4
MEMORIZATION_GOLDFISH_H = 8


def write_memorization_passages(folder: Path, document_index: int = 0) -> tuple[Path, list[str]]:
    """`folder/passages.jsonl`: one passage per language, cut from line `document_index` of its shipped corpus file,
    of exactly MEMORIZATION_SEQ_LEN - 2 tokens, so that with <s> and </s> each fills one packed row."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    texts = []
    for language in MEMORIZATION_LANGUAGES:
        lines = (REPO_ROOT / "data" / "corpus" / f"{language}.jsonl").read_text().splitlines()
        ids = tokenizer(json.loads(lines[document_index])["text"], add_special_tokens=False)["input_ids"]
        # A cut can re-encode differently at its edges; take the first window that round-trips exactly.
        for start in range(len(ids) - MEMORIZATION_SEQ_LEN):
            window = ids[start : start + MEMORIZATION_SEQ_LEN - 2]
            if tokenizer(tokenizer.decode(window), add_special_tokens=False)["input_ids"] == window:
                texts.append(tokenizer.decode(window))
                break
    assert len(texts) == len(MEMORIZATION_LANGUAGES)
    path = folder / "passages.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path, texts


def train_toy_memorization_model(output_dir: Path, corpus: Path, goldfish: bool) -> Path:
    """Train the toy model on `corpus` for many epochs (with MEMORIZATION_GOLDFISH_K and _H when `goldfish`); its
    exported folder."""
    AcceleratorState._reset_state(True)
    options = tiny_run(
        output_dir,
        corpus,
        model_overrides={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2},
        seq_len=MEMORIZATION_SEQ_LEN,
        eval_documents=0,
        checkpoint_steps=0,
        max_steps=150,
        warmup_steps=10,
        learning_rate=1e-2,
        goldfish=goldfish,
        goldfish_k=MEMORIZATION_GOLDFISH_K,
        goldfish_h=MEMORIZATION_GOLDFISH_H,
    )
    result = pretrain(PretrainConfig(**options))
    AcceleratorState._reset_state(True)
    return Path(result.model_dir)
