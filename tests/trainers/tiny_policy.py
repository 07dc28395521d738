"""A tiny Apertus policy that ends its answers, a tiny reward model, and prompt files: what the QRPO data and DPO
tests build on. Random weights, the shipped tokenizer with the Apertus chat template; seconds to build and run."""

import json
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer

from apertus_hf import ApertusConfig, ApertusForCausalLM, ApertusForSequenceClassification
from apertus_hf.tokenization import APERTUS_CHAT_TEMPLATE
from apertus_hf.tokenization.special_tokens import ASSISTANT_END_TOKEN_ID
from tests.pretraining.conftest import SHIPPED_TOKENIZER, TINY_MODEL

VOCAB_SIZE = 8192

# Conversations in the format of SFT data: each ends with the answer, which the QRPO data pipeline drops from the
# prompt and hands to the reward function as `answer`.
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What comes after Monday?"},
            {"role": "assistant", "content": "Tuesday."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Now in French, please, and then count from one to three."},
            {"role": "assistant", "content": "Bonjour. Un, deux, trois."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Write the word tree in capitals."},
            {"role": "assistant", "content": "TREE"},
        ]
    },
    {"messages": [{"role": "user", "content": "Is 7 greater than 3?"}, {"role": "assistant", "content": "Yes."}]},
    {"messages": [{"role": "user", "content": "Continue: 2, 4, 6"}, {"role": "assistant", "content": "8, 10, 12"}]},
]
STRING_PROMPTS = ["The river", "Once upon a time, in a village by the lake,", "Il était une fois", "Zwei"]


def chat_tokenizer():
    """The shipped tokenizer, with the Apertus chat template."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    tokenizer.chat_template = APERTUS_CHAT_TEMPLATE
    return tokenizer


def tiny_config(**overrides) -> ApertusConfig:
    return ApertusConfig.from_preset("small", **TINY_MODEL, vocab_size=VOCAB_SIZE, **overrides)


def stopping_policy(stop_probability: float = 0.2, seed: int = 0) -> ApertusForCausalLM:
    """A random tiny Apertus that emits <|assistant_end|> with about `stop_probability` at every step.

    A random model almost never samples one of the 3 stop tokens among 8192, so its completions would all run to
    max_new_tokens. Here every embedding gets a large constant in hidden dimension 0: that dimension dominates the
    residual stream, so after the final RMSNorm it is about sqrt(hidden_size) at every position, whatever the input.
    Only the <|assistant_end|> row of the LM head reads it; the other tokens stay nearly uniform.
    """
    torch.manual_seed(seed)
    model = ApertusForCausalLM(tiny_config())
    hidden = model.config.hidden_size
    others = VOCAB_SIZE - 1
    stop_logit = math.log(stop_probability / (1 - stop_probability) * others)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[ASSISTANT_END_TOKEN_ID, 0] = stop_logit / math.sqrt(hidden)
    return model.eval()


def save_policy(folder: Path, model: ApertusForCausalLM | None = None) -> Path:
    (model or stopping_policy()).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def save_reward_model(folder: Path, num_labels: int = 1, seed: int = 1) -> Path:
    """A random tiny `ApertusForSequenceClassification` with the chat tokenizer."""
    torch.manual_seed(seed)
    ApertusForSequenceClassification(tiny_config(num_labels=num_labels)).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
