"""Where a run's log lines go: the console and output_dir/train.log.

As transformers' Trainer does, the console gets every process's warnings, and the main process's key INFO lines (a
resume, the thread count, the export: those logged with `extra=CONSOLE`); train.log gets every INFO line of the main
process, the per-step lines included, which the console shows in the progress bar instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

PACKAGE_LOGGER = "apertus_hf"
CONSOLE = {"console": True}
"""`extra=` of an INFO line that also goes to the console."""


class _ConsoleHandler(logging.Handler):
    """Writes through `tqdm.write`, which moves the progress bar below the line instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _for_the_console(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or getattr(record, "console", False)


class RunLogs:
    """The handlers of one run on the package logger, removed again by `close` (several runs may share a process)."""

    def __init__(self, is_main_process: bool, process_index: int, num_processes: int):
        self.logger = logging.getLogger(PACKAGE_LOGGER)
        self._previous_level = self.logger.level
        self.logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
        rank = f"[rank {process_index}] " if num_processes > 1 else ""
        console = _ConsoleHandler()
        console.setFormatter(logging.Formatter(f"{rank}%(levelname)s: %(message)s"))
        console.addFilter(_for_the_console)
        self.handlers: list[logging.Handler] = [console]
        self.logger.addHandler(console)

    def write_to(self, path: Path) -> None:
        """Also write every line to `path` (appended: a resumed run continues its log)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handlers.append(file_handler)
        self.logger.addHandler(file_handler)

    def close(self) -> None:
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self.handlers = []
        self.logger.setLevel(self._previous_level)
