"""Train a policy with QRPO: `accelerate launch [--config_file accelerate_configs/X.yaml] recipes/qrpo.py
[--config recipes/configs/<size>/qrpo.yaml] [--key value ...]`.

The data comes from `recipes/qrpo_prepare.py` (reference completions, rewards and reference rewards). With no
arguments it runs the embedded default. Every option is a field of `apertus_hf.trainers.qrpo_recipe.QRPORecipeConfig`;
`--help` lists them.
"""

from apertus_hf.recipe_args import parse_recipe_args
from apertus_hf.trainers.qrpo_recipe import QRPORecipeConfig, run_qrpo


def main() -> None:
    result = run_qrpo(parse_recipe_args(QRPORecipeConfig))
    if result.is_main_process:
        print(f"Done: model in {result.model_dir}; metrics in {result.output_dir / 'all_results.json'}.")


if __name__ == "__main__":
    main()
