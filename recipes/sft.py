"""Supervised fine-tuning: `accelerate launch [--config_file accelerate_configs/X.yaml] recipes/sft.py
[--config recipes/configs/<size>/sft.yaml] [--key value ...]`.

With no arguments it runs the embedded default: the model `make pretrain` exports, fine-tuned on the chat dataset in
data/chat (loss on the assistant answers only). Every option is a field of `apertus_hf.trainers.SFTRecipeConfig`;
`--help` lists them.
"""

from apertus_hf.recipe_args import parse_recipe_args
from apertus_hf.trainers.sft import SFTRecipeConfig, run_sft


def main() -> None:
    result = run_sft(parse_recipe_args(SFTRecipeConfig))
    if not result.is_main_process:
        return
    summary = [f"{result.steps} steps"]
    if result.final_train_loss is not None:
        summary.append(f"train loss {result.final_train_loss:.4f}")
    if result.final_eval_loss is not None:
        start = f"{result.initial_eval_loss:.4f} -> " if result.initial_eval_loss is not None else ""
        summary.append(f"eval loss {start}{result.final_eval_loss:.4f}")
    print(f"Done: {', '.join(summary)}; model in {result.model_dir}.")


if __name__ == "__main__":
    main()
