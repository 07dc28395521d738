"""The pretraining loop's speed options change how a step is computed, never what it computes."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch._dynamo

from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics
from apertus_hf.runtime import resolve_attn_implementation
from tests.pretraining.conftest import tiny_run


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Compiled runs must not reuse the graphs (and recompilation counts) of an earlier test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(tmp_path: Path, corpus: Path, name: str, **options) -> tuple[dict[int, float], list[float], str]:
    run = tiny_run(
        tmp_path / name, corpus, max_steps=6, warmup_steps=1, logging_steps=1, eval_steps=3, checkpoint_steps=0
    )
    result = pretrain(PretrainConfig(**{**run, **options}))
    records = read_metrics(result.output_dir / "metrics.jsonl")
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    eval_losses = [r["eval/loss"] for r in records if "eval/loss" in r]
    return losses, eval_losses, (result.output_dir / "train.log").read_text()


def test_the_chunked_loss_trains_like_the_full_logits(tmp_path, small_corpus):
    chunked, chunked_eval, log = _run(tmp_path, small_corpus, "chunked")
    plain, plain_eval, _ = _run(tmp_path, small_corpus, "plain", chunked_loss=False)
    assert "chunked loss True" in log
    assert sorted(chunked) == list(range(1, 7))
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert len(chunked_eval) == 2 and chunked_eval == pytest.approx(plain_eval, rel=1e-5)


@pytest.mark.slow
def test_compiled_layers_and_fused_xielu_train_like_eager(tmp_path, small_corpus):
    eager, eager_eval, _ = _run(tmp_path, small_corpus, "eager", xielu_implementation="eager")
    compiled, compiled_eval, log = _run(
        tmp_path, small_corpus, "compiled", compile_layers=True, xielu_implementation="compiled"
    )
    assert "xIELU compiled, compiled layers True" in log
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert compiled_eval == pytest.approx(eager_eval, rel=1e-5)


def test_auto_attention_is_flash_attention_on_cuda_with_flash_attn_else_sdpa(monkeypatch):
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attn_implementation("eager", torch.device("cuda")) == "eager"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a)
    )
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a)
    )
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        resolve_attn_implementation("flash_attention_3", torch.device("cuda"))


def test_an_unknown_attention_backend_fails_before_training(tmp_path, small_corpus):
    with pytest.raises(ValueError, match="attn_implementation='flash' is not one of"):
        PretrainConfig(**tiny_run(tmp_path / "bad", small_corpus, attn_implementation="flash"))


def test_init_from_another_architecture_is_refused_by_name(tmp_path, small_corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(other)
    with pytest.raises(ValueError, match="LlamaForCausalLM is not an apertus_hf model"):
        pretrain(PretrainConfig(**tiny_run(tmp_path / "run", small_corpus, init_from=str(other), model_overrides={})))
