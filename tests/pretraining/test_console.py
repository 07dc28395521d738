"""What a run tells the person at the console: warnings and the key events, not only train.log; the per-step lines
stay in train.log (and the progress bar)."""

import shutil

import torch
from accelerate.state import AcceleratorState

from apertus_hf.pretraining import PretrainConfig, pretrain
from tests.pretraining.conftest import tiny_run


def test_warnings_and_key_events_reach_the_console(tmp_path, small_corpus, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(small_corpus.read_text() + "{not json\n")
    options = tiny_run(
        tmp_path / "run",
        corpus,
        max_steps=4,
        warmup_steps=1,
        eval_documents=0,
        checkpoint_steps=2,
        logging_steps=1,
        on_bad_record="skip",
    )
    threads = torch.get_num_threads()
    try:
        pretrain(PretrainConfig(**options, stop_at_step=2, cpu_threads=1))
        first = capsys.readouterr().err
        checkpoints = tmp_path / "run" / "checkpoints"
        shutil.copytree(checkpoints / "step_00000002", checkpoints / "step_00000003")
        (checkpoints / "step_00000003" / "checkpoint_manifest.json").unlink()
        AcceleratorState._reset_state(True)
        pretrain(PretrainConfig(**options, cpu_threads=2))
        second = capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)

    assert "1 CPU thread(s) per process: set by cpu_threads" in first
    assert "Skipped 1 records" in first
    assert "Stopped at step 2 of 4" in first
    assert "Skipping checkpoint" in second and "step_00000003: no manifest" in second
    assert f"Resumed from {checkpoints / 'step_00000002'} at step 2" in second
    assert "saved by a process with 1 CPU thread(s) and this one has 2" in second
    assert f"Exported the model to {tmp_path / 'run' / 'model'}" in second
    # Per-step lines go to train.log only.
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 1: {'loss'" in log and "step 4: {'loss'" in log and "Saved checkpoint" in log
    assert "step 1: {'loss'" not in first + second and "Saved checkpoint" not in first + second
