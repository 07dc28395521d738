"""Apertus tokenizer: the special-token layout and byte-level BPE training."""

from .special_tokens import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    NAMED_SPECIAL_TOKENS,
    NUM_SPECIAL_TOKENS,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    UNK_TOKEN_ID,
    special_token_layout,
)
from .training import (
    TEKKEN_SPLIT_PATTERN,
    CorpusTokenStatistics,
    corpus_files,
    corpus_token_statistics,
    iter_corpus_texts,
    train_bpe_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "NAMED_SPECIAL_TOKENS",
    "NUM_SPECIAL_TOKENS",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "SPECIAL_TOKENS",
    "TEKKEN_SPLIT_PATTERN",
    "UNK_TOKEN",
    "UNK_TOKEN_ID",
    "CorpusTokenStatistics",
    "corpus_files",
    "corpus_token_statistics",
    "iter_corpus_texts",
    "special_token_layout",
    "train_bpe_tokenizer",
]
