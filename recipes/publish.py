"""Publish a model folder to the Hugging Face Hub with its model card:
`python recipes/publish.py --model outputs/pretrain-tiny/model --repo-id ORG/NAME [--private] [--dry-run]`.

The folder is checked first (safetensors weights, a config stock transformers loads, tokenizer, generation
config, no absolute paths of this machine in its files). The card is built from the run's `training_facts.json`
and written to `<model>/README.md`, replacing an earlier generated card or the trainer's (TRL's) draft; a README.md
you wrote yourself is published as it is. `--dry-run` makes no network request and writes nothing: it prints the
files and the card. Log in first with `hf auth login` (or set HF_TOKEN).
"""

import argparse
import logging

from apertus_hf.hub import DEFAULT_MAX_SHARD_SIZE, format_files, publish


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        usage="python recipes/publish.py --model MODEL_DIR --repo-id ORG/NAME [--private] [--dry-run] [options]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Model folder to publish (e.g. <output_dir>/model).")
    parser.add_argument("--repo-id", required=True, help="Hub repository ORG/NAME; created if it does not exist.")
    parser.add_argument(
        "--private",
        action="store_const",
        const=True,
        default=None,
        help="Create the repository as private (new repos only; default: the Hub's default for the namespace).",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="Check and print the files and the model card; upload nothing."
    )
    parser.add_argument(
        "--license",
        help="Hub license id for the card, e.g. apache-2.0 (default: the run's, from training_facts.json; 'unknown' "
        "with a warning when the run recorded none).",
    )
    parser.add_argument(
        "--language",
        nargs="+",
        help="Language codes for the card (e.g. en de fr); default: the `language` fields of the run's local data.",
    )
    parser.add_argument(
        "--base-model",
        help="Hub id of the model this one was trained from (default: the run's, from training_facts.json).",
    )
    parser.add_argument("--commit-message", help="Commit message of the upload.")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="Weights files larger than this are re-saved in shards before upload (default: %(default)s).",
    )
    parser.add_argument("--token", help="Hub token (default: the one of `hf auth login` or HF_TOKEN).")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co).")
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apertus_hf").setLevel(logging.INFO)
    args = parse_args()
    result = publish(
        args.model,
        args.repo_id,
        private=args.private,
        dry_run=args.dry_run,
        token=args.token,
        endpoint=args.endpoint,
        license=args.license,
        language=args.language,
        base_model=args.base_model,
        commit_message=args.commit_message,
        max_shard_size=args.max_shard_size,
    )
    print(f"Files for {result.repo_id}:\n{format_files(result.files)}")
    if result.resharded:
        verb = "would be" if args.dry_run else "were"
        print(f"The weights {verb} re-saved in shards of at most {args.max_shard_size}.")
    if args.dry_run:
        print(f"\nModel card ({'generated' if result.card_generated else 'your README.md'}):\n\n{result.card}")
        print("Dry run: nothing was uploaded.")
    else:
        print(f"Published: {result.commit_url}")


if __name__ == "__main__":
    main()
