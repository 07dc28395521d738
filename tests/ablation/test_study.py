"""The study file: its validation, the runs it resolves to, the folder it owns, and a whole study end to end."""

import dataclasses
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from apertus_hf.ablation import AblationStudy, StudyFolderError, resolve_runs, run_one, run_study, study_status
from apertus_hf.ablation.report import write_report
from apertus_hf.ablation.study import SAME_FOR_EVERY_RUN, load_study, prepare_study_folder
from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics
from apertus_hf.recipe_args import recipe_config_from_dict
from tests.pretraining.test_distributed import ACCELERATE, CONFIGS, CPU_OVERRIDES

from .conftest import REPO_ROOT, two_variant_study


def make_study(values: dict) -> AblationStudy:
    return recipe_config_from_dict(AblationStudy, values)


def test_every_run_shares_data_budget_and_batch_and_differs_only_by_its_overrides(tmp_path, base_recipe):
    values = two_variant_study(base_recipe, tmp_path / "study", seeds=[1, 2])
    runs = resolve_runs(make_study(values))
    assert list(runs) == ["llama/seed-1", "llama/seed-2", "apertus/seed-1", "apertus/seed-2"]
    shared = {
        option: {json.dumps(getattr(config, option)) for config in runs.values()} for option in SAME_FOR_EVERY_RUN
    }
    varying = {"seed", "output_dir"}
    assert all(len(values) == 1 for option, values in shared.items() if option not in varying), shared
    llama, apertus = runs["llama/seed-1"], runs["apertus/seed-1"]
    assert (llama.max_steps, llama.global_batch_size, llama.seq_len) == (6, 4, 64)
    assert llama.data == [{"path": str(tmp_path / "study" / "data" / "train.jsonl")}]
    assert llama.eval_data == [{"path": str(tmp_path / "study" / "data" / "heldout.jsonl")}]
    assert llama.record_row_ids and llama.eval_documents == 0
    # model_overrides merge key by key: the variant changes the MLP width and keeps the base's other shapes.
    assert llama.model_overrides == {**apertus.model_overrides, "intermediate_size": 64}
    assert (llama.model_type, llama.optimizer, llama.goldfish) == ("llama", "adamw", False)
    assert (apertus.model_type, apertus.optimizer, apertus.goldfish) == ("apertus", "ademamix", True)
    assert runs["apertus/seed-2"].output_dir == str(tmp_path / "study" / "apertus" / "seed-2")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"baseline": "nope"}, "baseline='nope' is not a variant"),
        ({"seeds": []}, "seeds=[] must list at least one seed"),
        ({"seeds": [1, 1]}, "each once"),
        ({"tokens": 1000}, "use e.g. tokens: 768"),
        ({"variants": [{"name": "llama", "overrides": {"seq_len": 128}}]}, "overrides ['seq_len'], which every run"),
        ({"variants": [{"name": "llama", "overrides": {"learning_rat": 1.0}}]}, "not PretrainConfig options"),
        ({"variants": [{"name": "llama"}, {"name": "llama"}]}, "['llama'] appear more than once"),
        ({"variants": [{"name": "a/b"}], "baseline": "a/b"}, "also a folder name"),
        ({"variants": [{"name": "llama", "overrides": {"optimizer": "sgd"}}]}, "Variant 'llama'"),
        ({"variants": [{"name": "llama", "overrides": {"model_type": "llama"}}]}, "chunked_loss"),
        ({"base_overrides": {"batch_ramp": [[2, 2]]}}, "set batch_ramp: [] in base_overrides"),
        ({"base": "missing.yaml"}, "base=missing.yaml is not a file"),
    ],
)
def test_invalid_studies_fail_with_the_fix(tmp_path, base_recipe, change, message):
    values = {**two_variant_study(base_recipe, tmp_path / "study"), **change}
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        resolve_runs(make_study(values))
    assert message in str(error.value)


def test_the_shipped_studies_resolve_to_valid_runs():
    tiny = load_study(REPO_ROOT / "recipes" / "configs" / "ablations" / "apertus_tiny.yaml")
    runs = resolve_runs(tiny)
    assert len(runs) == len(tiny.variants) * len(tiny.seeds) and len(tiny.seeds) >= 2
    names = {variant.name for variant in tiny.variants}
    assert {"llama", "+qk-norm", "+xielu", "+ademamix", "+wsd", "+goldfish", "apertus"} <= names
    apertus = runs[f"apertus/seed-{tiny.seeds[0]}"]
    assert (apertus.model_type, apertus.optimizer, apertus.goldfish, apertus.decay_shape) == (
        "apertus",
        "ademamix",
        True,
        "1-sqrt",
    )
    large = load_study(REPO_ROOT / "recipes" / "configs" / "ablations" / "apertus_1b.yaml")
    large_runs = resolve_runs(large)
    first = next(iter(large_runs.values()))
    assert first.seq_len == 4096 and first.max_steps * first.global_batch_size * first.seq_len == large.tokens


def test_a_folder_of_another_study_or_an_edited_variant_is_refused(tmp_path, base_recipe):
    values = two_variant_study(base_recipe, tmp_path / "study")
    study = make_study(values)
    prepare_study_folder(study)
    heldout = (tmp_path / "study" / "data" / "heldout.jsonl").read_text()
    assert len(heldout.splitlines()) == 4
    with pytest.raises(StudyFolderError, match=r"\['tokens'\] differ"):
        prepare_study_folder(make_study({**values, "tokens": 12 * 4 * 64}))
    # Adding a seed is allowed; the data split stays.
    prepare_study_folder(make_study({**values, "seeds": [1, 2]}))
    assert (tmp_path / "study" / "data" / "heldout.jsonl").read_text() == heldout

    config = resolve_runs(study)["apertus/seed-1"]
    edited = dataclasses.replace(config, learning_rate=1e-3)
    edited.save(config.output_dir)
    with pytest.raises(StudyFolderError, match=r"\['learning_rate'\]"):
        run_one(study, "apertus/seed-1")
    with pytest.raises(KeyError, match="--list"):
        run_one(study, "apertus/seed-9")


@pytest.mark.slow
def test_a_half_finished_study_resumes_its_runs_and_a_finished_one_is_not_run_again(tmp_path, base_recipe):
    study = make_study(two_variant_study(base_recipe, tmp_path / "study"))
    prepare_study_folder(study)
    # The baseline stops after its first checkpoint (step 3 of 6), as a cluster job that ran out of time would.
    interrupted = dataclasses.replace(resolve_runs(study)["llama/seed-1"], stop_at_step=3)
    assert pretrain(interrupted).interrupted
    assert study_status(study) == {"llama/seed-1": "partial", "apertus/seed-1": "pending"}

    launched = []

    def launch(name):
        launched.append(name)
        run_one(study, name)

    statuses = run_study(study, launch)
    assert launched == ["llama/seed-1", "apertus/seed-1"]
    assert statuses == {"llama/seed-1": "done", "apertus/seed-1": "done"}
    resumed = read_metrics(tmp_path / "study" / "llama" / "seed-1" / "metrics.jsonl")
    assert [record["step"] for record in resumed] == [1, 2, 3, 4, 5, 6]

    launched.clear()
    assert run_study(study, launch) == statuses
    assert launched == []

    table = write_report(study).read_text()
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert results["same_rows_across_variants"] is True
    assert "Every variant of a seed read the same rows in the same order" in table
    summaries = {summary["variant"]: summary for summary in results["variants"]}
    assert set(summaries) == {"llama", "apertus"}
    for summary in summaries.values():
        assert 0 < summary["bits_per_byte"]["mean"] < 8 and summary["eval_loss"]["mean"] > 0
    apertus_run = next(run for run in results["runs"] if run["variant"] == "apertus")
    llama_run = next(run for run in results["runs"] if run["variant"] == "llama")
    difference = summaries["apertus"]["eval_loss_difference"]["mean"]
    assert difference == pytest.approx(apertus_run["eval_loss"] - llama_run["eval_loss"])
    assert (tmp_path / "study" / "loss_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_recipe_lists_the_runs_and_their_status(tmp_path, base_recipe):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(two_variant_study(base_recipe, tmp_path / "study", seeds=[1, 2])))
    listed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "ablate.py"), "--config", str(study_file), "--list"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.splitlines() == [
        "llama/seed-1 pending",
        "llama/seed-2 pending",
        "apertus/seed-1 pending",
        "apertus/seed-2 pending",
    ]
    bad = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "ablate.py"), "--config", str(study_file), "--tokens", "1000"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "use e.g. tokens: 768" in bad.stderr


def test_pretrain_config_keeps_the_options_a_study_relies_on():
    """The study sets and compares these PretrainConfig options by name; a rename must fail here first."""
    names = {option.name for option in dataclasses.fields(PretrainConfig)}
    assert set(SAME_FOR_EVERY_RUN) <= names
    assert {"model_type", "model_overrides", "record_row_ids", "eval_data", "eval_documents"} <= names


@pytest.mark.slow
def test_the_recipe_launches_each_run_on_two_processes_as_one_process_trains_it(tmp_path, base_recipe, monkeypatch):
    """`recipes/ablate.py` with a two-process DDP launcher: the processes of the launch share one study folder (one
    writes it), read the rows a single process reads with its losses, and the report follows."""
    # 4 rows a step: 2 micro-batches of 2 rows in one process, one of 2 rows on each of two.
    values = two_variant_study(
        base_recipe, tmp_path / "launched", base_overrides={"per_device_batch_size": 2, "global_batch_size": 4}
    )
    values["variants"] = [values["variants"][1]]
    values["baseline"] = "apertus"
    in_process = make_study({**values, "output_dir": str(tmp_path / "in_process")})
    assert run_one(in_process, "apertus/seed-1") == "done"
    expected = read_metrics(tmp_path / "in_process" / "apertus" / "seed-1" / "metrics.jsonl")

    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(values))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    launcher = [*ACCELERATE, "--config_file", str(CONFIGS / "ddp.yaml"), *CPU_OVERRIDES]
    # One thread per process, as the distributed pretraining tests: the losses are compared across processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launched = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "recipes" / "ablate.py"),
            "--config",
            str(study_file),
            "--launcher",
            shlex.join(launcher),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    run_dir = tmp_path / "launched" / "apertus" / "seed-1"
    assert "on 2 process(es), distributed type MULTI_CPU" in (run_dir / "train.log").read_text()
    records = {record["step"]: record for record in read_metrics(run_dir / "metrics.jsonl")}
    for record in expected:
        step = record["step"]
        assert records[step]["data/row_ids"] == record["data/row_ids"], step
        assert records[step]["train/loss"] == pytest.approx(record["train/loss"], rel=1e-5), step
    assert (tmp_path / "launched" / "data" / "heldout.jsonl").read_text() == (
        tmp_path / "in_process" / "data" / "heldout.jsonl"
    ).read_text()
    assert (run_dir / "bits_per_byte.json").is_file()
    assert "| **apertus** (baseline) |" in launched.stdout and (tmp_path / "launched" / "results.md").is_file()
