"""lm-evaluation-harness tasks (built-in ones and those in eval/tasks/) on a causal LM folder; writes one evaluation
result JSON per task. (Not named lm_eval.py: a script of that name would shadow the `lm_eval` package.)

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python eval/lm_eval_harness.py --model outputs/pretrain/model \
        --tasks apertus_toy_mc
"""

import argparse
from pathlib import Path

from apertus_hf.evaluation.common import default_result_path
from apertus_hf.evaluation.lm_eval_harness import run_lm_eval

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Model folder or Hub id loadable by AutoModelForCausalLM.")
    parser.add_argument(
        "--tasks", required=True, nargs="+", help="lm-eval task or group names, e.g. apertus_toy_mc arc_easy."
    )
    parser.add_argument(
        "--include_path",
        nargs="*",
        default=[str(SHIPPED_TASKS)],
        help="Folders of extra task YAMLs (default: this repository's eval/tasks).",
    )
    parser.add_argument(
        "--no_default_tasks",
        action="store_true",
        help="Index only the tasks under --include_path, not lm-eval's built-in ones (starts seconds faster).",
    )
    parser.add_argument("--batch_size", default="8", help='Sequences per forward pass, or "auto".')
    parser.add_argument("--device", default=None, help="Torch device, e.g. cpu or cuda:0 (default: CUDA if present).")
    parser.add_argument("--dtype", default="auto", help="Weights dtype: auto (as saved), float32, bfloat16, float16.")
    parser.add_argument("--limit", type=float, default=None, help="Documents per task (a fraction when below 1).")
    parser.add_argument("--num_fewshot", type=int, default=None, help="Few-shot examples (default: each task's own).")
    parser.add_argument(
        "--output_dir", default=None, help="Folder for the result JSONs (default: <model>/eval_results/)."
    )
    args = parser.parse_args()

    results = run_lm_eval(
        args.model,
        args.tasks,
        include_path=args.include_path,
        include_defaults=not args.no_default_tasks,
        batch_size=args.batch_size if args.batch_size == "auto" else int(args.batch_size),
        device=args.device,
        dtype=args.dtype,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        num_fewshot=args.num_fewshot,
    )
    for result in results:
        name = f"lm_eval_{result.task_name}"
        path = Path(args.output_dir, f"{name}.json") if args.output_dir else default_result_path(args.model, name)
        result.write(path)
        values = ", ".join(f"{metric} {value:.4f}" for metric, value in result.metrics.items())
        print(f"{result.task_name}: {values} -> {path}")


if __name__ == "__main__":
    main()
