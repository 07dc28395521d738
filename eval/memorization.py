"""The Goldfish memorization audit: greedy extraction of training passages against held-out ones:
`python eval/memorization.py --model DIR --train TRAIN.jsonl --heldout HELDOUT.jsonl`.

Passages and metrics: see `apertus_hf.evaluation.memorization`; the metrics come from the `evaluate` module shipped
in the package (`apertus_hf.evaluation.load_metric("memorization_exact_match")`). Writes an EvalResult JSON (default
`<model>/eval_results/memorization.json`) and prints the metrics.
"""

import argparse

from apertus_hf.evaluation.common import default_result_path
from apertus_hf.evaluation.memorization import evaluate_memorization


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="Model folder or Hub id loadable by AutoModelForCausalLM (any architecture)."
    )
    parser.add_argument("--train", required=True, nargs="+", help="Files of documents the model was trained on.")
    parser.add_argument("--heldout", required=True, nargs="+", help="Files of comparable documents it never saw.")
    parser.add_argument("--prefix_tokens", type=int, default=32, help="Prompt tokens after <s> (default: 32).")
    parser.add_argument("--suffix_tokens", type=int, default=32, help="Greedily decoded tokens compared (default: 32).")
    parser.add_argument(
        "--max_passages",
        type=int,
        default=None,
        help="At most this many passages per set, in file order (default: all).",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call (default: 16).")
    parser.add_argument("--device", default=None, help="Torch device, e.g. cuda:0 or cpu (default: CUDA if present).")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto).")
    parser.add_argument(
        "--output", default=None, help="Result JSON path (default: <model>/eval_results/memorization.json)."
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    output = args.output or default_result_path(args.model, "memorization")
    result = evaluate_memorization(
        args.model,
        args.train,
        args.heldout,
        prefix_tokens=args.prefix_tokens,
        suffix_tokens=args.suffix_tokens,
        max_passages=args.max_passages,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        output=output,
    )
    for name, value in result.metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
