"""Tokenize + pack + Goldfish throughput of the pretraining data pipeline on one CPU core.

    python benchmarks/data_pipeline.py [--seq-len 4096] [--max-mb 2] [--json]

Corpus: the shipped `data/corpus/*.jsonl` when present, else generated multilingual-ish text (deterministic).
Tokenizer: the shipped `data/tokenizer` when present, else a byte-level BPE (vocab 8192) trained here.

Stages, each timed on its own: batched tokenization, packing (`pack_token_ids`), Goldfish in the collator; then the
whole pipeline end to end (`tokenize_and_pack` as a `datasets` map plus `PackedBatchCollator` batches). The
baseline, measured in the same run, is a naive pure-Python loop: tokenize one document at a time, pack with Python
lists, `goldfish_drop_mask` per row. Token counts include `<s>`/`</s>` and exclude padding.

Pre-tokenized data (apertus_hf.data.pretokenized): writing the corpus's shards (`write_pretokenized`, reading the
jsonl, tokenizing and writing, with 1 and 2 processes: wall-clock tokens/s of the whole write), then reading them as
training does, rows in a seeded random order through a `DataLoader` with the collator (Goldfish included), beside
the on-the-fly end-to-end row; and the rows alone, without the collator.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: no Rust thread pool in the tokenizer
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import torch
import transformers
from torch.utils.data import DataLoader, RandomSampler

from apertus_hf.data import (
    IGNORE_INDEX,
    DataSource,
    PackedBatchCollator,
    goldfish_drop_mask,
    load_documents,
    pack_token_ids,
    tokenize_and_pack,
)
from apertus_hf.data.pretokenized import PretokenizedRows, write_pretokenized

ROOT = Path(__file__).resolve().parent.parent
GOLDFISH_K, GOLDFISH_H = 50, 50
BATCH_ROWS = 8

WORDS = {
    "en": "the river runs past old houses where people talk about weather harvest and trains in the evening light",
    "de": "der Fluss fließt an alten Häusern vorbei wo Leute über Wetter Ernte und Züge im Abendlicht sprechen",
    "fr": "la rivière coule devant les vieilles maisons où les gens parlent du temps des récoltes et des trains",
    "it": "il fiume scorre davanti alle vecchie case dove la gente parla del tempo del raccolto e dei treni",
    "rm": "il flum cula sper las veglias chasas nua che la glieud discurra da l'aura da la racolta e dals trens",
    "es": "el río pasa junto a las casas viejas donde la gente habla del tiempo la cosecha y los trenes",
}


def synthetic_corpus(max_bytes: int) -> list[str]:
    rng = random.Random(0)
    vocabularies = {language: words.split() for language, words in WORDS.items()}
    documents, size = [], 0
    while size < max_bytes:
        words = vocabularies[rng.choice(sorted(vocabularies))]
        sentences = [" ".join(rng.choices(words, k=rng.randint(5, 20))).capitalize() + "." for _ in range(40)]
        document = " ".join(sentences)
        documents.append(document)
        size += len(document.encode())
    return documents


def load_corpus(max_bytes: int) -> tuple[list[str], str]:
    if glob.glob(str(ROOT / "data" / "corpus" / "*.jsonl")):
        documents = load_documents([DataSource(str(ROOT / "data" / "corpus" / "*.jsonl"))])["text"]
        kept, size = [], 0
        for document in documents:
            if size >= max_bytes:
                break
            kept.append(document)
            size += len(document.encode())
        return kept, "data/corpus/*.jsonl"
    return synthetic_corpus(max_bytes), "synthetic"


def load_tokenizer(documents: list[str]) -> tuple[transformers.PreTrainedTokenizerFast, str]:
    if (ROOT / "data" / "tokenizer" / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer"), "data/tokenizer"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return fast, "byte-level BPE 8192 trained on the corpus"


def best_time(function, repeats: int) -> tuple[object, float]:
    """The result and the shortest of `repeats` wall times (the least disturbed run on a shared machine)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def naive_pipeline(documents, tokenizer, seq_len: int) -> int:
    """The baseline: per-document tokenization, Python-list packing, per-row Goldfish. Returns the token count."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, buffer, positions, labels, tokens = [], [], [], [], 0
    for text in documents:
        ids = [bos, *tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], eos]
        tokens += len(ids)
        for position, token in enumerate(ids):
            buffer.append(token)
            positions.append(position if position < len(buffer) else len(buffer) - 1)
            labels.append(IGNORE_INDEX if position == 0 else token)
            if len(buffer) == seq_len:
                rows.append((buffer, positions, labels))
                buffer, positions, labels = [], [], []
    if buffer:
        padding = seq_len - len(buffer)
        rows.append((buffer + [pad] * padding, positions + list(range(padding)), labels + [IGNORE_INDEX] * padding))
    for _, _, row_labels in rows:
        row = torch.tensor(row_labels)
        row.masked_fill_(goldfish_drop_mask(row, GOLDFISH_K, GOLDFISH_H), IGNORE_INDEX)
    return tokens


def collate_all(collator, rows) -> None:
    for start in range(0, len(rows), BATCH_ROWS):
        collator(rows[start : start + BATCH_ROWS])


def read_all_rows(rows: PretokenizedRows, collator: PackedBatchCollator | None) -> None:
    """Every row once, in the seeded random order of a training epoch, BATCH_ROWS at a time (collated if asked)."""
    sampler = RandomSampler(rows, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(rows, batch_size=BATCH_ROWS, sampler=sampler, collate_fn=collator or (lambda batch: batch))
    for _ in loader:
        pass


def run(seq_len: int, max_bytes: int, batch_size: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    # No cache: every map must do the work, not find it cached by an earlier run.
    datasets.disable_caching()
    documents, corpus_name = load_corpus(max_bytes)
    tokenizer, tokenizer_name = load_tokenizer(documents)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    batches = [documents[i : i + batch_size] for i in range(0, len(documents), batch_size)]
    collator = PackedBatchCollator(goldfish_k=GOLDFISH_K, goldfish_h=GOLDFISH_H)
    source = datasets.Dataset.from_dict({"text": documents})

    def tokenize():
        return [
            tokenizer(batch, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False)[
                "input_ids"
            ]
            for batch in batches
        ]

    def end_to_end(documents):
        dataset = tokenize_and_pack(documents, tokenizer, seq_len, batch_size=batch_size)
        collate_all(collator, list(dataset))
        return dataset

    # Untimed warm-up: the tokenizer's word cache is then equally warm for every stage and for the baseline.
    encoded = tokenize()
    tokens = sum(len(ids) + 2 for batch in encoded for ids in batch)
    _, tokenize_s = best_time(tokenize, repeats)
    packed, pack_s = best_time(
        lambda: [pack_token_ids(b, seq_len, bos_id=bos, eos_id=eos, pad_id=pad) for b in encoded], repeats
    )
    rows = [{key: batch[key][i] for key in batch} for batch in packed for i in range(len(batch["input_ids"]))]
    _, goldfish_s = best_time(lambda: collate_all(collator, rows), repeats)
    end_to_end_dataset, end_to_end_s = best_time(lambda: end_to_end(source), repeats)
    _, streaming_s = best_time(lambda: end_to_end(source.to_iterable_dataset()), repeats)
    naive_tokens, naive_s = best_time(lambda: naive_pipeline(documents, tokenizer, seq_len), repeats)
    assert naive_tokens == tokens, f"the baseline saw {naive_tokens} tokens, the pipeline {tokens}"

    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
        write_seconds = {}
        for num_proc in (1, 2):
            output = Path(folder) / f"tokenized-{num_proc}"
            written, write_seconds[num_proc] = best_time(
                lambda output=output, num_proc=num_proc: write_pretokenized(
                    DataSource(str(corpus)), tokenizer, output, num_proc=num_proc, batch_size=batch_size, overwrite=True
                ),
                repeats,
            )
        assert written.num_tokens == tokens, f"the shards hold {written.num_tokens} tokens, the pipeline {tokens}"
        shard_rows = PretokenizedRows(written, seq_len)
        read_all_rows(shard_rows, collator)  # warm-up: the page cache holds the shards, as for any but the first epoch
        _, pretokenized_s = best_time(lambda: read_all_rows(shard_rows, collator), repeats)
        _, rows_only_s = best_time(lambda: read_all_rows(shard_rows, None), repeats)
    return {
        "corpus": corpus_name,
        "tokenizer": tokenizer_name,
        "documents": len(documents),
        "megabytes": round(sum(len(d.encode()) for d in documents) / 1e6, 2),
        "tokens": tokens,
        "seq_len": seq_len,
        "repeats": repeats,
        "rows": len(end_to_end_dataset),
        "padding_fraction": round(1 - tokens / (len(end_to_end_dataset) * seq_len), 5),
        "tokens_per_s": {
            "tokenize": round(tokens / tokenize_s),
            "pack": round(tokens / pack_s),
            "goldfish": round(tokens / goldfish_s),
            "end_to_end_dataset": round(tokens / end_to_end_s),
            "end_to_end_streaming": round(tokens / streaming_s),
            "naive": round(tokens / naive_s),
            "pretokenize_1_process": round(tokens / write_seconds[1]),
            "pretokenize_2_processes": round(tokens / write_seconds[2]),
            "pretokenized_loader": round(tokens / pretokenized_s),
            "pretokenized_rows_only": round(tokens / rows_only_s),
        },
        "pretokenized_vs_on_the_fly": round(end_to_end_s / pretokenized_s, 2),
        "speedup_vs_naive": round(naive_s / end_to_end_s, 2),
        "speedup_vs_naive_streaming": round(naive_s / streaming_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--max-mb", type=float, default=2.0, help="corpus size to process, in MB of UTF-8")
    parser.add_argument("--batch-size", type=int, default=1000, help="documents per tokenize/pack batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage; the fastest counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    result = run(args.seq_len, int(args.max_mb * 1e6), args.batch_size, args.repeats)
    if args.json:
        json.dump(result, sys.stdout)
        print()
        return
    print(
        f"corpus: {result['corpus']} ({result['documents']} documents, {result['megabytes']} MB, "
        f"{result['tokens']} tokens); tokenizer: {result['tokenizer']}"
    )
    print(f"seq_len {result['seq_len']}: {result['rows']} rows, padding {result['padding_fraction']:.3%}")
    for stage, rate in result["tokens_per_s"].items():
        print(f"  {stage:<22} {rate:>12,} tokens/s")
    print(
        f"pre-tokenized loader (DataLoader + collator) vs on the fly (end to end, Dataset): "
        f"{result['pretokenized_vs_on_the_fly']:.1f}x"
    )
    print(f"speedup vs naive: {result['speedup_vs_naive']:.2f}x")
    print(f"speedup vs naive (streaming): {result['speedup_vs_naive_streaming']:.2f}x")


if __name__ == "__main__":
    main()
