"""Bits per byte, perplexity and loss of a language model from summed negative log-likelihoods: an `evaluate` module.

One input row is any piece of scored text (a document, a window, an evaluation batch): its summed NLL in nats, the
number of tokens that NLL scores, and the UTF-8 bytes of the text they stand for. Rows are summed before dividing, so
the result is the same whichever way the text is split into rows.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Over all rows, with NLL the summed negative log-likelihood in nats:
* loss = NLL / tokens, the mean NLL per scored token;
* perplexity = exp(loss);
* bits_per_byte = NLL / ln(2) / bytes, where bytes are the UTF-8 bytes of the scored text. It does not depend on the
  tokenizer, so it compares models with different vocabularies (The Pile, Gao et al. 2020).
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): summed negative log-likelihood of each row's scored tokens, in nats.
    tokens (`list` of `int`): number of scored tokens of each row.
    bytes (`list` of `int`): number of UTF-8 bytes of each row's text.
Returns:
    loss (`float`), perplexity (`float`), bits_per_byte (`float`).
Example:
    >>> metric = evaluate.load("path/to/bits_per_byte")
    >>> metric.compute(nll=[120.0], tokens=[40], bytes=[100])["loss"]
    3.0
"""

_CITATION = """
@article{gao2020pile,
  title={The {P}ile: An 800{GB} Dataset of Diverse Text for Language Modeling},
  author={Gao, Leo and Biderman, Stella and Black, Sid and Golding, Laurence and Hoppe, Travis and Foster, Charles
    and Phang, Jason and He, Horace and Thite, Anish and Nabeshima, Noa and Presser, Shawn and Leahy, Connor},
  journal={arXiv preprint arXiv:2101.00027},
  year={2020}
}
"""


class BitsPerByte(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll": datasets.Value("float64"), "tokens": datasets.Value("int64"), "bytes": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll, tokens, bytes):
        total_nll, total_tokens, total_bytes = sum(nll), sum(tokens), sum(bytes)
        if total_tokens == 0 or total_bytes == 0:
            raise ValueError(
                f"No text to score: the rows add up to {total_tokens} tokens and {total_bytes} bytes. "
                "Pass documents with text."
            )
        loss = total_nll / total_tokens
        return {"perplexity": math.exp(loss), "loss": loss, "bits_per_byte": total_nll / math.log(2) / total_bytes}
