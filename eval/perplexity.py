"""Perplexity and bits per byte of a causal LM on jsonl documents, per language, source or file, and overall:
`python eval/perplexity.py --model DIR --data data/corpus/*.jsonl --group_by language`.

What is scored and how long documents are windowed: see `apertus_hf.evaluation.perplexity`. The metrics come from
the `evaluate` module shipped in the package (`apertus_hf.evaluation.load_metric("bits_per_byte")`). Writes an
EvalResult JSON (default `<model>/eval_results/perplexity.json`) and prints the metrics.
"""

import argparse

from apertus_hf.evaluation.common import default_result_path
from apertus_hf.evaluation.perplexity import GROUP_BY_CHOICES, evaluate_perplexity


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="Model folder or Hub id loadable by AutoModelForCausalLM (any architecture)."
    )
    parser.add_argument(
        "--data", required=True, nargs="+", help="Data files (jsonl; txt/parquet with --group_by file)."
    )
    parser.add_argument(
        "--group_by",
        choices=GROUP_BY_CHOICES,
        default="file",
        help="Report per value of the records' 'language' or 'source' field, or per file (default: file).",
    )
    parser.add_argument("--text_column", default="text", help="The record field that holds the text (default: text).")
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="Window length in tokens, <s> included (default: 4096 capped by the model's max_position_embeddings).",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="Window step in tokens; later windows give each token >= max_length - stride tokens of context "
        "(default: max_length // 2; = max_length for independent chunks).",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Windows per forward pass (default: 8).")
    parser.add_argument("--device", default=None, help="Torch device, e.g. cuda:0 or cpu (default: CUDA if present).")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto).")
    parser.add_argument(
        "--output", default=None, help="Result JSON path (default: <model>/eval_results/perplexity.json)."
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    output = args.output or default_result_path(args.model, "perplexity")
    result = evaluate_perplexity(
        args.model,
        args.data,
        group_by=args.group_by,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        output=output,
        text_column=args.text_column,
    )
    for name, values in [("overall", result.details["overall"]), *result.details["groups"].items()]:
        metrics = ", ".join(
            f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()
        )
        print(f"{name}: {metrics}")
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
