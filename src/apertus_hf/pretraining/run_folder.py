"""The run folder (`output_dir`), which users trust with days of compute: what a launch does with what it finds there.

A run is marked by `metrics.jsonl`, `checkpoints/step_<N>` folders or an exported `model/`. A launch either starts in a
folder without one, resumes the one there, or stops with an error that names the folder and the fix; two runs never
mix their records, checkpoints or model. Nothing is deleted: a run replaced with `overwrite_output_dir` is renamed to
a sibling folder, and the metrics of a run that stopped before its first checkpoint are moved aside.

`plan_run_folder` only reads, so every process can call it and raise the same error; the main process then `apply`s
the plan before anything of the new run is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .checkpointing import check_resumable, checkpoint_folders
from .config import PretrainConfig

METRICS_FILE_NAME = "metrics.jsonl"
CHECKPOINTS_DIR_NAME = "checkpoints"
MODEL_DIR_NAME = "model"


class RunFolderError(FileExistsError):
    """output_dir holds a run that this launch would mix with or replace; the message names the fix."""


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it exists (two archives within the same second)."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def archive_path(output_dir: Path) -> Path:
    """Where `overwrite_output_dir` moves the run found in `output_dir`: the sibling `<name>.replaced-<UTC time>`."""
    output_dir = output_dir.absolute()
    return _unused(output_dir.with_name(f"{output_dir.name}.replaced-{_utc_stamp()}"))


def run_markers(output_dir: Path) -> list[str]:
    """What in `output_dir` shows that a run trained there (empty when none did)."""
    markers = []
    if (output_dir / METRICS_FILE_NAME).is_file():
        markers.append(METRICS_FILE_NAME)
    checkpoints = checkpoint_folders(output_dir / CHECKPOINTS_DIR_NAME)
    if checkpoints:
        markers.append(f"{CHECKPOINTS_DIR_NAME}/ ({', '.join(folder.name for folder in checkpoints)})")
    if (output_dir / MODEL_DIR_NAME).exists():
        markers.append(f"{MODEL_DIR_NAME}/")
    return markers


@dataclass(frozen=True)
class RunFolderPlan:
    """What this launch does with its output_dir."""

    output_dir: Path
    resume: bool = False
    """Resume from the checkpoints there."""
    archive_to: Path | None = None
    """Rename the folder, which holds another run, to this sibling first (overwrite_output_dir)."""
    stale_metrics_to: Path | None = None
    """Move the metrics of a run that saved no checkpoint here first, so that the new run's records stand alone."""

    def apply(self) -> None:
        """Make the moves of the plan (on the main process only, before the run writes anything)."""
        if self.archive_to is not None:
            os.replace(self.output_dir, self.archive_to)
        if self.stale_metrics_to is not None:
            os.replace(self.output_dir / METRICS_FILE_NAME, self.stale_metrics_to)
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def notes(self) -> list[str]:
        """The warnings the console shows about the moves."""
        notes = []
        if self.archive_to is not None:
            notes.append(
                f"overwrite_output_dir: the run that was in {self.output_dir} is archived as {self.archive_to} "
                "(nothing deleted); this run starts afresh."
            )
        if self.stale_metrics_to is not None:
            notes.append(
                f"{self.output_dir / METRICS_FILE_NAME} is from a run that stopped before its first checkpoint, so "
                f"there is nothing to resume: starting afresh, with its records moved to {self.stale_metrics_to}."
            )
        return notes


def plan_run_folder(config: PretrainConfig) -> RunFolderPlan:
    """Decide what this launch does with `config.output_dir`, or raise RunFolderError (or UnusableCheckpointsError)
    when it would mix two runs or replace one that can still be resumed or used."""
    output_dir = Path(config.output_dir)
    markers = run_markers(output_dir)
    if not markers:
        return RunFolderPlan(output_dir)
    if config.overwrite_output_dir:
        return RunFolderPlan(output_dir, archive_to=archive_path(output_dir))
    overwrite = (
        f"or pass --overwrite_output_dir true to archive it as {output_dir.name}.replaced-<UTC time> (a sibling "
        "folder; nothing is deleted) and start afresh"
    )
    if not config.resume:
        raise RunFolderError(
            f"output_dir {output_dir} already holds a run ({', '.join(markers)}), and resume=false would start "
            "another one in it, mixing their metrics, checkpoints and exported model. Resume it (leave resume at "
            f"true), choose another output_dir, {overwrite}."
        )
    checkpoints = output_dir / CHECKPOINTS_DIR_NAME
    if checkpoint_folders(checkpoints):
        check_resumable(checkpoints)
        return RunFolderPlan(output_dir, resume=True)
    if (output_dir / MODEL_DIR_NAME).exists():
        raise RunFolderError(
            f"output_dir {output_dir} holds an exported model ({MODEL_DIR_NAME}/) but no checkpoint to resume from, "
            "so this launch would train a new model and replace it. Choose another output_dir (to train on from "
            f"that model, set init_from={output_dir / MODEL_DIR_NAME}), {overwrite}."
        )
    return RunFolderPlan(output_dir, stale_metrics_to=_unused(output_dir / f"metrics.stale-{_utc_stamp()}.jsonl"))
