"""Supervised fine-tuning: `accelerate launch [--config_file accelerate_configs/X.yaml] recipes/sft.py
[--config recipes/configs/<size>/sft.yaml] [--key value ...]`.

With no arguments it runs the embedded default: the model `make pretrain` exports, fine-tuned on the chat dataset in
data/chat (loss on the assistant answers only). The options are those of `apertus_hf.trainers.sft.SFTArguments`
(model, data, LoRA, AdEMAMix) and of TRL's `SFTConfig` (training, logging, checkpoints); `--help` lists them. The
final model gets apertus_hf's model card; with `hub_model_id` it is published there (`hub_private_repo` for a new
repo's visibility).
"""

from apertus_hf.hub import card_and_publish
from apertus_hf.trainers.sft import SFT_RECIPE, run_sft


def main(argv: list[str] | None = None) -> None:
    recipe, args = SFT_RECIPE.parse(argv, description=__doc__)
    result = run_sft(recipe, args)
    if not result.is_main_process:
        return
    card_and_publish(
        result.model_dir,
        args.hub_model_id,
        private=args.hub_private_repo,
        token=args.hub_token,
        other_folders=[result.output_dir],
    )
    summary = [f"{result.steps} steps"]
    if result.final_train_loss is not None:
        summary.append(f"train loss {result.final_train_loss:.4f}")
    if result.final_eval_loss is not None:
        start = f"{result.initial_eval_loss:.4f} -> " if result.initial_eval_loss is not None else ""
        summary.append(f"eval loss {start}{result.final_eval_loss:.4f}")
    published = f", published to {args.hub_model_id}" if args.hub_model_id else ""
    print(f"Done: {', '.join(summary)}; model in {result.model_dir}{published}.")


if __name__ == "__main__":
    main()
