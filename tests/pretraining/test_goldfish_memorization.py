"""The purpose of the Goldfish loss: a model trained for many epochs on a few passages learns them verbatim without
it, and cannot reproduce them with it, because the same context always hides the same targets."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apertus_hf.data import goldfish_drop_mask
from tests.pretraining.conftest import MEMORIZATION_GOLDFISH_H, MEMORIZATION_GOLDFISH_K

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


@pytest.mark.slow
def test_goldfish_prevents_verbatim_memorization(memorization_passages, toy_memorization_models):
    _, texts = memorization_passages
    # All of four against none is the strongest outcome four passages allow (Fisher's exact test: one-sided p =
    # 1/70), so nothing less passes; the statistical weight is on the test below, over every target.
    assert _count_verbatim(toy_memorization_models["standard"], texts) == len(texts)
    assert _count_verbatim(toy_memorization_models["goldfish"], texts) == 0


def _next_token_hits(model_dir: Path, texts: list[str]) -> dict[str, list[bool]]:
    """Teacher-forced, every target of the training rows (<s> + passage): whether the model's most likely next token
    is the passage's, split into the targets the Goldfish run dropped from the loss and those it kept."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hits = {"dropped": [], "kept": []}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        # The packed training row is <s> + passage + </s> with the same ids as labels; the mask is over those labels.
        row = torch.cat([ids[0], torch.tensor([tokenizer.eos_token_id])])
        dropped = goldfish_drop_mask(row, k=MEMORIZATION_GOLDFISH_K, h=MEMORIZATION_GOLDFISH_H)[1 : ids.shape[1]]
        with torch.no_grad():
            correct = model(input_ids=ids, use_cache=False).logits[0, :-1].argmax(-1) == ids[0, 1:]
        hits["dropped"] += correct[dropped].tolist()
        hits["kept"] += correct[~dropped].tolist()
    return hits


def _z(more: list[bool], fewer: list[bool]) -> float:
    """Two-proportion z statistic of share(more) - share(fewer), with the standard error pooled under no difference
    (0 when both are all hits or all misses: then there is no difference to find)."""
    pooled = (sum(more) + sum(fewer)) / (len(more) + len(fewer))
    standard_error = (pooled * (1 - pooled) * (1 / len(more) + 1 / len(fewer))) ** 0.5
    difference = sum(more) / len(more) - sum(fewer) / len(fewer)
    return difference / standard_error if standard_error > 0 else 0.0


@pytest.mark.slow
def test_goldfish_hides_exactly_the_dropped_targets(memorization_passages, toy_memorization_models):
    """The mechanism, over every target of the four passages rather than four verbatim yes/no: the Goldfish model
    predicts the targets the loss kept as well as the standard model does and misses the ones it dropped. Targets of
    one passage are not fully independent, so the binomial standard errors are a guide; the margins are wide.
    Seen: standard 56/56 dropped targets right, Goldfish 11/56 (8.7 SE apart); Goldfish kept 188/192 (12.9 SE above
    its dropped). No effect fails (the same shares give z = 0), and so does a mask one position off from the one the
    loss used (that model's kept and "dropped" targets then differ by 0.4 SE)."""
    _, texts = memorization_passages
    standard = _next_token_hits(toy_memorization_models["standard"], texts)
    goldfish = _next_token_hits(toy_memorization_models["goldfish"], texts)
    memorized, specific = _z(standard["dropped"], goldfish["dropped"]), _z(goldfish["kept"], goldfish["dropped"])
    right = {
        f"{name} {kind}": f"{sum(hits)}/{len(hits)}"
        for name, result in (("standard", standard), ("goldfish", goldfish))
        for kind, hits in result.items()
    }
    print(f"targets predicted right: {right}; {memorized:.1f} SE, {specific:.1f} SE")
    assert memorized > 3, (standard, goldfish)
    assert specific > 3, goldfish
