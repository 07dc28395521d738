"""The purpose of the Goldfish loss: a model trained for many epochs on a few passages learns them verbatim without
it, and cannot reproduce them with it, because the same context always hides the same targets."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PREFIX_TOKENS = 16
CONTINUATION_TOKENS = 40


def _count_verbatim(model_dir: Path, texts: list[str]) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    verbatim = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]  # <s> + passage, as in training
        prefix, expected = (
            ids[:, : PREFIX_TOKENS + 1],
            ids[0, PREFIX_TOKENS + 1 : PREFIX_TOKENS + 1 + CONTINUATION_TOKENS],
        )
        with torch.no_grad():
            generated = model.generate(prefix, max_new_tokens=len(expected), do_sample=False)[0, prefix.shape[1] :]
        verbatim += torch.equal(generated, expected)
    return verbatim


def test_goldfish_prevents_verbatim_memorization(memorization_passages, toy_memorization_models):
    _, texts = memorization_passages
    assert _count_verbatim(toy_memorization_models["standard"], texts) == len(texts)
    assert _count_verbatim(toy_memorization_models["goldfish"], texts) == 0
