"""Label prompts as contested or not, for qrpo_prepare's judge route:
`accelerate launch [--config_file accelerate_configs/X.yaml] recipes/label_prompts.py [--config FILE.yaml]
[--key value ...]`.

A chat model is asked, for every prompt, whether it is contested (a question on which people disagree because of
their values); the probability of "Yes" against "No" as its next token decides, above `threshold`. The dataset is
saved with a boolean `contested` column and the probability (`save_to_disk`, with label_stats.json), never over an
existing folder; `recipes/qrpo_prepare.py --dataset OUTPUT --route_column contested --judge_model ... --charter ...`
then sends the contested prompts to the judge. With no arguments it labels data/judge_prompts (train and test) with the
tiny judge of docs/judge.md. Every option is a field of `apertus_hf.preference.LabelPromptsConfig`; `--help` lists them.
"""

from apertus_hf.preference import LabelPromptsConfig, label_prompts
from apertus_hf.recipe_args import parse_recipe_args


def main() -> None:
    result = label_prompts(parse_recipe_args(LabelPromptsConfig, description=__doc__))
    if not result.is_main_process:
        return
    counts = ", ".join(
        f"{split}: {split_stats['contested']} of {split_stats['prompts']} contested"
        for split, split_stats in result.stats["splits"].items()
    )
    print(f"Done: {counts}; labelled dataset in {result.output_dir}.")


if __name__ == "__main__":
    main()
