"""Verbatim extraction of memorized text: how much of each expected continuation a model's greedy continuation
reproduces, as the Goldfish memorization audit measures it (Hans et al. 2024): an `evaluate` module."""

import datasets
import evaluate

_DESCRIPTION = """
Per passage, the model's continuation (prediction) is compared token by token with the passage's true continuation
(reference), both of the same length:
* exact match: every token equal;
* matching-prefix length: the number of tokens before the first mismatch.
exact_match is the rate of exact matches and prefix_match the mean matching-prefix length, in tokens. A prediction
that stopped early is padded with a value that is no token id (e.g. -1), which counts as a mismatch.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per passage, the generated token ids.
    references (`list` of `list` of `int`): per passage, the expected token ids (as many as generated).
Returns:
    exact_match (`float`), prefix_match (`float`), and per passage exact_match_per_passage (`list` of `bool`) and
    prefix_match_per_passage (`list` of `int`).
Example:
    >>> metric = evaluate.load("path/to/memorization_exact_match")
    >>> metric.compute(predictions=[[1, 2, 9]], references=[[1, 2, 3]])["prefix_match"]
    2.0
"""

_CITATION = """
@article{hans2024goldfish,
  title={Be like a Goldfish, Don't Memorize! Mitigating Memorization in Generative LLMs},
  author={Hans, Abhimanyu and Wen, Yuxin and Jain, Neel and Kirchenbauer, John and Kazemi, Hamid and Singhania,
    Prajwal and Singh, Siddharth and Somepalli, Gowthami and Geiping, Jonas and Bhatele, Abhinav and Goldstein, Tom},
  journal={arXiv preprint arXiv:2406.10209},
  year={2024}
}
"""


def matching_prefix_length(generated, expected):
    """The number of leading positions where `generated` equals `expected`."""
    length = 0
    for generated_token, expected_token in zip(generated, expected, strict=True):
        if generated_token != expected_token:
            break
        length += 1
    return length


class MemorizationExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("No passage to compare; pass at least one prediction and reference.")
        for index, (generated, expected) in enumerate(zip(predictions, references, strict=True)):
            if len(generated) != len(expected):
                raise ValueError(
                    f"Passage {index}: the prediction has {len(generated)} tokens and the reference {len(expected)}; "
                    "they differ in shape. Pad a prediction that stopped early (e.g. with -1) to the reference's length."
                )
        prefix_match = [
            matching_prefix_length(generated, expected)
            for generated, expected in zip(predictions, references, strict=True)
        ]
        exact_match = [length == len(expected) for length, expected in zip(prefix_match, references, strict=True)]
        return {
            "exact_match": sum(exact_match) / len(exact_match),
            "prefix_match": sum(prefix_match) / len(prefix_match),
            "exact_match_per_passage": exact_match,
            "prefix_match_per_passage": prefix_match,
        }
