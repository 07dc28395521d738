"""Run an ablation study: `python recipes/ablate.py --config recipes/configs/ablations/<study>.yaml [--key value ...]`.

A study (apertus_hf.ablation.AblationStudy; `--help` lists its options) names a base pretraining recipe, a budget in
tokens, seeds, and variants as overrides of the recipe. With no other flag every run that is not finished is trained,
each in a fresh process started by `--launcher` (default `accelerate launch`; a half-finished run resumes, a finished
one is skipped), then the table, JSON and plot are written to the study's output_dir (results.md, results.json,
loss_vs_tokens.png).

On a cluster, one job per run: `--list` prints every run name with its status (done, trained, partial, pending), and
`accelerate launch [--config_file ...] recipes/ablate.py --config STUDY --run NAME` trains one run on the processes
of that launch; `--report` then writes the results of whatever has finished.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from apertus_hf.ablation import (
    AblationStudy,
    StudyFolderError,
    run_one,
    run_study,
    study_status,
    write_report,
)
from apertus_hf.recipe_args import parse_recipe_args

FLAGS = {"--list": False, "--report": False}
VALUED_FLAGS = ("--run", "--launcher")


def split_flags(arguments: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """This script's own flags, and the rest: the study's `--config` and `--key value` options."""
    flags: dict[str, str | bool] = dict(FLAGS)
    rest = []
    position = 0
    while position < len(arguments):
        argument = arguments[position]
        if argument in FLAGS:
            flags[argument] = True
        elif argument in VALUED_FLAGS:
            if position + 1 == len(arguments):
                raise SystemExit(f"{argument} needs a value.")
            flags[argument] = arguments[position + 1]
            position += 1
        else:
            rest.append(argument)
        position += 1
    return flags, rest


def main() -> None:
    try:
        run(*split_flags(sys.argv[1:]))
    except (ValueError, KeyError, FileNotFoundError, StudyFolderError) as error:
        raise SystemExit(f"error: {error.args[0] if error.args else error}") from error


def run(flags: dict[str, str | bool], study_arguments: list[str]) -> None:
    study = parse_recipe_args(AblationStudy, study_arguments, description=__doc__)
    if flags["--list"]:
        for name, status in study_status(study).items():
            print(f"{name} {status}")
        return
    if "--run" in flags:
        status = run_one(study, str(flags["--run"]))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{flags['--run']}: {status}")
        return
    if not flags["--report"]:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit(
                "Under a multi-process `accelerate launch`, train one run with --run NAME (see --list); run the whole "
                "study with `python recipes/ablate.py`, which starts one launch per run."
            )
        launcher = shlex.split(str(flags.get("--launcher", "accelerate launch")))

        def launch(name: str) -> None:
            command = [*launcher, str(Path(__file__).resolve()), *study_arguments, "--run", name]
            print(f"== {name}: {shlex.join(command)}", flush=True)
            if subprocess.run(command).returncode != 0:
                raise SystemExit(
                    f"Run {name} failed (its output is above). Fix the cause and run the same command again: finished "
                    "runs are kept and a run with a checkpoint resumes."
                )

        statuses = run_study(study, launch)
        unfinished = [name for name, status in statuses.items() if status != "done"]
        if unfinished:
            print(f"Not finished: {', '.join(unfinished)}; run the same command again to resume.")
    table = write_report(study)
    print(table.read_text())
    print(f"Results in {table.parent}: {table.name}, results.json, loss_vs_tokens.png.")


if __name__ == "__main__":
    main()
