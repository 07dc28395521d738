"""lm-evaluation-harness on the shipped task agrees item by item with our multiple-choice scoring, and its results
become EvalResults."""

from pathlib import Path

import pytest

from apertus_hf.evaluation.lm_eval_harness import results_to_eval_results, run_lm_eval
from apertus_hf.evaluation.multiple_choice import evaluate_multiple_choice, read_task

lm_eval = pytest.importorskip("lm_eval")

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO_ROOT / "eval" / "tasks"
TASK = "apertus_toy_mc"
TASK_FILE = TASKS_DIR / TASK / f"{TASK}.jsonl"
METRICS = ("acc", "acc_norm", "acc_bytes")


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    return evaluate_multiple_choice(tiny_model_dir, TASK_FILE, device="cpu", progress=False)


def test_lm_eval_on_the_shipped_task_makes_our_decisions(tiny_model_dir, ours):
    from lm_eval.tasks import TaskManager

    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model_dir)},
        tasks=[TASK],
        device="cpu",
        batch_size=8,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True,
    )
    samples = sorted(output["samples"][TASK], key=lambda sample: sample["doc_id"])
    items = read_task(TASK_FILE)
    assert [sample["doc"]["context"] for sample in samples] == [item.context for item in items]
    for name in METRICS:
        # Same decision on every item, hence the same accuracy.
        predictions = ours.details["predictions"][name]
        assert [sample[name] for sample in samples] == [
            float(prediction == item.gold) for prediction, item in zip(predictions, items, strict=True)
        ]
        assert output["results"][TASK][f"{name},none"] == ours.metrics[name]
        assert output["results"][TASK][f"{name}_stderr,none"] == pytest.approx(ours.details["stderr"][name])
    # The random model is not at 0 or 1, so the comparison has teeth, and the normalisations disagree somewhere.
    assert 0.0 < ours.metrics["acc"] < 1.0
    assert ours.details["predictions"]["acc"] != ours.details["predictions"]["acc_norm"]


def test_run_lm_eval_writes_one_result_per_task(tiny_model_dir, ours, tmp_path):
    (result,) = run_lm_eval(
        tiny_model_dir, [TASK], include_path=TASKS_DIR, include_defaults=False, device="cpu", batch_size=4
    )
    assert result.evaluation == "lm_eval"
    assert result.task_name == TASK
    assert result.metrics == ours.metrics
    assert set(result.details["stderr"]) == set(METRICS)
    assert result.details["num_items"] == 48
    assert result.settings["num_fewshot"] == 0
    assert result.settings["include_defaults"] is False
    assert result.write(tmp_path / "result.json").is_file()


def test_unknown_task_and_missing_task_folder_are_named(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no_such_task"):
        run_lm_eval(tiny_model_dir, ["no_such_task"], include_path=TASKS_DIR, include_defaults=False)
    with pytest.raises(FileNotFoundError, match="missing_tasks"):
        run_lm_eval(tiny_model_dir, [TASK], include_path=tmp_path / "missing_tasks")


def test_filters_and_missing_stderr_become_metric_names():
    output = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": "N/A",
            }
        },
        "configs": {"gsm8k": {"dataset_path": "openai/gsm8k"}},
        "n-shot": {"gsm8k": 5},
        "n-samples": {"gsm8k": {"original": 1319, "effective": 10}},
        "versions": {"gsm8k": 3.0},
    }
    (result,) = results_to_eval_results(output, "model", {})
    assert result.metrics == {"exact_match_strict-match": 0.25, "exact_match_flexible-extract": 0.5}
    assert result.details["stderr"] == {"exact_match_strict-match": 0.01, "exact_match_flexible-extract": None}
    assert result.dataset_type == "openai/gsm8k"
    assert result.settings["num_fewshot"] == 5
    assert result.details["num_items"] == 10
