"""Atomic, resumable checkpoints on top of `accelerator.save_state` / `load_state`.

`save_state` writes into a folder in place, so a job killed mid-save leaves a folder that looks like a checkpoint
but is not one. We therefore save into a hidden temporary folder, write a manifest (every file with its size) last,
and only then rename the folder to `step_<N>`: a folder with that name and a valid manifest is complete. On resume the
newest complete checkpoint that loads is used; incomplete or corrupt ones are reported and skipped, and when none is
usable the resume stops (`UnusableCheckpointsError`) instead of silently starting the run again from step 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator, DistributedType

from .logs import CONSOLE
from .resharding import checkpoint_world_size, load_resharded_state

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")


@dataclass
class TrainingProgress:
    """Where the run is: saved with every checkpoint (through `register_for_checkpointing`), so a resume continues
    the same data stream at the same place."""

    step: int = 0
    stage: int = 0
    """Data stage being read (0 without stages)."""
    samples_in_stage: int = 0
    """Rows of the stage's global row stream consumed so far, over all processes (Megatron's consumed-samples
    counter): the data position, independent of the number of processes (data/global_rows.py)."""
    tokens_seen: int = 0
    # Intra-op threads of the process that saved (0 in checkpoints from before it was recorded): on CPU a matmul's
    # rounding depends on how many threads split it, so a resume reproduces the run bit for bit only with as many.
    cpu_threads: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "micro_batches_in_epoch" in state:
            raise ValueError(
                "this checkpoint records its data position per process (epoch and micro-batch, apertus_hf before "
                "global row positions), which this version cannot map onto its global row order. Finish the run with "
                "the apertus_hf version that started it, or start a new run with init_from=<its exported model>."
            )
        for key, value in state.items():
            setattr(self, key, value)


class UnusableCheckpointsError(RuntimeError):
    """Checkpoints exist but none can be resumed from; the message names each one, its problem and the fixes."""

    def __init__(self, checkpoints_dir: Path, problems: dict[Path, str]):
        listed = "\n".join(f"  {folder.name}: {problem}" for folder, problem in problems.items())
        super().__init__(
            f"No checkpoint in {checkpoints_dir} can be resumed from:\n{listed}\n"
            "Starting again from step 0 would replace this run's metrics and, at the end, its exported model. Repair "
            "or restore one of them (e.g. from a backup), or start a new run: choose another output_dir, or pass "
            "--overwrite_output_dir true to archive this run folder (renamed, not deleted) and start afresh."
        )


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return f"unreadable manifest ({error})"
    for relative_path, size in files.items():
        path = folder / relative_path
        if not path.is_file():
            return f"{relative_path} is missing"
        if path.stat().st_size != size:
            return f"{relative_path} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def checkpoint_folders(checkpoints_dir: str | Path) -> list[Path]:
    """All `step_<N>` folders in `checkpoints_dir`, newest (highest step) first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    named = [
        (int(match.group(1)), path)
        for path in checkpoints_dir.iterdir()
        if (match := _CHECKPOINT_NAME.match(path.name))
    ]
    return [path for _, path in sorted(named, reverse=True)]


def complete_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `checkpoints_dir`, newest first; incomplete ones are logged and left out."""
    complete = []
    for folder in checkpoint_folders(checkpoints_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            complete.append(folder)
        else:
            logger.warning("Skipping checkpoint %s: %s.", folder, problem)
    return complete


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: str | Path, step: int, keep: int) -> Path:
    """Save the full training state as `checkpoints_dir/step_<step>`, atomically; keep the newest `keep`.

    Every process must call this (the state of each process is saved). Returns the checkpoint folder.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step_{step:08d}"
    temporary = checkpoints_dir / f".step_{step:08d}.incomplete"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {
            str(path.relative_to(temporary)): path.stat().st_size
            for path in sorted(temporary.rglob("*"))
            if path.is_file()
        }
        manifest_path = temporary / MANIFEST_NAME
        with manifest_path.open("w") as handle:
            json.dump({"step": step, "files": files}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)  # a checkpoint of this very step that did not load (resumes skip those)
        os.replace(temporary, final)
        _prune(checkpoints_dir, keep, step)
    accelerator.wait_for_everyone()
    return final


def checkpoint_step(folder: Path) -> int:
    """The optimizer step of a `step_<N>` checkpoint folder."""
    return int(_CHECKPOINT_NAME.match(folder.name).group(1))


def _prune(checkpoints_dir: Path, keep: int, step: int) -> None:
    """Delete the complete checkpoints older than the newest `keep` up to `step`, the one just saved.

    Checkpoints of later steps are never deleted nor counted: they are ones a resume skipped as unloadable, which a
    user may still repair (and this run replaces each when it saves that step itself).
    """
    for folder in [folder for folder in complete_checkpoints(checkpoints_dir) if checkpoint_step(folder) <= step][
        keep:
    ]:
        shutil.rmtree(folder)
    for leftover in checkpoints_dir.glob(".step_*.incomplete"):
        shutil.rmtree(leftover)


def check_resumable(checkpoints_dir: str | Path) -> None:
    """Raise UnusableCheckpointsError when `checkpoints_dir` holds checkpoint folders but none is complete.

    Reads only the manifests, so a run can check this before it spends time on tokenisation.
    """
    checkpoints_dir = Path(checkpoints_dir)
    problems = {folder: checkpoint_problem(folder) for folder in checkpoint_folders(checkpoints_dir)}
    if problems and all(problems.values()):
        raise UnusableCheckpointsError(checkpoints_dir, problems)


def load_latest_checkpoint(accelerator: Accelerator, checkpoints_dir: str | Path) -> Path | None:
    """Load the newest complete checkpoint that loads; returns its folder, or None when there is no checkpoint.

    A checkpoint whose files fail to load (corrupted on disk although the sizes match) is reported and the previous
    one is tried: `load_state` restores every piece of state, so a partial load is fully overwritten by the next.
    Raises UnusableCheckpointsError when checkpoint folders exist but none loads.
    """
    checkpoints_dir = Path(checkpoints_dir)
    problems = {folder: checkpoint_problem(folder) for folder in checkpoint_folders(checkpoints_dir)}
    for folder in complete_checkpoints(checkpoints_dir):
        try:
            if accelerator.distributed_type == DistributedType.DEEPSPEED and (
                (saved_by := checkpoint_world_size(folder)) != accelerator.num_processes
            ):
                # DeepSpeed's ZeRO-3 shards load only on as many processes as saved them; reshard them here.
                load_resharded_state(accelerator, folder)
                logger.warning(
                    "Checkpoint %s was saved by %d processes and is resharded onto %d: model and optimizer state are "
                    "those saved; losses continue within rounding of the original run, not bit for bit.",
                    folder,
                    saved_by,
                    accelerator.num_processes,
                    extra=CONSOLE,
                )
            else:
                accelerator.load_state(str(folder))
        except Exception as error:  # any library's load error means the same: this checkpoint is unusable
            logger.warning(
                "Checkpoint %s could not be loaded (%s: %s); trying the previous one.",
                folder,
                type(error).__name__,
                error,
            )
            problems[folder] = f"could not be loaded ({type(error).__name__}: {error})"
            continue
        return folder
    if problems:
        raise UnusableCheckpointsError(checkpoints_dir, problems)
    return None
