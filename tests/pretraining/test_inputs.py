"""A run's inputs, checked before anything is written or tokenised: paths, CPU threads, the model's positions."""

import json
import os

import pytest
import torch
from transformers import AutoConfig

from apertus_hf.pretraining import PretrainConfig, pretrain
from apertus_hf.runtime import SourceNotFoundError
from tests.pretraining.conftest import tiny_run


def _two_steps(output_dir, corpus, **overrides) -> PretrainConfig:
    """A 2-step run without evaluation or checkpoints."""
    short = {"max_steps": 2, "warmup_steps": 0, "decay_fraction": 0.5, "eval_documents": 0, "checkpoint_steps": 0}
    return PretrainConfig(**tiny_run(output_dir, corpus, **{**short, **overrides}))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("init_from", "no/such/model", "init_from='no/such/model': no such file or folder"),
        ("init_from", "org/uncached-model", "init_from='org/uncached-model' is no model folder here, and no Hub model"),
        ("tokenizer", "/no/such/tokenizer", "tokenizer='/no/such/tokenizer': no such file or folder"),
        ("data", [{"path": "no/such/corpus.jsonl"}], "data[0].path='no/such/corpus.jsonl': no such file or folder"),
        ("data", [{"path": "missing/*.jsonl"}], "data[0].path='missing/*.jsonl': the glob matches no file"),
        ("eval_data", [{"path": "./held_out.jsonl"}], "eval_data[0].path='./held_out.jsonl': no such file or folder"),
    ],
)
def test_missing_paths_are_named_before_the_run_folder_is_touched(tmp_path, small_corpus, option, value, message):
    with pytest.raises(SourceNotFoundError) as error:
        pretrain(PretrainConfig(**tiny_run(tmp_path / "run", small_corpus, **{option: value})))
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_single_process_launched_by_accelerate_uses_every_core(tmp_path, small_corpus, monkeypatch, capsys):
    """`accelerate launch` without --num_cpu_threads_per_process sets OMP_NUM_THREADS=1; a lone CPU process then
    takes the cores it may run on, and says so on the console."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # set by `accelerate launch`
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pretrain(_two_steps(tmp_path / "run", small_corpus))
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(threads)
    assert f"{cores} CPU thread(s) per process: every core this process may use" in capsys.readouterr().err


def test_cpu_threads_must_be_positive():
    with pytest.raises(ValueError, match="cpu_threads=0 must be >= 1"):
        PretrainConfig(cpu_threads=0)


def test_a_fresh_model_gets_positions_for_its_rows_and_says_so(tmp_path, small_corpus, capsys):
    overrides = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "max_position_embeddings": 32}
    result = pretrain(_two_steps(tmp_path / "run", small_corpus, model_overrides=overrides))
    assert AutoConfig.from_pretrained(result.model_dir).max_position_embeddings == 64
    assert "max_position_embeddings raised from 32 to seq_len=64" in capsys.readouterr().err


def test_init_from_a_model_with_fewer_positions_than_seq_len_raises_its_config(tmp_path, small_corpus, capsys):
    """Continued pretraining on longer rows than the model's max_position_embeddings: the exported config must not
    claim fewer positions than the model was trained on."""
    from accelerate.state import AcceleratorState

    short = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "max_position_embeddings": 32}
    base = pretrain(_two_steps(tmp_path / "short", small_corpus, model_overrides=short, seq_len=32)).model_dir
    assert json.loads((base / "config.json").read_text())["max_position_embeddings"] == 32
    capsys.readouterr()
    AcceleratorState._reset_state(True)
    result = pretrain(_two_steps(tmp_path / "long", small_corpus, init_from=str(base), model_overrides={}, seq_len=64))
    assert AutoConfig.from_pretrained(result.model_dir).max_position_embeddings == 64
    console = capsys.readouterr().err
    assert f"seq_len=64 is longer than the max_position_embeddings=32 of init_from={base}: raised to 64" in console
