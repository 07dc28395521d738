"""Extend an Apertus model's context in stages: `accelerate launch [--config_file accelerate_configs/X.yaml]
recipes/long_context.py --config recipes/configs/<size>/long_context.yaml [--key value ...]`.

Each stage is a pretraining run from the model the previous stage exported, at a longer sequence length and a larger
RoPE theta, in <output_dir>/<stage>/; relaunching the same command skips finished stages and resumes an interrupted
one. `--dry-run` prints the plan (steps, tokens, theta, batch, learning rate and per-GPU memory of each stage)
without loading anything. Every option is a field of `apertus_hf.pretraining.long_context.LongContextConfig`; `--help`
lists them. The final model gets its model card, and with `base: {hub_model_id: ORG/NAME}` it is published.
"""

import sys

from apertus_hf.hub import card_and_publish
from apertus_hf.pretraining.long_context import LongContextConfig, format_plan, plan_long_context, run_long_context
from apertus_hf.recipe_args import parse_recipe_args


def main() -> None:
    arguments = sys.argv[1:]
    dry_run = "--dry-run" in arguments
    if dry_run:
        arguments.remove("--dry-run")
    config = parse_recipe_args(LongContextConfig, arguments, description=__doc__)
    if dry_run:
        print(format_plan(config, plan_long_context(config)))
        return
    result = run_long_context(config)
    if not result.is_main_process:
        return
    if result.interrupted:
        print(f"Stopped in stage {result.stages[-1].name}; run the same command again to continue {config.output_dir}.")
        return
    earlier = [stage.model_dir for stage in result.stages[:-1]]
    hub_model_id = config.base.get("hub_model_id")
    published = card_and_publish(
        result.model_dir, hub_model_id, private=config.base.get("hub_private_repo"), other_folders=earlier
    )
    if published is not None:
        print(f"Published {result.model_dir} to the Hub: {published.commit_url}")
    for stage in result.stages:
        print(f"Stage {stage.name}: {stage.steps} steps, {stage.tokens_seen:,} tokens, model in {stage.model_dir}.")
    print(f"Done: the long-context model is {result.model_dir}.")


if __name__ == "__main__":
    main()
