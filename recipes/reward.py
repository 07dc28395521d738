"""Reward-model training with TRL's RewardTrainer: `accelerate launch [--config_file accelerate_configs/X.yaml]
recipes/reward.py [--config recipes/configs/<size>/reward.yaml] [--key value ...]`.

With no arguments it runs the embedded default: a reward model started from the model `recipes/sft.py` writes,
trained on the preference pairs in data/preferences and measured on their held-out test split. The options are those
of `apertus_hf.trainers.reward.RewardArguments` (model, data, LoRA, AdEMAMix) and of TRL's `RewardConfig`
(center_rewards_coefficient, max_length, training, logging, checkpoints); `--help` lists them. The final model gets
apertus_hf's model card; `recipes/qrpo_prepare.py --reward_model <its folder> --reward_function null` scores with it.
"""

from apertus_hf.hub import card_and_publish
from apertus_hf.trainers.reward import REWARD_RECIPE, run_reward


def main(argv: list[str] | None = None) -> None:
    recipe, args = REWARD_RECIPE.parse(argv, description=__doc__)
    result = run_reward(recipe, args)
    if not result.is_main_process:
        return
    card_and_publish(
        result.model_dir,
        args.hub_model_id,
        private=args.hub_private_repo,
        token=args.hub_token,
        other_folders=[result.output_dir],
    )
    accuracy = f", held-out pairwise accuracy {result.evaluation}" if result.evaluation is not None else ""
    published = f", published to {args.hub_model_id}" if args.hub_model_id else ""
    print(f"Done: {result.steps} steps{accuracy}; reward model in {result.model_dir}{published}.")


if __name__ == "__main__":
    main()
