"""Train an Apertus-style byte-level BPE tokenizer with the `tokenizers` library.

The result has the layout of the Apertus tokenizer (tekken v3): special slots at ids 0..num_special_tokens-1, then the
256 byte tokens, then the learned merges; tekken's pre-tokenizer split; `<s>` prepended on encode and no `</s>`
appended (documents get their `</s>` when they are packed for pretraining).
"""

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .chat_template import APERTUS_CHAT_TEMPLATE
from .special_tokens import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    NUM_SPECIAL_TOKENS,
    PAD_TOKEN,
    UNK_TOKEN,
    special_token_layout,
)

# tekken v3's split (from mistral-common's tekken_240718.json): a word with its leading non-letter, single digits,
# runs of punctuation, newlines, then other whitespace. Apertus reuses tekken's BPE, so it inherits this split.
TEKKEN_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
NUM_BYTE_TOKENS = 256
CORPUS_FILE_SUFFIXES = (".jsonl", ".txt")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    num_special_tokens: int = NUM_SPECIAL_TOKENS,
    min_frequency: int = 2,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Learn a byte-level BPE tokenizer with the Apertus special-token layout from a stream of documents.

    Ids: 0..num_special_tokens-1 are the special slots (`special_token_layout`), the next 256 ids are the bytes, and
    the learned merges fill the rest up to exactly `vocab_size`. Every byte sequence encodes without `<unk>`, and
    decoding gives the input back exactly. Encoding prepends `<s>` and appends nothing.

    Args:
        texts: documents; consumed once, so a generator keeps the corpus out of memory.
        vocab_size: total vocabulary size, special slots included.
        num_special_tokens: number of reserved special slots (Apertus: 1000).
        min_frequency: a pair must occur at least this often to be merged.
        model_max_length: the `model_max_length` written to the tokenizer config.
    """
    special_tokens = special_token_layout(num_special_tokens)
    min_vocab_size = num_special_tokens + NUM_BYTE_TOKENS
    if vocab_size < min_vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for {num_special_tokens} special tokens plus {NUM_BYTE_TOKENS} "
            f"byte tokens; use vocab_size >= {min_vocab_size}."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be at least 1 (a pair must occur to be merged).")
    if model_max_length < 1:
        raise ValueError(f"model_max_length={model_max_length} must be a positive number of tokens.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TEKKEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = bos_prepending_post_processor()
    # The trainer places its special tokens first, in order, so they land on ids 0..num_special_tokens-1, and the
    # full byte alphabet next, so no byte ever needs `<unk>`.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[special_tokens[token_id] for token_id in range(num_special_tokens)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(list(special_tokens.values()))

    learned_vocab_size = tokenizer.get_vocab_size()
    if learned_vocab_size != vocab_size:
        num_merges = learned_vocab_size - min_vocab_size
        raise ValueError(
            f"The corpus allowed only {num_merges} merges with min_frequency={min_frequency}, so the vocabulary "
            f"has {learned_vocab_size} tokens instead of vocab_size={vocab_size}; give more text, lower "
            f"min_frequency, or use vocab_size <= {learned_vocab_size}."
        )
    # The Apertus special tokens sit at the Apertus ids, so the Apertus chat template renders correctly with it.
    return wrap_apertus_tokenizer(tokenizer, model_max_length, APERTUS_CHAT_TEMPLATE)


def corpus_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into the sorted list of corpus files (`*.jsonl`, `*.txt`) they name."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(file for file in path.iterdir() if file.suffix in CORPUS_FILE_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"{path} holds no {' or '.join(CORPUS_FILE_SUFFIXES)} files; point at a corpus."
                )
            files.extend(found)
        elif path.is_file():
            if path.suffix not in CORPUS_FILE_SUFFIXES:
                raise ValueError(f"{path}: unsupported corpus file type; use {' or '.join(CORPUS_FILE_SUFFIXES)}.")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; pass a corpus file or folder.")
    return files


def iter_corpus_texts(paths: str | Path | Iterable[str | Path], *, text_field: str = "text") -> Iterator[str]:
    """Stream the documents of corpus files, one file and one line at a time.

    `.jsonl`: one JSON object per line, the document in `text_field`. `.txt`: plain text, one document per
    paragraph (lines up to and including a blank line), so a large file never sits in memory whole.
    """
    for file in corpus_files(paths):
        with file.open(encoding="utf-8") as lines:
            if file.suffix == ".jsonl":
                yield from _jsonl_texts(file, lines, text_field)
            else:
                yield from _paragraphs(lines)


def _jsonl_texts(file: Path, lines: Iterable[str], text_field: str) -> Iterator[str]:
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{line_number}: not valid JSON ({error}); fix or remove the line.") from error
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f"{file}:{line_number}: expected an object with a string {text_field!r} field, got {line[:80]!r}; "
                "fix the line or pass the right text_field."
            )
        yield text


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    paragraph: list[str] = []
    for line in lines:
        paragraph.append(line)
        if not line.strip():
            yield "".join(paragraph)
            paragraph = []
    if paragraph:
        yield "".join(paragraph)


@dataclass(frozen=True)
class CorpusTokenStatistics:
    """How a tokenizer cuts a corpus, each document counted as `<s> text </s>`."""

    num_documents: int
    num_bytes: int
    num_tokens: int
    bytes_per_token: float
    """UTF-8 bytes of text per text token (`<s>`/`</s>` not counted)."""
    unigram_entropy: float
    """Entropy in nats/token of the corpus' token frequencies (`<s>`/`</s>` included): the loss of a model that
    ignores context. A language model trained on the corpus should go well below it."""


def corpus_token_statistics(
    tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], *, batch_size: int = 256
) -> CorpusTokenStatistics:
    """Tokenize `texts` (streamed in batches) and report bytes per token and the unigram entropy."""
    counts: Counter[int] = Counter()
    num_documents = num_bytes = 0
    batch: list[str] = []

    def count(batch: list[str]) -> None:
        for ids in tokenizer(batch)["input_ids"]:
            counts.update(ids)
        counts[EOS_TOKEN_ID] += len(batch)

    for text in texts:
        batch.append(text)
        num_documents += 1
        num_bytes += len(text.encode("utf-8"))
        if len(batch) == batch_size:
            count(batch)
            batch = []
    if batch:
        count(batch)
    if num_documents == 0:
        raise ValueError("No documents to measure; pass a non-empty corpus.")
    num_tokens = sum(counts.values())
    num_text_tokens = num_tokens - counts[BOS_TOKEN_ID] - counts[EOS_TOKEN_ID]
    entropy = -sum(n / num_tokens * math.log(n / num_tokens) for n in counts.values())
    return CorpusTokenStatistics(
        num_documents=num_documents,
        num_bytes=num_bytes,
        num_tokens=num_tokens,
        bytes_per_token=num_bytes / max(num_text_tokens, 1),
        unigram_entropy=entropy,
    )


def bos_prepending_post_processor() -> processors.PostProcessor:
    """Byte-level offsets, then `<s>` before every sequence: Apertus prepends BOS on encode and appends no EOS."""
    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
            ),
        ]
    )


def wrap_apertus_tokenizer(
    tokenizer: Tokenizer, model_max_length: int, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """`tokenizer` as a `transformers` fast tokenizer with the Apertus roles of `<s>`, `</s>`, `<unk>` and `<pad>`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
