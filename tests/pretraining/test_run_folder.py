"""The run folder: a launch never mixes two runs, never starts a resumable run over, and never deletes weights."""

import json
import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from apertus_hf.pretraining import (
    PretrainConfig,
    RunFolderError,
    UnusableCheckpointsError,
    complete_checkpoints,
    pretrain,
    read_metrics,
)
from tests.pretraining.conftest import tiny_run


def _options(tmp_path: Path, corpus: Path, **overrides) -> dict:
    defaults = {"max_steps": 4, "warmup_steps": 1, "eval_documents": 0, "checkpoint_steps": 2}
    return tiny_run(tmp_path / "run", corpus, **{**defaults, **overrides})


def _train(options: dict, **overrides):
    AcceleratorState._reset_state(True)
    result = pretrain(PretrainConfig(**{**options, **overrides}))
    AcceleratorState._reset_state(True)
    return result


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _fail_on_tokenization(monkeypatch):
    """Make tokenisation fail the test: a check that must come before it would otherwise pass unnoticed."""

    def tokenize_and_pack(*args, **kwargs):
        raise AssertionError("tokenisation started before the check")

    monkeypatch.setattr("apertus_hf.pretraining.build.tokenize_and_pack", tokenize_and_pack)


def test_resume_false_in_a_folder_with_a_run_is_refused_and_changes_nothing(tmp_path, small_corpus, monkeypatch):
    options = _options(tmp_path, small_corpus)
    _train(options)
    before = _snapshot(tmp_path / "run")
    _fail_on_tokenization(monkeypatch)
    with pytest.raises(RunFolderError) as error:
        _train(options, resume=False)
    message = str(error.value)
    assert f"output_dir {tmp_path / 'run'} already holds a run (metrics.jsonl, checkpoints/" in message
    assert "model/" in message and "--overwrite_output_dir true" in message and "choose another output_dir" in message
    assert _snapshot(tmp_path / "run") == before


def test_overwrite_output_dir_archives_the_old_run_and_starts_afresh(tmp_path, small_corpus, capsys):
    options = _options(tmp_path, small_corpus)
    _train(options, seed=1)
    old_run = _snapshot(tmp_path / "run")
    capsys.readouterr()
    result = _train(options, resume=False, overwrite_output_dir=True, max_steps=3, warmup_steps=1)
    (archive,) = tmp_path.glob("run.replaced-*")
    assert _snapshot(archive) == old_run  # every file of the old run, its weights included, kept as it was
    assert f"archived as {archive}" in capsys.readouterr().err
    assert [record["step"] for record in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert [folder.name for folder in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]
    assert result.model_dir == tmp_path / "run" / "model"
    assert "archived as" in (tmp_path / "run" / "train.log").read_text()


def test_a_fresh_start_moves_the_metrics_of_a_run_without_checkpoint_aside(tmp_path, small_corpus, capsys):
    """A run killed before its first checkpoint leaves metrics.jsonl; the next launch starts at step 1 and must not
    append to them (which gave steps 1 2 3 1 2 3 4)."""
    options = _options(tmp_path, small_corpus)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    killed = [{"step": step, "train/loss": 9.0} for step in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(record) + "\n" for record in killed))
    _train(options)
    assert [record["step"] for record in read_metrics(metrics)] == [1, 2, 3, 4]
    (stale,) = metrics.parent.glob("metrics.stale-*.jsonl")
    assert read_metrics(stale) == killed
    console = capsys.readouterr().err
    assert "stopped before its first checkpoint" in console and str(stale) in console


def test_a_finished_run_without_checkpoints_is_not_trained_over(tmp_path, small_corpus, monkeypatch):
    options = _options(tmp_path, small_corpus, checkpoint_steps=0)
    _train(options)
    before = _snapshot(tmp_path / "run")
    _fail_on_tokenization(monkeypatch)
    with pytest.raises(RunFolderError, match="holds an exported model \\(model/\\) but no checkpoint to resume from"):
        _train(options)
    assert _snapshot(tmp_path / "run") == before


def test_incomplete_checkpoints_only_stop_the_run_before_tokenisation(tmp_path, small_corpus, monkeypatch):
    options = _options(tmp_path, small_corpus)
    _train(options, stop_at_step=2)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    (checkpoint / "checkpoint_manifest.json").unlink()
    _fail_on_tokenization(monkeypatch)
    with pytest.raises(UnusableCheckpointsError) as error:
        _train(options)
    assert "step_00000002: no manifest (the save did not finish)" in str(error.value)
    assert "--overwrite_output_dir true" in str(error.value)


def test_when_every_checkpoint_is_corrupt_the_run_stops_and_keeps_the_exported_model(tmp_path, small_corpus):
    """Checkpoints whose files fail to load (bit rot; the sizes match the manifest) are all skipped: the run must
    stop with an error instead of training from step 0 and replacing the good exported weights."""
    options = _options(tmp_path, small_corpus)
    _train(options)
    checkpoints = tmp_path / "run" / "checkpoints"
    for folder in complete_checkpoints(checkpoints):
        optimizer_state = folder / "optimizer.bin"
        optimizer_state.write_bytes(b"\0" * optimizer_state.stat().st_size)
    before = _snapshot(tmp_path / "run")
    with pytest.raises(UnusableCheckpointsError) as error:
        _train(options, max_steps=6)
    message = str(error.value)
    assert f"No checkpoint in {checkpoints} can be resumed from" in message
    assert "step_00000004: could not be loaded" in message and "step_00000002: could not be loaded" in message
    # The weights, checkpoints and metrics are as they were (the launch only appended to train.log).
    kept = [name for name in before if name.startswith(("model/", "checkpoints/")) or name == "metrics.jsonl"]
    assert "model/model.safetensors" in kept
    after = _snapshot(tmp_path / "run")
    assert {name: after.get(name) for name in kept} == {name: before[name] for name in kept}


def test_pruning_keeps_the_checkpoints_of_later_steps(tmp_path, small_corpus):
    """A resume that skipped an unloadable newer checkpoint must not prune it (a user may repair it), nor have its
    own new checkpoints pruned in its place."""
    options = _options(tmp_path, small_corpus, max_steps=8, keep_checkpoints=1)
    _train(options, stop_at_step=2)
    checkpoints = tmp_path / "run" / "checkpoints"
    newer = checkpoints / "step_00000006"
    shutil.copytree(checkpoints / "step_00000002", newer)
    (newer / "checkpoint_manifest.json").write_text(
        (newer / "checkpoint_manifest.json").read_text().replace('"step": 2', '"step": 6')
    )
    optimizer_state = newer / "optimizer.bin"
    optimizer_state.write_bytes(b"\0" * optimizer_state.stat().st_size)
    _train(options, stop_at_step=4)
    assert sorted(folder.name for folder in checkpoints.iterdir()) == ["step_00000004", "step_00000006"]
