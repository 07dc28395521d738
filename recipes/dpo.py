"""DPO baseline with TRL's DPOTrainer, on the pairs recipes/qrpo_prepare.py writes:
`accelerate launch [--config_file accelerate_configs/X.yaml] recipes/dpo.py [--config recipes/configs/tiny/dpo.yaml]
[--key value ...]`.

With no arguments it runs the embedded default: the model `recipes/sft.py` writes, trained with DPO on the pairs of
`recipes/qrpo_prepare.py`'s default run, for a side-by-side comparison with `recipes/qrpo.py`. The options are those
of `apertus_hf.trainers.dpo.DPOArguments` (model, data, LoRA, AdEMAMix) and of TRL's `DPOConfig` (beta, loss_type,
training, logging, checkpoints); `--help` lists them. The final model gets apertus_hf's model card; with
`hub_model_id` it is published there (`hub_private_repo` for a new repo's visibility).
"""

from apertus_hf.hub import card_and_publish
from apertus_hf.trainers.dpo import DPO_RECIPE, run_dpo


def main(argv: list[str] | None = None) -> None:
    recipe, args = DPO_RECIPE.parse(argv, description=__doc__)
    result = run_dpo(recipe, args)
    if not result.is_main_process:
        return
    card_and_publish(
        result.model_dir,
        args.hub_model_id,
        private=args.hub_private_repo,
        token=args.hub_token,
        other_folders=[result.output_dir],
    )
    margins = [entry["rewards/margins"] for entry in result.trainer.state.log_history if "rewards/margins" in entry]
    summary = f", reward margin {margins[0]:.4f} -> {margins[-1]:.4f}" if margins else ""
    published = f", published to {args.hub_model_id}" if args.hub_model_id else ""
    print(f"Done: {result.steps} steps{summary}; model in {result.model_dir}{published}.")


if __name__ == "__main__":
    main()
