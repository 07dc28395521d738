"""Train the Apertus-style byte-level BPE tokenizer on a corpus and save it as a `transformers` folder.

    python recipes/train_tokenizer.py --corpus data/corpus --vocab_size 8192 --output data/tokenizer

The defaults reproduce the tokenizer shipped in data/tokenizer/.
"""

import argparse
from pathlib import Path

from apertus_hf.tokenization import (
    NUM_SPECIAL_TOKENS,
    corpus_files,
    corpus_token_statistics,
    iter_corpus_texts,
    train_bpe_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus",
        type=Path,
        nargs="+",
        default=[REPO_ROOT / "data" / "corpus"],
        help="corpus files or folders (*.jsonl with a 'text' field, *.txt)",
    )
    parser.add_argument("--vocab_size", type=int, default=8192, help="total vocabulary size, special slots included")
    parser.add_argument(
        "--num_special_tokens", type=int, default=NUM_SPECIAL_TOKENS, help="reserved special slots before the bytes"
    )
    parser.add_argument("--min_frequency", type=int, default=2, help="minimum count of a pair to be merged")
    parser.add_argument("--model_max_length", type=int, default=4096, help="model_max_length in the tokenizer config")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "data" / "tokenizer", help="folder to save into")
    args = parser.parse_args()

    tokenizer = train_bpe_tokenizer(
        iter_corpus_texts(args.corpus),
        args.vocab_size,
        num_special_tokens=args.num_special_tokens,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
    )
    tokenizer.save_pretrained(args.output)
    print(f"vocab size: {len(tokenizer)}")
    for file in corpus_files(args.corpus):
        stats = corpus_token_statistics(tokenizer, iter_corpus_texts(file))
        print(f"{file.name}: {stats.num_documents} documents, {stats.bytes_per_token:.2f} bytes/token")
    stats = corpus_token_statistics(tokenizer, iter_corpus_texts(args.corpus))
    print(
        f"corpus: {stats.num_documents} documents, {stats.num_bytes} bytes, {stats.num_tokens} tokens with <s>/</s>, "
        f"{stats.bytes_per_token:.2f} bytes/token, unigram entropy {stats.unigram_entropy:.3f} nats/token"
    )
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
