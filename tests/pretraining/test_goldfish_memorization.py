"""The purpose of the Goldfish loss: a model trained for many epochs on a few passages learns them verbatim without
it, and cannot reproduce them with it, because the same context always hides the same targets."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, AutoTokenizer

from apertus_hf.pretraining import PretrainConfig, pretrain
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER, tiny_run

SEQ_LEN = 64
PREFIX_TOKENS = 16
CONTINUATION_TOKENS = 40


@pytest.fixture(scope="module")
def passages(tmp_path_factory):
    """Four passages (one per language) of exactly SEQ_LEN - 2 tokens: with <s> and </s> each fills one packed row."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    texts = []
    for language in ("en", "fr", "it", "es"):
        first = json.loads((REPO_ROOT / "data" / "corpus" / f"{language}.jsonl").read_text().splitlines()[0])["text"]
        ids = tokenizer(first, add_special_tokens=False)["input_ids"]
        # A cut can re-encode differently at its edges; take the first window that round-trips exactly.
        for start in range(len(ids) - SEQ_LEN):
            window = ids[start : start + SEQ_LEN - 2]
            if tokenizer(tokenizer.decode(window), add_special_tokens=False)["input_ids"] == window:
                texts.append(tokenizer.decode(window))
                break
    assert len(texts) == 4
    path = tmp_path_factory.mktemp("passages") / "passages.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path, texts


def _train_and_count_verbatim(output_dir, corpus, texts, goldfish: bool) -> int:
    AcceleratorState._reset_state(True)
    options = tiny_run(
        output_dir,
        corpus,
        model_overrides={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2},
        seq_len=SEQ_LEN,
        eval_documents=0,
        checkpoint_steps=0,
        max_steps=150,
        warmup_steps=10,
        learning_rate=1e-2,
        goldfish=goldfish,
        goldfish_k=4,
        goldfish_h=8,
    )
    result = pretrain(PretrainConfig(**options))
    AcceleratorState._reset_state(True)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
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


def test_goldfish_prevents_verbatim_memorization(tmp_path, passages):
    corpus, texts = passages
    assert _train_and_count_verbatim(tmp_path / "standard", corpus, texts, goldfish=False) == len(texts)
    assert _train_and_count_verbatim(tmp_path / "goldfish", corpus, texts, goldfish=True) == 0
