"""The reward policies earn on held-out prompts, before and after preference alignment:
`python eval/reward.py --model SFT_DIR QRPO_DIR --dataset data/chat --split test --reward_model RM_DIR
[--judge_model JUDGE --charter FILE --route_column contested] [--answer_similarity]`.

Each model answers every prompt once (greedy unless --temperature > 0); each scorer rates every answer: the reward
model (or a reward function), the charter judge when given, and with --answer_similarity the closeness to the
dataset's own answer (conversations that end with an assistant turn), which a reward model cannot be fooled about.
Prints each mean with its standard error and, for every model after the first, the paired difference to the first;
with --route_column also per route (the judge's prompts and the reward model's). See `apertus_hf.evaluation.reward`.
Writes an EvalResult JSON per model (default `<model>/eval_results/reward.json`).
"""

import argparse
import json
from pathlib import Path

from apertus_hf.evaluation.common import default_result_path
from apertus_hf.evaluation.reward import evaluate_rewards
from apertus_hf.preference import CharterJudge, load_prompts, load_reward
from apertus_hf.preference.prepare import ANSWER_COLUMN
from apertus_hf.preference.rewards import answer_similarity
from apertus_hf.runtime import init_cpu_process_group


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, nargs="+", help="Causal LM folders or Hub ids; the first is the baseline."
    )
    parser.add_argument("--dataset", default="data/chat", help="Prompts: a file, folder or Hub dataset id.")
    parser.add_argument("--split", default="test", help="Split of --dataset (default: test).")
    parser.add_argument(
        "--prompt_column",
        default="messages",
        help="Column of prompts (strings or conversations; a final assistant turn is dropped and kept as the answer).",
    )
    parser.add_argument("--max_prompts", type=int, default=None, help="Only the first this many prompts.")
    parser.add_argument("--reward_model", default=None, help="A sequence-classification reward model folder or id.")
    parser.add_argument(
        "--reward_function", default=None, help="Or a reward function 'package.module:function' (TRL's convention)."
    )
    parser.add_argument(
        "--reward_kwargs", type=json.loads, default={}, help="JSON keyword arguments of --reward_function."
    )
    parser.add_argument("--judge_model", default=None, help="A chat model that rates answers against --charter.")
    parser.add_argument("--charter", default=None, help="The judge's charter file (YAML or Markdown).")
    parser.add_argument(
        "--route_column",
        default=None,
        help="A boolean column of --dataset (e.g. `contested` from recipes/label_prompts.py): adds the figures per "
        "route, judge (true) and reward (false).",
    )
    parser.add_argument(
        "--answer_similarity",
        action="store_true",
        help="Also score how close each answer is to the dataset's own (apertus_hf.preference.rewards).",
    )
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Longest answer, in tokens (default: 64).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampled.")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus mass when sampling (default: 1).")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call (default: 16).")
    parser.add_argument("--reward_batch_size", type=int, default=32, help="Answers per scorer call (default: 32).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling (default: 0).")
    parser.add_argument("--dtype", default="float32", help="dtype of every model (default: float32).")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Folder for the result files (<model name>.json); default: each model's eval_results/reward.json.",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.reward_model is None and args.reward_function is None and args.judge_model is None:
        raise SystemExit("error: give a scorer: --reward_model, --reward_function or --judge_model (with --charter).")
    if (args.judge_model is None) != (args.charter is None):
        raise SystemExit("error: --judge_model and --charter go together; give both or neither.")
    init_cpu_process_group()
    prompts, columns = load_prompts(args.dataset, args.split, args.prompt_column, args.max_prompts)
    groups = None
    if args.route_column is not None:
        if args.route_column not in columns:
            raise SystemExit(
                f"error: {args.dataset} has no column {args.route_column!r}; its columns: {sorted(columns)}."
            )
        groups = ["judge" if value else "reward" for value in columns[args.route_column]]
    rewards = {}
    if args.reward_model is not None or args.reward_function is not None:
        rewards["reward"] = load_reward(
            args.reward_model,
            args.reward_function,
            args.reward_kwargs,
            batch_size=args.reward_batch_size,
            dtype=args.dtype,
        )
    if args.judge_model is not None:
        # One answer a prompt: nothing to re-rank in pairs.
        rewards["judge"] = CharterJudge.from_pretrained(
            args.judge_model, args.charter, dtype=args.dtype, batch_size=args.reward_batch_size, pairwise_top_k=0
        )
    if args.answer_similarity:
        if ANSWER_COLUMN not in columns:
            raise SystemExit(
                f"error: --answer_similarity needs conversations that end with an answer; {args.dataset} has none."
            )
        rewards["answer_similarity"] = answer_similarity
    results = evaluate_rewards(
        args.model,
        prompts,
        rewards,
        columns=columns,
        groups=groups,
        dataset_name=f"{args.dataset}:{args.split}",
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        reward_batch_size=args.reward_batch_size,
        seed=args.seed,
        dtype=args.dtype,
        settings={
            "reward_model": args.reward_model,
            "reward_function": args.reward_function,
            "judge_model": args.judge_model,
            "charter": args.charter,
            "route_column": args.route_column,
        },
    )
    for result in results:
        if args.output_dir:
            path = Path(args.output_dir) / f"{Path(result.model).name or 'model'}.json"
        else:
            path = default_result_path(result.model, "reward")
        result.write(path)
        print(f"{result.model} ({result.details['num_prompts']} prompts) -> {path}")
        for name, entry in result.details["rewards"].items():
            line = f"  {name:<18} {entry['mean']:.4f} ± {entry['stderr'] or 0:.4f}"
            if "paired_difference" in entry:
                difference = entry["paired_difference"]
                line += f"   vs baseline {difference['mean']:+.4f} ± {difference['stderr'] or 0:.4f}"
            print(line)
            for group, summary in entry["per_group"].items():
                line = (
                    f"    {group:<16} {summary['mean']:.4f} ± {summary['stderr'] or 0:.4f} ({summary['num_prompts']})"
                )
                if "paired_difference" in entry:
                    paired = entry["paired_difference"]["per_group"][group]
                    line += f"   vs baseline {paired['mean']:+.4f} ± {paired['stderr'] or 0:.4f}"
                print(line)


if __name__ == "__main__":
    main()
