"""Plot loss against tokens for pretraining runs: `python recipes/plot.py RUN_DIR [RUN_DIR ...] [--output FILE.png]`.

Each RUN_DIR is a run's output_dir (it holds metrics.jsonl), or a folder of runs, such as an ablation variant's
seed-N folders, which becomes one line with the band between its lowest and highest value. The figure has the
training loss and, when the runs evaluated, the held-out loss.
"""

import argparse

from apertus_hf.ablation.plots import plot_loss_curves, run_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="Run folders, or folders of runs (one band each).")
    parser.add_argument("--output", default="loss_vs_tokens.png", help="The PNG file to write.")
    parser.add_argument("--title", default=None, help="Title of the figure.")
    args = parser.parse_args()
    try:
        groups = run_groups(args.runs)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    print(plot_loss_curves(groups, args.output, args.title))


if __name__ == "__main__":
    main()
