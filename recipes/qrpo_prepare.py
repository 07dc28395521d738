"""Build a QRPO dataset: sample reference completions, score them, save the rows QRPO (and DPO) train on.
`accelerate launch [--config_file accelerate_configs/X.yaml] recipes/qrpo_prepare.py
[--config recipes/configs/tiny/qrpo_prepare.yaml] [--key value ...]`.

With no arguments it runs the embedded default: 8 completions for each of 256 prompts of data/chat from the model
`recipes/sft.py` writes, scored by a toy reward (similarity to the dataset's answer), kept as Apertus-style pairs.
With `judge_model`, `charter` and `route_column` the prompts of that boolean column are rated by an LLM judge instead
(docs/judge.md; recipes/configs/tiny/qrpo_prepare_judge.yaml). Every option is a field of
`apertus_hf.preference.QRPOPrepareConfig`; `--help` lists them.
"""

from apertus_hf.preference import QRPOPrepareConfig, prepare_qrpo_dataset
from apertus_hf.recipe_args import parse_recipe_args


def main() -> None:
    result = prepare_qrpo_dataset(parse_recipe_args(QRPOPrepareConfig))
    if not result.is_main_process:
        return
    stats = result.stats
    judge = stats["routes"]["judge"]
    judged = (
        f"; {judge['prompts']} prompts judged (ratings {judge['reward_min']:.3g} .. {judge['reward_max']:.3g}, mean "
        f"digit mass {judge['mean_digit_mass']:.3g}, {judge['reordered_prompts']} re-ranked)"
        if judge["prompts"]
        else ""
    )
    print(
        f"Done: {stats['rows']} {stats['layout']} rows from {stats['prompts']} prompts ({stats['skipped_prompts']} "
        f"skipped), rewards {stats['reward_min']:.4g} .. {stats['reward_max']:.4g} (mean {stats['reward_mean']:.4g})"
        f"{judged}; dataset in {result.output_dir}."
    )


if __name__ == "__main__":
    main()
