"""Apertus tokenizer: the real tekken v3 tokenizer with its chat template, the special-token layout, and BPE training."""

from .apertus import (
    APERTUS_TOKENIZER_NAME,
    apertus_generation_config,
    has_apertus_special_tokens,
    load_apertus_tokenizer,
    load_chat_tokenizer,
    load_tokenizer,
)
from .chat_template import APERTUS_CHAT_TEMPLATE, APERTUS_DEFAULT_SYSTEM_PROMPT
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
    "APERTUS_CHAT_TEMPLATE",
    "APERTUS_DEFAULT_SYSTEM_PROMPT",
    "APERTUS_TOKENIZER_NAME",
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
    "apertus_generation_config",
    "corpus_files",
    "corpus_token_statistics",
    "has_apertus_special_tokens",
    "iter_corpus_texts",
    "load_apertus_tokenizer",
    "load_chat_tokenizer",
    "load_tokenizer",
    "special_token_layout",
    "train_bpe_tokenizer",
]
