"""Zero-shot multiple-choice accuracy (acc, acc_norm, acc_bytes) of a causal LM on a JSONL task, scored as
lm-evaluation-harness scores multiple-choice tasks (by the `evaluate` module shipped in the package,
`apertus_hf.evaluation.load_metric("multiple_choice_accuracy")`), written as an evaluation result JSON.

    python eval/multiple_choice.py --model outputs/pretrain/model --task eval/tasks/apertus_toy_mc/apertus_toy_mc.jsonl
"""

import argparse

from apertus_hf.evaluation.common import default_result_path
from apertus_hf.evaluation.multiple_choice import TARGET_DELIMITER, evaluate_multiple_choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Model folder or Hub id loadable by AutoModelForCausalLM.")
    parser.add_argument(
        "--task", required=True, help='JSONL file, one {"context": str, "choices": [str, ...], "gold": int} per line.'
    )
    parser.add_argument("--task_name", default=None, help="Name of the task in the result (default: the file's stem).")
    parser.add_argument("--batch_size", type=int, default=8, help="Context+choice sequences per forward pass.")
    parser.add_argument("--device", default=None, help="Torch device, e.g. cpu or cuda:0 (default: CUDA if present).")
    parser.add_argument("--dtype", default="auto", help="Weights dtype: auto (as saved), float32, bfloat16, float16.")
    parser.add_argument("--limit", type=int, default=None, help="Score only the first N records.")
    parser.add_argument(
        "--target_delimiter",
        default=TARGET_DELIMITER,
        help="Text between context and choice (lm-eval's default: a space).",
    )
    parser.add_argument(
        "--output", default=None, help="Result JSON path (default: <model>/eval_results/multiple_choice_<task>.json)."
    )
    args = parser.parse_args()

    result = evaluate_multiple_choice(
        args.model,
        args.task,
        task_name=args.task_name,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        target_delimiter=args.target_delimiter,
    )
    path = result.write(args.output or default_result_path(args.model, f"multiple_choice_{result.task_name}"))
    stderr = result.details["stderr"]
    print(f"{result.task_name} ({result.details['num_items']} items)")
    for name, value in result.metrics.items():
        spread = f" ± {stderr[name]:.4f}" if stderr.get(name) is not None else ""
        print(f"  {name:<10} {value:.4f}{spread}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
