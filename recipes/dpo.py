"""DPO baseline with TRL's DPOTrainer, on the pairs recipes/qrpo_prepare.py writes:
`accelerate launch [--config_file accelerate_configs/X.yaml] recipes/dpo.py [--config recipes/configs/tiny/dpo.yaml]
[--key value ...]`.

With no arguments it runs the embedded default: the model `recipes/sft.py` writes, trained with DPO on the pairs of
`recipes/qrpo_prepare.py`'s default run, for a side-by-side comparison with `recipes/qrpo.py`. Every option is a
field of `apertus_hf.trainers.dpo.DPORecipeConfig`; `--help` lists them.
"""

from apertus_hf.recipe_args import parse_recipe_args
from apertus_hf.trainers.dpo import DPORecipeConfig, run_dpo


def main() -> None:
    result = run_dpo(parse_recipe_args(DPORecipeConfig))
    if not result.is_main_process:
        return
    margins = [entry["rewards/margins"] for entry in result.trainer.state.log_history if "rewards/margins" in entry]
    summary = f", reward margin {margins[0]:.4f} -> {margins[-1]:.4f}" if margins else ""
    print(f"Done: {result.steps} steps{summary}; model in {result.model_dir}.")


if __name__ == "__main__":
    main()
