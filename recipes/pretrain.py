"""Pretrain an Apertus model: `accelerate launch [--config_file accelerate_configs/X.yaml] recipes/pretrain.py
[--config recipes/configs/<size>/pretrain.yaml] [--key value ...]`.

With no arguments it trains the embedded default (a small model on the corpus and tokenizer in data/). Every option
is a field of `apertus_hf.pretraining.PretrainConfig`; `--help` lists them. The exported model gets its model card,
and with `--hub_model_id ORG/NAME` it is published to the Hub.

`--dry-run [PROCESSES]` validates the recipe and prints its plan (steps, batch sizes, learning-rate schedule and data
stages in steps, samples and tokens, for PROCESSES data-parallel processes, default 1) without building anything.
"""

import sys

from apertus_hf.hub import card_and_publish
from apertus_hf.pretraining import PretrainConfig, pretrain
from apertus_hf.recipe_args import parse_recipe_args


def main() -> None:
    arguments = sys.argv[1:]
    if "--dry-run" in arguments:
        index = arguments.index("--dry-run")
        processes = 1
        if index + 1 < len(arguments) and arguments[index + 1].isdigit():
            processes = int(arguments.pop(index + 1))
        arguments.pop(index)
        config = parse_recipe_args(PretrainConfig, arguments, description=__doc__)
        print(config.run_plan(processes).describe(config.per_device_batch_size, processes))
        return
    config = parse_recipe_args(PretrainConfig, arguments, description=__doc__)
    result = pretrain(config)
    if not result.is_main_process:
        return
    if result.interrupted:
        print(f"Stopped at step {result.steps}; run the same command again to resume from {result.output_dir}.")
        return
    published = card_and_publish(result.model_dir, config.hub_model_id, private=config.hub_private_repo)
    if published is not None:
        print(f"Published {result.model_dir} to the Hub: {published.commit_url}")
    print(f"Done: {result.steps} steps, {result.tokens_seen:,} tokens, model in {result.model_dir}.")


if __name__ == "__main__":
    main()
