"""Ablation studies: one base pretraining recipe, variants as overrides of it, trained on the same tokens in the same
order over several seeds, and the table and plots that compare them (study.py, report.py, plots.py)."""

from .report import write_report
from .study import (
    AblationStudy,
    StudyFolderError,
    Variant,
    load_study,
    resolve_runs,
    run_one,
    run_study,
    study_status,
)

__all__ = [
    "AblationStudy",
    "StudyFolderError",
    "Variant",
    "load_study",
    "resolve_runs",
    "run_one",
    "run_study",
    "study_status",
    "write_report",
]
