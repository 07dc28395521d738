"""Tokenize pretraining data once into memory-mapped shards that pretraining reads instead of tokenizing every run.

    python recipes/tokenize_data.py --source data/corpus/en.jsonl --output_dir data/tokenized/en [--num_proc 8]
    python recipes/tokenize_data.py --config recipes/configs/tiny/pretrain_staged.yaml --output_dir data/tokenized

With `--source`, one source goes into the folder `--output_dir`. With `--config`, a pretraining recipe: every source
of its `data` (or of each of its `stages`) and its `eval_data` goes into `<output_dir>/<name>`, with the recipe's
tokenizer and on_bad_record unless given here; the recipe's other options are not used. The `data:` (or `stages:`)
block that trains on the folders is printed at the end: put it into the recipe in place of its own. Every option is a
field of `apertus_hf.data.pretokenized.TokenizeDataConfig`; docs/pretokenized_data.md describes the format.
"""

import sys

from apertus_hf.data.pretokenized import TokenizeDataConfig, tokenize_data
from apertus_hf.pretraining import PretrainConfig
from apertus_hf.recipe_args import RecipeArgumentError, parse_recipe_args

RECIPE_OPTIONS = ("data", "stages", "eval_data", "tokenizer", "on_bad_record", "streaming")
"""The options of a pretraining recipe that tokenization reads."""


def main(argv: list[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    recipe = None
    if "--config" in arguments:
        # --config names a pretraining recipe, read (and checked) as pretraining reads it, not options of this script.
        index = arguments.index("--config")
        if index + 1 >= len(arguments):
            raise RecipeArgumentError("--config has no value; write --config RECIPE.yaml.")
        pretrain_config = parse_recipe_args(PretrainConfig, ["--config", arguments[index + 1]])
        recipe = {name: getattr(pretrain_config, name) for name in RECIPE_OPTIONS}
        del arguments[index : index + 2]
    config = parse_recipe_args(TokenizeDataConfig, arguments, description=__doc__)
    result = tokenize_data(config, recipe)
    for item in result.written:
        folder = item.folder
        print(
            f"{item.source.path} -> {folder.path}: {folder.num_documents:,} documents, {folder.num_tokens:,} tokens in "
            f"{item.seconds:.1f} s ({folder.num_tokens / item.seconds:,.0f} tokens/s)"
        )
    processes = config.num_proc or 1
    print(
        f"Done: {len(result.written)} source(s), {result.documents:,} documents, {result.tokens:,} tokens in "
        f"{result.seconds:.1f} s ({result.tokens / result.seconds:,.0f} tokens/s with {processes} process(es)) into "
        f"{config.output_dir}."
    )
    print("Train on it with this in the recipe (in place of its data options):\n")
    print(result.data_block, end="")


if __name__ == "__main__":
    main()
