"""Fixtures of the ablation tests: a small corpus, a tiny base recipe and a study of two variants on it."""

import json
from pathlib import Path

import pytest

# Autouse: each in-process run builds its own Accelerator, as a fresh process would.
from tests.pretraining.conftest import fresh_accelerator_state  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def study_corpus(tmp_path_factory) -> Path:
    """A jsonl file with the first documents of every language of the shipped corpus, cut to 1200 characters."""
    records = []
    for path in sorted((REPO_ROOT / "data" / "corpus").glob("*.jsonl")):
        with path.open() as handle:
            for _, line in zip(range(8), handle, strict=False):
                records.append({"text": json.loads(line)["text"][:1200]})
    corpus = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    corpus.write_text("".join(json.dumps(record) + "\n" for record in records))
    return corpus


@pytest.fixture
def base_recipe(tmp_path, study_corpus) -> Path:
    """A tiny pretraining recipe: 2 layers of width 32, rows of 64 tokens, 4 rows a step."""
    recipe = {
        "tokenizer": str(REPO_ROOT / "data" / "tokenizer"),
        "data": [{"path": str(study_corpus)}],
        "model_overrides": {
            "hidden_size": 32,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        "seq_len": 64,
        "per_device_batch_size": 4,
        "warmup_steps": 1,
        "learning_rate": 3e-3,
        "logging_steps": 2,
        "eval_steps": 3,
        "checkpoint_steps": 3,
        "max_eval_batches": 2,
        "progress_bar": False,
    }
    path = tmp_path / "base.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def two_variant_study(base: Path, output_dir: Path, **options) -> dict:
    """A study of a Llama-style baseline and the Apertus recipe: 6 steps of 256 tokens, 4 held-out documents."""
    return {
        "name": "test",
        "base": str(base),
        "tokens": 6 * 4 * 64,
        "seeds": [1],
        "baseline": "llama",
        "heldout_documents": 4,
        "output_dir": str(output_dir),
        "bits_per_byte_batch_size": 4,
        "variants": [
            {
                "name": "llama",
                "description": "Llama-style",
                "overrides": {
                    "model_type": "llama",
                    "model_overrides": {"intermediate_size": 64},
                    "chunked_loss": False,
                    "optimizer": "adamw",
                    "goldfish": False,
                },
            },
            {"name": "apertus", "description": "the Apertus recipe", "overrides": {}},
        ],
        **options,
    }
