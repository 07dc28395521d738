"""A tiny random Apertus saved with the shipped tokenizer: the evaluations run on any model folder."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from apertus_hf import ApertusConfig, ApertusForCausalLM
from tests.pretraining.conftest import SHIPPED_TOKENIZER, TINY_MODEL


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ApertusConfig.from_preset("small", **TINY_MODEL, vocab_size=8192)
    folder = tmp_path_factory.mktemp("tiny_model")
    ApertusForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder)
    return folder
