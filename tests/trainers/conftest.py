"""Fixtures and helpers of the post-training tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads cost more in synchronisation than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_CONFIG = ("--config_file", "accelerate_configs/cpu.yaml")


def launch_recipe(
    script: str, arguments: list[str], launcher: tuple[str, ...] = CPU_CONFIG, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch [launcher] recipes/<script> [arguments]` from the repository root, offline; asserts that it
    exits 0 (showing the end of its output otherwise) and returns the finished process."""
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *launcher, f"recipes/{script}", *arguments],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed
