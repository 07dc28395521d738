"""The shipped `evaluate` modules: each loads offline from its folder with `evaluate.load`, gives what the evaluation
functions give, and computes its documented formula (checked on values where a wrong formula gives another number)."""

import math
import socket

import pytest
import torch

from apertus_hf import ApertusForCausalLM
from apertus_hf.evaluation import METRIC_NAMES, LossTotals, load_metric, metric_path
from apertus_hf.evaluation.memorization import Passages, extract, greedy_continuations
from apertus_hf.evaluation.multiple_choice import MultipleChoiceItem, accuracy_metrics

evaluate = pytest.importorskip("evaluate")


@pytest.fixture
def offline(monkeypatch):
    """No network: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _load(name: str):
    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


def test_every_shipped_metric_loads_offline_from_its_folder(offline):
    for name in METRIC_NAMES:
        module = _load(name)
        assert isinstance(module, evaluate.Metric)
        assert module.name == name
        assert type(load_metric(name)) is type(module)


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError, match="bits_per_byte, memorization_exact_match, multiple_choice_accuracy"):
        load_metric("bits_per_token")


def test_bits_per_byte_sums_the_rows_before_dividing(offline):
    metric = _load("bits_per_byte")
    # Two documents whose own ratios differ: a mean of per-row values would give other numbers.
    rows = {"nll": [50.0, 70.0], "tokens": [15, 25], "bytes": [30, 70]}
    result = metric.compute(**rows)
    assert result == LossTotals(nll=120.0, tokens=40, bytes=100).metrics()
    assert result["loss"] == 120.0 / 40
    assert result["perplexity"] == math.exp(3.0)
    assert result["bits_per_byte"] == 120.0 / math.log(2) / 100
    with pytest.raises(ValueError, match="No text to score"):
        metric.compute(nll=[0.0], tokens=[0], bytes=[0])


def test_multiple_choice_accuracy_normalises_by_characters_and_bytes(offline):
    metric = _load("multiple_choice_accuracy")
    items = [
        # "üüüü": 4 characters, 8 bytes. Raw picks 0, per character 1 (-3/4 < -4/6), per byte 0 (-3/8 > -4/6).
        MultipleChoiceItem("", ("üüüü", "abcdef"), 1),
        # Raw picks 0, per character and per byte 1 (-1.5/2 > -1/1).
        MultipleChoiceItem("", ("a", "bb"), 1),
        # A tie: the first choice, as numpy.argmax.
        MultipleChoiceItem("", ("x", "y"), 0),
    ]
    loglikelihoods = [[-3.0, -4.0], [-1.0, -1.5], [-2.0, -2.0]]
    result = metric.compute(
        loglikelihoods=loglikelihoods,
        choices=[list(item.choices) for item in items],
        gold=[item.gold for item in items],
    )
    assert result == accuracy_metrics(items, loglikelihoods)
    assert result["predictions"] == {"acc": [0, 0, 0], "acc_norm": [1, 1, 0], "acc_bytes": [0, 1, 0]}
    assert (result["acc"], result["acc_norm"], result["acc_bytes"]) == (1 / 3, 1.0, 2 / 3)
    # lm-eval's mean_stderr: the sample standard deviation (n - 1) over sqrt(n); hits 0, 0, 1 give 1/3.
    assert result["acc_stderr"] == pytest.approx(1 / 3)
    assert result["acc_bytes_stderr"] == pytest.approx(1 / 3)
    assert result["acc_norm_stderr"] == 0.0
    single = metric.compute(loglikelihoods=[[-1.0, -2.0]], choices=[["a", "b"]], gold=[0])
    assert single["acc"] == 1.0 and single["acc_stderr"] is None
    with pytest.raises(ValueError, match="Item 0: 2 log-likelihoods"):
        metric.compute(loglikelihoods=[[-1.0, -2.0]], choices=[["a", "b"]], gold=[2])


def test_memorization_exact_match_equals_the_audit_on_a_model(offline, tiny_model_dir):
    metric = _load("memorization_exact_match")
    model = ApertusForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = torch.tensor([[1, 100, 200, 300], [1, 400, 500, 600]])
    generated = greedy_continuations(model, prompts, new_tokens=5, batch_size=2)
    # Passage 0 expects what the model generates; passage 1 differs at the third token only.
    expected = generated.clone()
    expected[1, 2] = (generated[1, 2] + 1) % model.config.vocab_size
    audit = extract(model, Passages(prompts, expected), batch_size=2)
    result = metric.compute(predictions=generated.tolist(), references=expected.tolist())
    assert result == audit
    assert result["exact_match_per_passage"] == [True, False]
    # Only the tokens before the first mismatch count, not every equal position (4 in passage 1).
    assert result["prefix_match_per_passage"] == [5, 2]
    assert (result["exact_match"], result["prefix_match"]) == (0.5, 3.5)
