"""Train a policy with QRPO: `accelerate launch [--config_file accelerate_configs/X.yaml] recipes/qrpo.py
[--config recipes/configs/<size>/qrpo.yaml] [--key value ...]`.

The data comes from `recipes/qrpo_prepare.py` (reference completions, rewards and reference rewards). With no
arguments it runs the embedded default. The options are those of `apertus_hf.trainers.qrpo_recipe.QRPOArguments`
(model, data, LoRA, AdEMAMix) and of `apertus_hf.trainers.qrpo.QRPOConfig` (beta, transform, training, logging,
checkpoints); `--help` lists them. The final model gets apertus_hf's model card; with `hub_model_id` it is published
there (`hub_private_repo` for a new repo's visibility).
"""

from apertus_hf.hub import card_and_publish
from apertus_hf.trainers.qrpo_recipe import QRPO_RECIPE, run_qrpo


def main(argv: list[str] | None = None) -> None:
    recipe, args = QRPO_RECIPE.parse(argv, description=__doc__)
    result = run_qrpo(recipe, args)
    if not result.is_main_process:
        return
    card_and_publish(
        result.model_dir,
        args.hub_model_id,
        private=args.hub_private_repo,
        token=args.hub_token,
        other_folders=[result.output_dir],
    )
    published = f", published to {args.hub_model_id}" if args.hub_model_id else ""
    print(f"Done: model in {result.model_dir}{published}; metrics in {result.output_dir / 'all_results.json'}.")


if __name__ == "__main__":
    main()
