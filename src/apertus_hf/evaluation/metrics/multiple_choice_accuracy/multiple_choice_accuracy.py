"""Multiple-choice accuracy from per-choice log-likelihoods, as lm-evaluation-harness (0.4.x) defines `acc`,
`acc_norm` and `acc_bytes` for its `output_type: multiple_choice` tasks: an `evaluate` module."""

import math

import datasets
import evaluate

NORMALISATIONS = ("acc", "acc_norm", "acc_bytes")

_DESCRIPTION = """
Each item is the log-likelihood of every choice (the summed log-probability of the choice's tokens after the
context), the choices' texts and the index of the right one. Each normalisation picks the choice with the highest
score, the first of equal ones (numpy.argmax, as lm-eval):
* acc: the log-likelihood itself;
* acc_norm: the log-likelihood per character of the choice (lm-eval divides by len(choice), which counts characters);
* acc_bytes: the log-likelihood per UTF-8 byte of the choice.
Each accuracy is the mean of the per-item hits, and its standard error lm-eval's `mean_stderr`: the sample standard
deviation over sqrt(n) (None for a single item).
"""

_KWARGS_DESCRIPTION = """
Args:
    loglikelihoods (`list` of `list` of `float`): per item, the log-likelihood of each choice.
    choices (`list` of `list` of `str`): per item, the choices' texts (as scored, without the target delimiter).
    gold (`list` of `int`): per item, the index of the right choice.
Returns:
    acc, acc_norm, acc_bytes (`float`): the accuracies;
    acc_stderr, acc_norm_stderr, acc_bytes_stderr (`float` or None): their standard errors;
    predictions (`dict` of `list` of `int`): per normalisation, the index of the choice picked for each item.
Example:
    >>> metric = evaluate.load("path/to/multiple_choice_accuracy")
    >>> metric.compute(loglikelihoods=[[-3.0, -4.0]], choices=[["üüüü", "abcdef"]], gold=[1])["acc_norm"]
    1.0
"""

_REFERENCE_URL = "https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/task_guide.md"


def _argmax(values):
    # The first of equal maxima, as numpy.argmax picks in lm-eval.
    return max(range(len(values)), key=values.__getitem__)


def _mean_and_stderr(values):
    # lm-eval's `mean_stderr`: sample standard deviation over sqrt(n).
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def choice_predictions(loglikelihoods, choices):
    """The choice each normalisation picks among one item's choices."""
    return {
        "acc": _argmax(loglikelihoods),
        "acc_norm": _argmax([score / len(choice) for score, choice in zip(loglikelihoods, choices, strict=True)]),
        "acc_bytes": _argmax(
            [score / len(choice.encode("utf-8")) for score, choice in zip(loglikelihoods, choices, strict=True)]
        ),
    }


class MultipleChoiceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            reference_urls=[_REFERENCE_URL],
            features=datasets.Features(
                {
                    "loglikelihoods": datasets.Sequence(datasets.Value("float64")),
                    "choices": datasets.Sequence(datasets.Value("string")),
                    "gold": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, loglikelihoods, choices, gold):
        if not gold:
            raise ValueError("No item to score; pass at least one item.")
        predictions = {name: [] for name in NORMALISATIONS}
        for index, (item_scores, item_choices, answer) in enumerate(zip(loglikelihoods, choices, gold, strict=True)):
            if len(item_scores) != len(item_choices) or not 0 <= answer < len(item_choices) or not all(item_choices):
                raise ValueError(
                    f"Item {index}: {len(item_scores)} log-likelihoods, choices {item_choices!r} and gold={answer}; "
                    "pass one log-likelihood per non-empty choice and a gold index into the choices."
                )
            for name, prediction in choice_predictions(item_scores, item_choices).items():
                predictions[name].append(prediction)
        result = {}
        for name in NORMALISATIONS:
            hits = [float(prediction == answer) for prediction, answer in zip(predictions[name], gold, strict=True)]
            result[name], result[f"{name}_stderr"] = _mean_and_stderr(hits)
        return {**result, "predictions": predictions}
