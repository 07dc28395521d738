"""Plan a pretraining run before queueing it: `python recipes/plan.py --config recipes/configs/8b/pretrain.yaml
--gpus 256 --gpu-memory 80 [--engine zero3] [--mfu 0.4] [--seq-len 8192] [--format markdown]`.

Prints, per GPU: the model states (weights, gradients, the optimizer's moments and master weights under the chosen
engine and bf16 mixed precision), the activations with and without checkpointing, the chunked loss's buffers and the
optimizer step; the micro-batch that fits with the headroom left; and the step time and tokens/s per GPU at the MFU.
When nothing fits it says what would. The config is a pretraining recipe (recipes/configs/<size>/pretrain.yaml; every
option of it can be overridden, e.g. --seq_len) or a long-context chain (long_context.yaml: one column per stage).
Nothing is built or downloaded. The options of the plan are the fields of
`apertus_hf.pretraining.capacity.CapacityOptions`; `--help` lists them.
"""

import sys

from apertus_hf.pretraining import PretrainConfig
from apertus_hf.pretraining.capacity import CapacityOptions, describe_recipe
from apertus_hf.pretraining.long_context import LongContextConfig
from apertus_hf.recipe_args import read_recipe_args, recipe_configs_from_dict, recipe_help


def main() -> None:
    values, sources = read_recipe_args(
        sys.argv[1:], recipe_help([CapacityOptions, PretrainConfig], description=__doc__)
    )
    # A long-context chain is the recipe whose stages share a `base`.
    recipe_class = LongContextConfig if "base" in values else PretrainConfig
    options, config = recipe_configs_from_dict([CapacityOptions, recipe_class], values, sources)
    print(describe_recipe(config, options))


if __name__ == "__main__":
    main()
